/**
 * CONTRACT §2 GLM_API_KEY (a pool), §5 "Upstream capacity is shared fairly" and "Upstream
 * refusals": several GLM keys served as one. A key GLM refuses is left out (with one alert
 * naming its last 4 characters) and the request is sent again on another, charged once; with no
 * key in service every request gets 503 upstream_unavailable; the keys never leave the server.
 */
import assert from "node:assert/strict";
import { keys, u64 } from "../../lib/core/kv.ts";
import { eventually, serveGateway } from "../support/helpers.ts";
import { CHAT, post } from "../support/gateway_setup.ts";
import { localUserId } from "../../lib/identity/sessions.ts";

const KEY_A = "glm-pool-SECRET-first-0123456789.aaaa";
const KEY_B = "glm-pool-SECRET-second-9876543210.bbbb";

/** Every entry of the KV, keys and values, as text. */
async function dump(kv: Deno.Kv): Promise<string> {
  const parts: string[] = [];
  for await (const e of kv.list({ prefix: [] })) {
    parts.push(
      JSON.stringify(e.key),
      JSON.stringify(e.value, (_, v) => typeof v === "bigint" ? String(v) : v),
    );
  }
  return parts.join("\n");
}

function keyOf(authorization: string | null): string {
  return (authorization ?? "").replace(/^Bearer /, "");
}

for (const capped of [false, true]) {
  Deno.test(`two pool keys, one out of balance (1113)${capped ? ", with upstream slots" : ""}: every request is served on the other, charged once, one alert`, async () => {
    const s = await serveGateway({
      GLM_API_KEY: `${KEY_A},${KEY_B}`,
      RATE_LIMIT_RPM: "1000",
      ...(capped ? { UPSTREAM_CONCURRENCY: '{"glm-4.6": 1}' } : {}),
    }, `user_pool_${capped}`);
    try {
      s.fake.refusedKeys.set(KEY_A, "balance");
      const texts: string[] = [];
      for (let i = 0; i < 6; i++) {
        const res = await post(s.url, s.apiKey);
        const text = await res.text();
        texts.push(text);
        assert.equal(res.status, 200, text);
      }
      const sent = s.fake.requests.map((r) => keyOf(r.authorization));
      assert.equal(sent.filter((k) => k === KEY_A).length, 1, "the refused key is left out");
      assert.equal(sent.filter((k) => k === KEY_B).length, 6);
      // Charged once per request: the fake's usage (18 tokens) six times, nothing for the refusal.
      assert.deepEqual(
        [(await s.today()).requests, (await s.today()).totalTokens],
        [6, 6 * 18],
      );
      const alerts = await eventually(async () => {
        const recent = await s.app.services.events.recentAlerts();
        return recent.length ? recent : null;
      });
      const balance = alerts!.filter((a) => a.type === "upstream.balance_exhausted");
      assert.equal(balance.length, 1);
      assert.equal((balance[0] as { keyHint?: string }).keyHint, "aaaa");
      if (capped) {
        // Every slot given back, on both keys.
        const [a, b] = await s.app.services.slots.pool.inService().then(() =>
          s.app.services.slots.pool.keys
        );
        for (const key of [a, b]) {
          const held = await s.app.kv.get(keys.upstreamKeyHeld("glm-4.6", key.id));
          assert.equal(u64(held.value), 0, `key …${key.hint} holds nothing`);
        }
      }
      // The keys never leave the server: not in an answer, a log line or a KV value.
      const kvText = await dump(s.app.kv);
      for (const secret of [KEY_A, KEY_B]) {
        assert.ok(!texts.some((t) => t.includes(secret)));
        assert.ok(!s.app.logs.some((l) => l.includes(secret)), "a log line holds a pool key");
        assert.ok(!kvText.includes(secret), "KV holds a pool key");
      }
    } finally {
      await s.close();
    }
  });
}

Deno.test("/admin's upstream card shows each pool key by its last 4 characters: in service or left out", async () => {
  const operator = await localUserId("op@example.com");
  const s = await serveGateway(
    { GLM_API_KEY: `${KEY_A},${KEY_B}`, ADMIN_USER_IDS: operator },
    "user_pool_admin",
  );
  try {
    s.fake.refusedKeys.set(KEY_B, "balance");
    for (let i = 0; i < 3; i++) assert.equal((await post(s.url, s.apiKey)).status, 200);
    const { token } = await s.app.services.sessions.issueLocal("op@example.com");
    const res = await fetch(`${s.url}/admin`, { headers: { cookie: `__session=${token}` } });
    assert.equal(res.status, 200);
    const html = await res.text();
    const card = html.slice(html.indexOf('data-testid="pool-keys"'));
    assert.match(card, /…aaaa<\/code><\/td><td>in service/);
    assert.match(
      card,
      /…bbbb<\/code><\/td><td><span class="text-warn">left out until [^<]+\(balance exhausted\)/,
    );
    assert.ok(!html.includes(KEY_A) && !html.includes(KEY_B), "the page holds a pool key");
    assert.ok(!html.includes('data-testid="no-key-in-service"'));
  } finally {
    await s.close();
  }
});

Deno.test("every pool key refused: 503 upstream_unavailable, nothing counted, upstream.unavailable", async () => {
  const s = await serveGateway({ GLM_API_KEY: `${KEY_A},${KEY_B}` }, "user_pool_none");
  try {
    s.fake.refusedKeys.set(KEY_A, "key_rejected");
    s.fake.refusedKeys.set(KEY_B, "balance");
    for (let i = 0; i < 3; i++) {
      const res = await post(s.url, s.apiKey);
      assert.equal(res.status, 503);
      const body = await res.json();
      assert.equal(body.error.code, "upstream_unavailable");
      assert.match(body.error.message, /Nothing was counted/);
      assert.equal(res.headers.get("x-should-retry"), "false");
    }
    // Each key was tried once, then left out: the later requests never reached GLM.
    assert.equal(s.fake.count, 2);
    assert.deepEqual(await s.today(), {
      requests: 0,
      promptTokens: 0,
      completionTokens: 0,
      totalTokens: 0,
      costUsd: 0,
    });
    const alerts = await eventually(async () => {
      const recent = await s.app.services.events.recentAlerts();
      return recent.some((a) => a.type === "upstream.unavailable") ? recent : null;
    });
    const hints = alerts!.filter((a) => a.type !== "upstream.unavailable")
      .map((a) => `${a.type} ${(a as { keyHint?: string }).keyHint}`).sort();
    assert.deepEqual(hints, ["upstream.balance_exhausted bbbb", "upstream.key_rejected aaaa"]);
  } finally {
    await s.close();
  }
});

Deno.test("a request takes an upstream slot on the pool key with the most free slots", async () => {
  const s = await serveGateway({
    GLM_API_KEY: `${KEY_A},${KEY_B}`,
    UPSTREAM_CONCURRENCY: '{"glm-4.6": 2}',
  }, "user_pool_spread");
  const answers: Response[] = [];
  try {
    s.fake.mode = "sse";
    s.fake.holdAfterFirstChunk = true;
    const users = [s.apiKey];
    for (let i = 1; i < 4; i++) {
      users.push((await s.app.services.users.provision(`user_pool_spread_${i}`)).apiKey);
    }
    // Four streams held open, one user each: two slots on each key, never three on one.
    for (const key of users) {
      answers.push(await post(s.url, key, { ...CHAT, stream: true }));
      assert.equal(answers.at(-1)!.status, 200);
    }
    await eventually(() => s.fake.count === 4);
    const sent = s.fake.requests.map((r) => keyOf(r.authorization));
    assert.deepEqual(
      [sent.filter((k) => k === KEY_A).length, sent.filter((k) => k === KEY_B).length],
      [2, 2],
    );
    assert.deepEqual(sent.slice(0, 2).sort(), [KEY_A, KEY_B].sort(), "spread, not filled");
  } finally {
    s.fake.holdAfterFirstChunk = false;
    s.fake.release();
    for (const a of answers) await a.text().catch(() => {});
    await s.close();
  }
});
