/**
 * When the upstream fails — an error, a redirect, no headers in time, a stream cut or stalled, no
 * connection, no GLM_API_KEY, a client gone before the answer — the client gets the contract's
 * error, the master key stays hidden, and only what the upstream used is counted.
 */
import assert from "node:assert/strict";
import { createApp } from "../../routes/mod.ts";
import { bearer, eventually, json, MASTER_KEY, testApp } from "../support/helpers.ts";
import { assertRateHeaders, CHAT, errorOf, setup } from "../support/gateway_setup.ts";

Deno.test("an upstream error body that echoes the master key reaches the user without it", async () => {
  const upstream = Deno.serve(
    { hostname: "127.0.0.1", port: 0, onListen: () => {} },
    (req) =>
      Response.json(
        { error: { code: "1214", message: `bad request for ${req.headers.get("authorization")}` } },
        { status: 400 },
      ),
  );
  const s = await setup({ GLM_BASE_URL: `http://127.0.0.1:${upstream.addr.port}` });
  try {
    const res = await s.chat();
    assert.equal(res.status, 400);
    const text = await res.text();
    assert.ok(!text.includes(MASTER_KEY), text);
    assert.match(JSON.parse(text).error.message, /\[redacted\]/);
    assert.equal(JSON.parse(text).error.code, "1214", "the rest relayed as GLM sent it");
  } finally {
    await s.close();
    await upstream.shutdown();
  }
});

Deno.test("an upstream redirect is not followed: the master key stays, 502, nothing counted", async () => {
  const elsewhere: Array<Record<string, string>> = [];
  const other = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen: () => {} }, (req) => {
    elsewhere.push(Object.fromEntries(req.headers));
    return Response.json({ usage: { prompt_tokens: 1, completion_tokens: 1 } });
  });
  const upstream = Deno.serve(
    { hostname: "127.0.0.1", port: 0, onListen: () => {} },
    () =>
      new Response(null, {
        status: 307,
        headers: { location: `http://127.0.0.1:${other.addr.port}/steal?k=1` },
      }),
  );
  const s = await setup({ GLM_BASE_URL: `http://127.0.0.1:${upstream.addr.port}` });
  try {
    const res = await s.chat();
    assert.equal(res.status, 502);
    assert.equal((await errorOf(res)).code, "upstream_unavailable");
    assert.equal(elsewhere.length, 0, "the redirect was not followed");
    assert.deepEqual(await s.usage(), { requests: 0, promptTokens: 0, completionTokens: 0 });
    assert.ok(s.app.logs.some((l) => l.includes("upstream redirected")));
    assert.ok(!s.app.logs.some((l) => l.includes("k=1")), "no query string in the log");
  } finally {
    await s.close();
    await upstream.shutdown();
    await other.shutdown();
  }
});

Deno.test("upstream failures", async (t) => {
  const s = await setup({ UPSTREAM_TIMEOUT_MS: "300" });
  try {
    await t.step("500 is relayed with its status and body, and not counted", async () => {
      s.fake.mode = "error500";
      const res = await s.chat();
      assert.equal(res.status, 500);
      assert.match(res.headers.get("content-type") ?? "", /application\/json/);
      assertRateHeaders(res);
      assert.equal(
        (await json<{ error: { message: string } }>(res)).error.message,
        "upstream exploded",
      );
      // Not the user's doing: no request, token or cost recorded, the request allowance given back
      // (and the answer's headers say so: nothing else was used yet).
      assert.equal(
        res.headers.get("x-ratelimit-remaining-requests"),
        res.headers.get("x-ratelimit-limit-requests"),
      );
      assert.deepEqual(await s.usage(), { requests: 0, promptTokens: 0, completionTokens: 0 });
      assert.ok(s.app.logs.some((l) => l.includes('"level":"warn"') && l.includes('"status":500')));
      const next = await s.chat();
      assert.equal(
        next.headers.get("x-ratelimit-remaining-requests"),
        res.headers.get("x-ratelimit-remaining-requests"),
      );
      await next.body?.cancel();
    });
    await t.step("no response headers within the timeout → 504 upstream_timeout", async () => {
      s.fake.mode = "slow_headers";
      const res = await s.chat();
      assert.equal(res.status, 504);
      assertRateHeaders(res);
      assert.equal((await errorOf(res)).code, "upstream_timeout");
      // The upstream had the prompt: charged its estimate ("user" + "hi" + 4 per message).
      assert.deepEqual(await s.usage(), { requests: 1, promptTokens: 6, completionTokens: 0 });
    });
    await t.step("a stream cut mid-way still records the request", async () => {
      s.fake.mode = "cut";
      s.fake.holdAfterFirstChunk = true;
      const res = await s.chat({ ...CHAT, stream: true });
      assert.equal(res.status, 200);
      const reader = res.body!.getReader();
      assert.match(new TextDecoder().decode((await reader.read()).value), /Hel/);
      s.fake.release(); // now the upstream cuts the connection
      await assert.rejects(async () => {
        for (;;) if ((await reader.read()).done) break;
      });
      // No usage chunk arrived: the prompt estimate and the relayed "Hel" (1 token).
      assert.deepEqual(await s.usage(), { requests: 2, promptTokens: 12, completionTokens: 1 });
      assert.ok(
        s.app.logs.some((l) => l.includes('"outcome":"cut"') && l.includes('"estimated":true')),
      );
    });
    await t.step(
      "a stream that stalls mid-way is cut after the timeout, upstream call cancelled",
      async () => {
        s.fake.mode = "sse";
        s.fake.holdAfterFirstChunk = true; // and never released
        const cancelledBefore = s.fake.streamsCancelled;
        const res = await s.chat({ ...CHAT, stream: true });
        assert.equal(res.status, 200);
        const reader = res.body!.getReader();
        assert.match(new TextDecoder().decode((await reader.read()).value), /Hel/);
        const waited = performance.now();
        let rest = "";
        for (;;) {
          const { done, value } = await reader.read();
          if (done) break;
          rest += new TextDecoder().decode(value);
        }
        assert.ok(performance.now() - waited >= 250, "not cut before the timeout");
        // The stream ends with an error event the SDKs report, not a silent truncation.
        const last = JSON.parse(rest.trim().replace(/^data: /, ""));
        assert.match(last.error.message, /cut: upstream sent nothing for 300 ms/);
        assert.equal((await s.usage()).requests, 3);
        assert.ok(
          s.app.logs.some((l) =>
            l.includes('"outcome":"cut"') && l.includes("upstream sent nothing for 300 ms")
          ),
        );
        // The upstream notices the cancelled call when its connection closes (asynchronously).
        await eventually(() => s.fake.streamsCancelled === cancelledBefore + 1);
        s.fake.holdAfterFirstChunk = false;
      },
    );
    await t.step(
      "a client that stops reading is cut after the timeout: upstream cancelled, usage settled",
      async () => {
        // 6 MiB: more than the sockets buffer, so the relay stops reading while the client rests.
        s.fake.mode = "sse";
        s.fake.sseChunks = Array.from({ length: 400 }, () => "x".repeat(16 * 1024));
        const cancelledBefore = s.fake.streamsCancelled;
        const res = await s.chat({ ...CHAT, stream: true });
        assert.equal(res.status, 200);
        // The upstream call is cancelled while the client still reads nothing.
        await eventually(() => s.fake.streamsCancelled === cancelledBefore + 1);
        // The log line follows the settlement's commit.
        await eventually(
          () =>
            s.app.logs.some((l) =>
              l.includes('"outcome":"cancelled"') &&
              l.includes("the client read nothing for 300 ms")
            ),
          5000,
          () => s.app.logs.filter((l) => l.includes('"gateway"')).slice(-3),
        );
        // What it finally reads is a cut answer, and it was charged its estimate.
        const text = await res.text().catch(() => "");
        assert.doesNotMatch(text, /data: \[DONE\]/);
        const usage = await s.usage();
        assert.equal(usage.requests, 4);
        assert.ok(usage.completionTokens > 1000, "the relayed part is charged");
        s.fake.sseChunks = ["Hel", "lo", "!"];
      },
    );
    assert.ok(!s.app.logs.some((l) => l.includes(MASTER_KEY)));
  } finally {
    await s.close();
  }
});

Deno.test("unreachable upstream → 502 upstream_unavailable, not counted, warned", async () => {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = listener.addr.port;
  listener.close();
  const s = await setup({ GLM_BASE_URL: `http://127.0.0.1:${port}/v4` });
  try {
    const res = await s.chat();
    assert.equal(res.status, 502);
    assertRateHeaders(res);
    assert.equal(
      res.headers.get("x-ratelimit-remaining-requests"),
      res.headers.get("x-ratelimit-limit-requests"),
      "given back, and the answer says so",
    );
    assert.equal((await errorOf(res)).code, "upstream_unavailable");
    // It never reached the upstream: nothing counted.
    assert.deepEqual(await s.usage(), { requests: 0, promptTokens: 0, completionTokens: 0 });
    assert.ok(s.app.logs.some((l) => l.includes("upstream_unavailable") && l.includes('"warn"')));
    assert.ok(!s.app.logs.some((l) => l.includes(MASTER_KEY)));
  } finally {
    await s.close();
  }
});

Deno.test("no GLM_API_KEY → 503 not_configured", async () => {
  const app = await testApp({ GLM_API_KEY: "" });
  try {
    const res = await app.request("/v1/chat/completions", {
      method: "POST",
      headers: bearer("kw_" + "A".repeat(43)),
      body: JSON.stringify(CHAT),
    });
    assert.equal(res.status, 503);
    assert.equal((await errorOf(res)).code, "not_configured");
    assert.ok(app.logs.some((l) => l.includes('"level":"warn"') && l.includes("GLM_API_KEY")));
  } finally {
    await app.close();
  }
});

Deno.test("over a real port: a client leaving before the upstream answers cancels it", async () => {
  // An upstream that never answers, and notices when the caller gives up.
  let upstreamAborted: () => void;
  const aborted = new Promise<void>((r) => upstreamAborted = r);
  const upstream = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen: () => {} }, (req) => {
    return new Promise<Response>((resolve) => {
      req.signal.addEventListener("abort", () => {
        upstreamAborted();
        resolve(new Response("too late"));
      });
      setTimeout(() => resolve(new Response("gave up waiting", { status: 500 })), 8000);
    });
  });
  const app = await testApp({ GLM_BASE_URL: `http://127.0.0.1:${upstream.addr.port}` });
  const server = Deno.serve(
    { hostname: "127.0.0.1", port: 0, onListen: () => {} },
    createApp(app.services).fetch,
  );
  try {
    const { apiKey } = await app.services.users.provision("user_leaver");
    const client = new AbortController();
    const call = fetch(`http://127.0.0.1:${server.addr.port}/v1/chat/completions`, {
      method: "POST",
      headers: { ...bearer(apiKey), "content-type": "application/json" },
      body: JSON.stringify(CHAT),
      signal: client.signal,
    }).catch((err) => err);
    await new Promise((r) => setTimeout(r, 200));
    client.abort();
    assert.ok((await call) instanceof Error);
    const gaveUp = await Promise.race([
      aborted.then(() => true),
      new Promise((r) => setTimeout(() => r(false), 5000)),
    ]);
    assert.equal(gaveUp, true, "the upstream request was cancelled");
    const line = await eventually(() => app.logs.find((l) => l.includes("client disconnected")));
    assert.ok(line, "the cancellation is logged");
    // Not an upstream failure: an info line with nginx's 499, and no warning.
    assert.match(line, /"level":"info".*"status":499,"outcome":"cancelled"/);
    assert.ok(!app.logs.some((l) => l.includes('"level":"warn"')));
  } finally {
    await server.shutdown();
    await upstream.shutdown();
    await app.close();
  }
});
