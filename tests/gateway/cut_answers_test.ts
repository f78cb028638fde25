/**
 * Answers cut short are charged what they used: STREAM_MAX_MS ends an answer that never ends, a
 * shutdown past its grace period ends streams with an error event, and a client hanging up an
 * Anthropic stream is charged its estimate.
 */
import assert from "node:assert/strict";
import { keys, u64 } from "../../lib/core/kv.ts";
import { eventually, serveGateway } from "../support/helpers.ts";
import { CHAT, post } from "../support/gateway_setup.ts";

Deno.test("STREAM_MAX_MS: an answer that never ends is cut end to end, its upstream call cancelled, usage charged, slot freed", async () => {
  const s = await serveGateway(
    { STREAM_MAX_MS: "700", UPSTREAM_CONCURRENCY: "1", UPSTREAM_TIMEOUT_MS: "5000" },
    "user_endless",
  );
  try {
    s.fake.mode = "endless";
    s.fake.sseDelayMs = 20;
    const started = performance.now();
    const res = await post(s.url, s.apiKey, { ...CHAT, stream: true });
    assert.equal(res.status, 200);
    const text = await res.text();
    const took = performance.now() - started;
    assert.ok(took >= 650 && took < 5000, `cut after ${took} ms`);
    const last = JSON.parse(text.trim().split("\n\n").at(-1)!.replace(/^data: /, ""));
    assert.match(last.error.message, /STREAM_MAX_MS \(700 ms\)/);
    await eventually(() => s.fake.streamsCancelled === 1);
    const usage = await s.today();
    assert.equal(usage.requests, 1);
    assert.ok(usage.completionTokens > 5, "what was relayed is charged");
    s.fake.mode = "json";
    const next = await post(s.url, s.apiKey);
    assert.equal(next.status, 200, "the slot was freed");
    await next.text();
  } finally {
    await s.close();
  }
});

Deno.test("a shutdown past its grace period: a streamed answer ends with an error event and is charged once, a call still waiting for GLM answers 503 and counts nothing", async () => {
  const s = await serveGateway({}, "user_shutdown");
  try {
    s.fake.mode = "sse";
    s.fake.holdAfterFirstChunk = true;
    const streaming = await post(s.url, s.apiKey, { ...CHAT, stream: true });
    assert.equal(streaming.status, 200);
    const reader = streaming.body!.getReader();
    await reader.read(); // the answer has begun
    s.fake.mode = "slow_headers";
    const waiting = post(s.url, s.apiKey);
    await eventually(() => s.fake.count === 2 || undefined); // GLM has the second request

    await s.app.services.gateway.shutdown();

    let rest = "";
    const decoder = new TextDecoder();
    for (let c = await reader.read(); !c.done; c = await reader.read()) {
      rest += decoder.decode(c.value, { stream: true });
    }
    const event = JSON.parse(rest.trim().replace(/^data: /, ""));
    assert.equal(event.error.code, "upstream_unavailable");
    assert.match(event.error.message, /the server is restarting/);
    const refused = await waiting;
    assert.equal(refused.status, 503);
    assert.equal(refused.headers.get("retry-after"), "1");
    assert.equal((await refused.json()).error.code, "upstream_unavailable");
    // The cut answer is charged what it had used (its prompt estimate; usage came in no chunk);
    // the one GLM had not answered counts nothing. Nothing is left held.
    const today = await s.today();
    assert.equal(today.requests, 1);
    assert.ok(today.promptTokens > 0);
    const kv = s.app.kv;
    assert.equal(
      u64(
        (await kv.get(keys.leaseHeld(
          (await s.app.services.users.resolveKey(s.apiKey))!.id,
          "count",
        ))).value,
      ),
      0,
    );
  } finally {
    s.fake.release();
    await s.close();
  }
});

Deno.test("an Anthropic stream the client hangs up on after message_start is charged its estimate, not 0", async () => {
  const s = await serveGateway({}, "user_hangup");
  try {
    s.fake.mode = "sse";
    s.fake.holdAfterFirstChunk = true; // message_start, with GLM's 0 input tokens, then a pause
    const res = await post(s.url, s.apiKey, {
      model: "glm-4.6",
      max_tokens: 100,
      stream: true,
      messages: [{ role: "user", content: "Tell me a long story about a lighthouse keeper." }],
    }, "/v1/messages");
    assert.equal(res.status, 200);
    const reader = res.body!.getReader();
    assert.match(new TextDecoder().decode((await reader.read()).value), /message_start/);
    await reader.cancel(); // Claude Code's Esc
    const today = await eventually(async () => {
      const t = await s.today();
      return t.requests === 1 ? t : undefined;
    });
    assert.ok(today.promptTokens > 0, `charged ${today.promptTokens} prompt tokens`);
  } finally {
    s.fake.release();
    await s.close();
  }
});
