/**
 * The relay: JSON and SSE answers reach the client as they arrive, byte for byte, and are metered
 * from their usage; a client that disconnects mid-stream cancels the upstream call.
 */
import assert from "node:assert/strict";
import { createApp } from "../../routes/mod.ts";
import { bearer, MASTER_KEY } from "../support/helpers.ts";
import { assertRateHeaders, CHAT, setup } from "../support/gateway_setup.ts";

Deno.test("JSON answer is relayed and its usage recorded; the master key stays upstream", async () => {
  const s = await setup({ RATE_LIMIT_RPM: "10" });
  try {
    const res = await s.chat({ ...CHAT, temperature: 0.2, custom_field: { keep: [1, 2] } });
    assert.equal(res.status, 200);
    assert.match(res.headers.get("content-type") ?? "", /application\/json/);
    const text = await res.text();
    const body = JSON.parse(text);
    assert.equal(body.choices[0].message.content, "Hello!");
    assert.deepEqual(body.usage, { prompt_tokens: 11, completion_tokens: 7, total_tokens: 18 });
    assert.equal(res.headers.get("x-ratelimit-limit-requests"), "10");
    assert.equal(res.headers.get("x-ratelimit-remaining-requests"), "9");
    assert.equal(res.headers.get("x-ratelimit-reset-requests"), "6s");
    assert.equal(res.headers.get("x-upstream-request-id"), "upstream-req-1");

    assert.equal(s.fake.count, 1);
    const got = s.fake.requests[0];
    assert.equal(got.path, "/api/paas/v4/chat/completions");
    assert.equal(got.authorization, `Bearer ${MASTER_KEY}`);
    // Every field passes through untouched, byte for byte.
    assert.equal(
      got.body,
      JSON.stringify({ ...CHAT, temperature: 0.2, custom_field: { keep: [1, 2] } }),
    );

    assert.deepEqual(await s.usage(), { requests: 1, promptTokens: 11, completionTokens: 7 });
    assert.ok(!text.includes(MASTER_KEY));
    for (const [, v] of res.headers) assert.ok(!v.includes(MASTER_KEY));
    assert.ok(s.app.logs.some((l) => l.includes('"msg":"gateway"')), "gateway log line");
    assert.ok(!s.app.logs.some((l) => l.includes(MASTER_KEY) || l.includes(s.apiKey)));
  } finally {
    await s.close();
  }
});

Deno.test("SSE is relayed as it arrives: the first chunk reaches the client before the upstream ends", async () => {
  const s = await setup();
  try {
    s.fake.mode = "sse";
    s.fake.holdAfterFirstChunk = true;
    const res = await s.chat({ ...CHAT, stream: true }, {
      headers: { accept: "text/event-stream" },
    });
    assert.equal(res.status, 200);
    assert.match(res.headers.get("content-type") ?? "", /text\/event-stream/);
    assertRateHeaders(res);
    assert.equal(s.fake.requests[0].accept, "text/event-stream");
    const reader = res.body!.getReader();
    const dec = new TextDecoder();
    const first = dec.decode((await reader.read()).value);
    assert.match(first, /"content":"Hel"/);
    // The upstream is held after its first chunk: nothing more has been produced yet.
    assert.equal(s.fake.chunksSent, 1);
    assert.equal(s.fake.streamsFinished, 0);
    s.fake.release();
    let rest = "";
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      rest += dec.decode(value, { stream: true });
    }
    assert.equal(s.fake.streamsFinished, 1);
    assert.match(rest, /"usage":\{"prompt_tokens":11/);
    assert.ok(rest.trimEnd().endsWith("data: [DONE]"));
    assert.deepEqual(await s.usage(), { requests: 1, promptTokens: 11, completionTokens: 7 });
  } finally {
    await s.close();
  }
});

Deno.test("a compressed JSON answer is metered from its usage, not estimated", async () => {
  const usage = { prompt_tokens: 1234, completion_tokens: 567, total_tokens: 1801 };
  const body = JSON.stringify({
    id: "gz",
    choices: [{ index: 0, message: { role: "assistant", content: "squeezed ".repeat(1000) } }],
    usage,
  });
  const gzipped = new Uint8Array(
    await new Response(
      new Blob([body]).stream().pipeThrough(new CompressionStream("gzip")),
    ).arrayBuffer(),
  );
  // As a proxy in front of GLM might answer: gzip, with the compressed length declared.
  const upstream = Deno.serve(
    { hostname: "127.0.0.1", port: 0, onListen: () => {} },
    () =>
      new Response(gzipped, {
        headers: {
          "content-type": "application/json",
          "content-encoding": "gzip",
          "content-length": String(gzipped.length),
        },
      }),
  );
  const s = await setup({ GLM_BASE_URL: `http://127.0.0.1:${upstream.addr.port}` });
  try {
    const res = await s.chat();
    assert.equal(res.status, 200);
    assert.equal(await res.text(), body, "relayed decompressed, whole");
    assert.deepEqual(await s.usage(), { requests: 1, promptTokens: 1234, completionTokens: 567 });
  } finally {
    await s.close();
    await upstream.shutdown();
  }
});

Deno.test("large answers are relayed byte for byte and metered: a 3 MiB JSON and a 2,000-event stream", async (t) => {
  const usage = { prompt_tokens: 5, completion_tokens: 4000, total_tokens: 4005 };
  const text = "Grüße, 世界! ".repeat(200_000); // multi-byte characters across read boundaries
  const json = new TextEncoder().encode(JSON.stringify({
    id: "big",
    choices: [{ index: 0, message: { role: "assistant", content: text } }],
    usage,
  }));
  const events = Array.from(
    { length: 2000 },
    (_, i) => `data: ${JSON.stringify({ choices: [{ delta: { content: `ü${i}世` } }] })}\n\n`,
  );
  events.push(`data: ${JSON.stringify({ choices: [], usage })}\n\n`, "data: [DONE]\n\n");
  const sse = new TextEncoder().encode(events.join(""));
  const upstream = Deno.serve(
    { hostname: "127.0.0.1", port: 0, onListen: () => {} },
    async (req) => {
      const stream = (await req.json()).stream === true;
      if (!stream) return new Response(json, { headers: { "content-type": "application/json" } });
      let i = 0;
      return new Response(
        new ReadableStream({
          pull(c) {
            // Uneven pieces, so events and characters are split across reads.
            if (i >= sse.length) return c.close();
            c.enqueue(sse.slice(i, i += 997));
          },
        }),
        { headers: { "content-type": "text/event-stream" } },
      );
    },
  );
  const s = await setup({ GLM_BASE_URL: `http://127.0.0.1:${upstream.addr.port}` });
  try {
    await t.step("JSON", async () => {
      const res = await s.chat();
      assert.equal(res.status, 200);
      assert.deepEqual(new Uint8Array(await res.arrayBuffer()), json);
      assert.deepEqual(await s.usage(), { requests: 1, promptTokens: 5, completionTokens: 4000 });
    });
    await t.step("SSE", async () => {
      const res = await s.chat({ ...CHAT, stream: true });
      assert.equal(res.status, 200);
      assert.deepEqual(new Uint8Array(await res.arrayBuffer()), sse);
      assert.deepEqual(await s.usage(), { requests: 2, promptTokens: 10, completionTokens: 8000 });
    });
  } finally {
    await s.close();
    await upstream.shutdown();
  }
});

Deno.test("over a real port: streaming works and a client disconnect cancels the upstream", async () => {
  const s = await setup();
  const server = Deno.serve(
    { hostname: "127.0.0.1", port: 0, onListen: () => {} },
    createApp(s.app.services).fetch,
  );
  try {
    s.fake.mode = "sse";
    s.fake.holdAfterFirstChunk = true;
    const abort = new AbortController();
    const res = await fetch(`http://127.0.0.1:${server.addr.port}/v1/chat/completions`, {
      method: "POST",
      headers: { ...bearer(s.apiKey), "content-type": "application/json" },
      body: JSON.stringify({ ...CHAT, stream: true }),
      signal: abort.signal,
    });
    assert.equal(res.status, 200);
    const reader = res.body!.getReader();
    assert.match(new TextDecoder().decode((await reader.read()).value), /Hel/);
    assert.equal(s.fake.streamsFinished, 0);
    abort.abort();
    await reader.cancel().catch(() => {});
    // The gateway sees the disconnect and cancels its upstream request.
    for (let i = 0; i < 200 && s.fake.streamsCancelled === 0; i++) {
      await new Promise((r) => setTimeout(r, 10));
    }
    assert.equal(s.fake.streamsCancelled, 1);
    assert.equal(s.fake.streamsFinished, 0);
    assert.equal((await s.usage()).requests, 1);
    assert.ok(s.app.logs.some((l) => l.includes('"outcome":"cancelled"')));
  } finally {
    await server.shutdown();
    await s.close();
  }
});
