/**
 * CONTRACT §5 "Upstream capacity is shared fairly", §2 UPSTREAM_USER_SHARE: no user holds more
 * than ceil(share × slots) of a model's upstream slots, so one user's burst never keeps another
 * user waiting behind it.
 */
import assert from "node:assert/strict";
import { keys, u64 } from "../../lib/core/kv.ts";
import { userShareOf } from "../../lib/limits/upstream/slots.ts";
import { bearer, eventually, serveGateway } from "../support/helpers.ts";

Deno.test("userShareOf: ceil(share × slots), at least 1", () => {
  assert.equal(userShareOf(2, 0.5), 1);
  assert.equal(userShareOf(3, 0.5), 2);
  assert.equal(userShareOf(4, 0.5), 2);
  assert.equal(userShareOf(1, 0.5), 1);
  assert.equal(userShareOf(5, 0.01), 1);
  assert.equal(userShareOf(4, 1), 4);
  assert.equal(userShareOf(10, 0.7), 7, "no extra slot from floating-point error");
});

Deno.test("one user's 8 streams against a model capped at 2 leave a slot for a second user: served within one answer's time, never 503", async () => {
  const s = await serveGateway(
    { UPSTREAM_CONCURRENCY: '{"glm-4.6": 2}', UPSTREAM_QUEUE_MS: "20000", RATE_LIMIT_RPM: "1000" },
    "user_share_burst",
  );
  const ANSWER_MS = 600; // three pauses of 200 ms in every streamed answer
  const ask = async (key: string, content: string) => {
    const started = performance.now();
    const res = await fetch(`${s.url}/v1/chat/completions`, {
      method: "POST",
      headers: { ...bearer(key), "content-type": "application/json" },
      body: JSON.stringify({
        model: "glm-4.6",
        stream: true,
        messages: [{ role: "user", content }],
      }),
    });
    const headersMs = performance.now() - started;
    const text = await res.text();
    return { status: res.status, headersMs, text };
  };
  try {
    s.fake.mode = "sse";
    s.fake.sseDelayMs = 200;
    s.fake.concurrencyCap = 2; // GLM answers 1302 beyond the account's cap
    const burst = Array.from({ length: 8 }, (_, i) => ask(s.apiKey, `burst ${i}`));
    await eventually(() => s.fake.count === 1);
    await new Promise((r) => setTimeout(r, 150));
    assert.equal(s.fake.inFlight.get("glm-4.6"), 1, "one user holds at most ceil(0.5 × 2) = 1");
    const other = (await s.app.services.users.provision("user_share_other")).apiKey;
    const second = await ask(other, "the second user");
    assert.equal(second.status, 200);
    assert.ok(
      second.headersMs < ANSWER_MS,
      `the second user waited ${Math.round(second.headersMs)} ms (an answer takes ${ANSWER_MS})`,
    );
    const results = await Promise.all(burst);
    assert.deepEqual(results.map((r) => r.status), new Array(8).fill(200), "no 503 for anyone");
    assert.equal(s.fake.rejectedOverCap, 0);
    assert.ok(s.fake.maxInFlight <= 2);
    const userId = (await s.app.services.users.resolveKey(s.apiKey))!.id;
    await eventually(async () =>
      u64((await s.app.kv.get(keys.upstreamHeld("glm-4.6"))).value) === 0 &&
      u64((await s.app.kv.get(keys.upstreamUserHeld("glm-4.6", userId))).value) === 0
    );
  } finally {
    await s.close();
  }
});
