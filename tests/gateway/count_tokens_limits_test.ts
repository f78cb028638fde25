/**
 * CONTRACT §2 COUNT_TOKENS_RPM, §5 the gateway's endpoint table: /v1/messages/count_tokens is
 * limited per user to COUNT_TOKENS_RPM calls a minute and 2 in flight (429 beyond, with
 * Retry-After), counts against no other limit, and takes an upstream slot like any call that
 * reaches GLM with the master key.
 */
import assert from "node:assert/strict";
import { keys, u64 } from "../../lib/core/kv.ts";
import { bearer, eventually, serveGateway } from "../support/helpers.ts";

/** GLM's count_tokens endpoint, answering after `delayMs`, counting the calls in flight. */
class CountingGlm {
  delayMs = 20;
  calls = 0;
  inFlight = 0;
  maxInFlight = 0;
  private readonly server = Deno.serve(
    { hostname: "127.0.0.1", port: 0, onListen: () => {} },
    async () => {
      this.calls++;
      this.inFlight++;
      this.maxInFlight = Math.max(this.maxInFlight, this.inFlight);
      await new Promise((r) => setTimeout(r, this.delayMs));
      this.inFlight--;
      return Response.json({ input_tokens: 42 });
    },
  );
  get baseUrl(): string {
    return `http://127.0.0.1:${this.server.addr.port}/api/anthropic`;
  }
  close() {
    return this.server.shutdown();
  }
}

const BODY = JSON.stringify({
  model: "glm-4.6",
  messages: [{ role: "user", content: "count me" }],
});

async function countTokens(url: string, key: string) {
  const res = await fetch(`${url}/v1/messages/count_tokens`, {
    method: "POST",
    headers: { "x-api-key": key, "content-type": "application/json" },
    body: BODY,
  });
  const body = await res.json();
  return { status: res.status, body, retryAfter: res.headers.get("retry-after") };
}

Deno.test("300 count_tokens calls from one key: 429 beyond COUNT_TOKENS_RPM and beyond 2 in flight, never more than 2 at GLM, and no other limit counts them", async (t) => {
  const glm = new CountingGlm();
  const s = await serveGateway(
    { GLM_ANTHROPIC_BASE_URL: glm.baseUrl, RATE_LIMIT_RPM: "5" },
    "user_count_tokens",
  );
  try {
    await t.step(
      "one after the other (two at a time): the rpm, then rate_limit_exceeded",
      async () => {
        const started = performance.now();
        const results: Array<Awaited<ReturnType<typeof countTokens>>> = [];
        let sent = 0;
        const worker = async () => {
          while (sent < 300) {
            sent++;
            results.push(await countTokens(s.url, s.apiKey));
          }
        };
        await Promise.all([worker(), worker()]);
        const elapsed = performance.now() - started;
        const ok = results.filter((r) => r.status === 200);
        const refused = results.filter((r) => r.status !== 200);
        // GCRA with burst = rpm: 120 at once, then one every 500 ms.
        assert.ok(ok.length >= 120, `${ok.length} answered`);
        assert.ok(
          ok.length <= 120 + Math.ceil(elapsed / 500) + 1,
          `${ok.length} answered in ${elapsed} ms`,
        );
        for (const r of ok) assert.equal(r.body.input_tokens, 42);
        for (const r of refused) {
          assert.equal(r.status, 429);
          assert.equal(r.body.error.code, "rate_limit_exceeded");
          assert.match(r.retryAfter ?? "", /^\d+$/);
        }
        assert.equal(glm.calls, ok.length, "only the answered calls reached GLM");
      },
    );
    await t.step(
      "ten at once from one key: two in flight, the others concurrency_limit_exceeded",
      async () => {
        const { apiKey } = await s.app.services.users.provision("user_count_tokens_burst");
        glm.delayMs = 300;
        const before = glm.calls;
        const results = await Promise.all(
          Array.from({ length: 10 }, () => countTokens(s.url, apiKey)),
        );
        const ok = results.filter((r) => r.status === 200);
        assert.equal(ok.length, 2);
        for (const r of results.filter((r) => r.status !== 200)) {
          assert.equal(r.status, 429);
          assert.equal(r.body.error.code, "concurrency_limit_exceeded");
          assert.equal(r.retryAfter, "1");
        }
        assert.equal(glm.calls - before, 2);
      },
    );
    assert.ok(glm.maxInFlight <= 2, `GLM saw ${glm.maxInFlight} count_tokens calls at once`);
    await t.step(
      "counted against no other limit: RATE_LIMIT_RPM=5 is whole, usage is empty",
      async () => {
        const res = await fetch(`${s.url}/v1/chat/completions`, {
          method: "POST",
          headers: { ...bearer(s.apiKey), "content-type": "application/json" },
          body: JSON.stringify({ model: "glm-4.6", messages: [{ role: "user", content: "hi" }] }),
        });
        assert.equal(res.status, 200);
        assert.equal(res.headers.get("x-ratelimit-remaining-requests"), "4");
        await res.text();
        assert.equal((await s.today()).requests, 1);
      },
    );
  } finally {
    await s.close();
    await glm.close();
  }
});

Deno.test("count_tokens takes an upstream slot when the model has a cap: it waits for it, and gives it back", async () => {
  const glm = new CountingGlm();
  const s = await serveGateway({
    GLM_ANTHROPIC_BASE_URL: glm.baseUrl,
    UPSTREAM_CONCURRENCY: '{"glm-4.6": 1}',
    UPSTREAM_QUEUE_MS: "10000",
  }, "user_count_tokens_slot");
  try {
    s.fake.mode = "sse";
    s.fake.holdAfterFirstChunk = true;
    const holder = await fetch(`${s.url}/v1/chat/completions`, {
      method: "POST",
      headers: { ...bearer(s.apiKey), "content-type": "application/json" },
      body: JSON.stringify({
        model: "glm-4.6",
        stream: true,
        messages: [{ role: "user", content: "hi" }],
      }),
    });
    assert.equal(holder.status, 200);
    const { apiKey } = await s.app.services.users.provision("user_count_tokens_waits");
    const counting = countTokens(s.url, apiKey);
    await new Promise((r) => setTimeout(r, 300));
    assert.equal(glm.calls, 0, "count_tokens waits for the model's one slot");
    s.fake.release();
    await holder.text();
    const res = await counting;
    assert.equal(res.status, 200);
    assert.equal(glm.calls, 1);
    const userId = (await s.app.services.users.resolveKey(apiKey))!.id;
    await eventually(async () =>
      u64((await s.app.kv.get(keys.upstreamHeld("glm-4.6"))).value) === 0 &&
      u64((await s.app.kv.get(keys.upstreamUserHeld("glm-4.6", userId))).value) === 0
    );
    const holds = await Array.fromAsync(s.app.kv.list({ prefix: keys.upstreamHolds("glm-4.6") }));
    assert.equal(holds.length, 0, "its hold is gone");
  } finally {
    s.fake.holdAfterFirstChunk = false;
    s.fake.release();
    await s.close();
    await glm.close();
  }
});

Deno.test("a slot held by a count_tokens call of a process that died is freed once its hold expires", async () => {
  const s = await serveGateway({
    UPSTREAM_CONCURRENCY: '{"glm-4.6": 1}',
    UPSTREAM_QUEUE_MS: "10000",
  }, "user_hold_swept");
  try {
    // A dead process's hold: the model's one slot (on the one pool key), never renewed, never
    // released.
    const [{ id: keyId }] = await s.app.services.slots.pool.inService();
    await s.app.kv.atomic()
      .set(keys.upstreamHold("glm-4.6", "dead-hold"), {
        userId: "user_gone",
        exp: Date.now() - 1,
        keyId,
      })
      .sum(keys.upstreamHeld("glm-4.6"), 1n)
      .sum(keys.upstreamKeyHeld("glm-4.6", keyId), 1n)
      .sum(keys.upstreamUserHeld("glm-4.6", "user_gone"), 1n)
      .commit();
    const started = performance.now();
    const res = await fetch(`${s.url}/v1/chat/completions`, {
      method: "POST",
      headers: { ...bearer(s.apiKey), "content-type": "application/json" },
      body: JSON.stringify({ model: "glm-4.6", messages: [{ role: "user", content: "hi" }] }),
    });
    assert.equal(res.status, 200);
    await res.text();
    assert.ok(performance.now() - started < 5000);
    assert.equal(u64((await s.app.kv.get(keys.upstreamUserHeld("glm-4.6", "user_gone"))).value), 0);
    assert.equal(
      (await s.app.kv.get(keys.upstreamHold("glm-4.6", "dead-hold"))).versionstamp,
      null,
    );
  } finally {
    await s.close();
  }
});
