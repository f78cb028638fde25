/**
 * Which requests the gateway lets through: rpm, rpd, token quotas and budgets exact under
 * concurrency, and keys and user state (rotation, disable, deletion, limit changes) in force at
 * once — also when the change lands while an admission commits, or in another process.
 */
import assert from "node:assert/strict";
import { Gateway } from "../../lib/gateway/gateway.ts";
import { UpstreamSlots } from "../../lib/limits/upstream/slots.ts";
import { Ledger } from "../../lib/limits/admission.ts";
import { openaiChat } from "../../lib/gateway/protocols/openai_chat.ts";
import { userUsage } from "../../lib/usage/usage.ts";
import { FakeGlm } from "../../testing/fakes/glm.ts";
import {
  bearer,
  eventually,
  interceptCommits,
  json,
  type TestApp,
  testApp,
} from "../support/helpers.ts";
import { assertRateHeaders, CHAT, drain, errorOf, setup } from "../support/gateway_setup.ts";

Deno.test("20 concurrent requests with rpm 5: exactly 5 reach the upstream, 15 get 429", async () => {
  const s = await setup({ RATE_LIMIT_RPM: "5" });
  try {
    const results = await Promise.all(Array.from({ length: 20 }, () => s.chat()));
    const ok = results.filter((r) => r.status === 200);
    const limited = results.filter((r) => r.status === 429);
    assert.equal(ok.length, 5);
    assert.equal(limited.length, 15);
    assert.equal(s.fake.count, 5);
    for (const r of limited) {
      assert.match(r.headers.get("retry-after") ?? "", /^[1-9]\d*$/);
      assert.ok(Number(r.headers.get("retry-after")) <= 12);
      assertRateHeaders(r);
      assert.equal(r.headers.get("x-ratelimit-remaining-requests"), "0");
      assert.equal((await errorOf(r)).code, "rate_limit_exceeded");
    }
    for (const r of ok) await drain(r);
    assert.equal((await s.usage()).requests, 5);
  } finally {
    await s.close();
  }
});

Deno.test("requests per day are exact under concurrency and override per user", async (t) => {
  const s = await setup({ RATE_LIMIT_RPM: "1000", RATE_LIMIT_RPD: "7" });
  try {
    await t.step("12 concurrent against rpd 7 admit 7", async () => {
      const results = await Promise.all(Array.from({ length: 12 }, () => s.chat()));
      assert.equal(results.filter((r) => r.status === 200).length, 7);
      assert.equal(s.fake.count, 7);
      const limited = results.filter((r) => r.status === 403);
      assert.equal(limited.length, 5);
      const retry = Number(limited[0].headers.get("retry-after"));
      const untilMidnight = 86_400 - Math.floor((Date.now() % 86_400_000) / 1000);
      assert.ok(Math.abs(retry - untilMidnight) <= 2, `${retry} vs ${untilMidnight}`);
      assert.equal((await errorOf(limited[0])).code, "quota_exceeded");
      for (const r of results) await drain(r);
    });
    await t.step("a per-user override raises the day limit at once", async () => {
      await s.app.services.users.setLimits(s.userId, { rpd: 9 });
      assert.equal((await s.chat()).status, 200);
      assert.equal((await s.chat()).status, 200);
      const third = await s.chat();
      assert.equal(third.status, 403);
      await third.body?.cancel();
      assert.equal(s.fake.count, 9);
    });
  } finally {
    await s.close();
  }
});

Deno.test("token quota: back to back, exactly the requests whose reservations fit get through", async () => {
  // Each request reserves its prompt estimate (6) + max_tokens (8) = 14 tokens and uses 18.
  const s = await setup({ TOKEN_LIMIT_DAILY: "50" });
  try {
    for (let i = 1; i <= 3; i++) {
      const r = await s.chat({ ...CHAT, max_tokens: 8 });
      assert.equal(r.status, 200);
      await r.text();
      // No pause: the usage is committed before the answer ends.
      assert.deepEqual(await s.usage(), {
        requests: i,
        promptTokens: 11 * i,
        completionTokens: 7 * i,
      });
    }
    const refused = await s.chat({ ...CHAT, max_tokens: 8 }); // 54 ≥ 50
    assert.equal(refused.status, 403);
    assertRateHeaders(refused);
    const retry = Number(refused.headers.get("retry-after"));
    const untilMidnight = 86_400 - Math.floor((Date.now() % 86_400_000) / 1000);
    assert.ok(Math.abs(retry - untilMidnight) <= 2, `${retry} vs ${untilMidnight}`);
    assert.equal(refused.headers.get("x-should-retry"), "false");
    const error = await errorOf(refused);
    assert.equal(error.code, "quota_exceeded");
    assert.match(error.message, /daily token quota of 50 tokens is used up/i);
    assert.equal(s.fake.count, 3);
    assert.equal((await s.usage()).requests, 3);
  } finally {
    await s.close();
  }
});

Deno.test("token quota: a reservation that cannot fit is refused at once, saying how to fit", async () => {
  const s = await setup({ TOKEN_LIMIT_DAILY: "1000" });
  try {
    // No max_tokens: OUTPUT_RESERVE_TOKENS (4096) output tokens are reserved.
    const r = await s.chat();
    assert.equal(r.status, 403);
    assert.equal(r.headers.get("x-should-retry"), "false");
    const error = await errorOf(r);
    assert.equal(error.code, "quota_exceeded");
    assert.match(error.message, /reserves 4,102 tokens .*up to 4,096 output tokens.*1,000 tokens/);
    assert.match(error.message, /lower max_tokens/);
    const ok = await s.chat({ ...CHAT, max_completion_tokens: 100 });
    assert.equal(ok.status, 200);
    await ok.text();
    assert.equal(s.fake.count, 1);
  } finally {
    await s.close();
  }
});

Deno.test("monthly budget: refused once spent, with Retry-After until next month", async () => {
  const s = await setup({
    PRICING: JSON.stringify({ "glm-4.6": { input: 1000, output: 1000 } }), // 18 tokens = $0.018
    BUDGET_USD_MONTHLY: "0.03",
  });
  try {
    for (let i = 0; i < 2; i++) {
      const r = await s.chat({ ...CHAT, max_tokens: 4 }); // reserves 10 tokens = $0.01
      assert.equal(r.status, 200);
      await r.text();
    }
    const c = await s.chat({ ...CHAT, max_tokens: 4 });
    assert.equal(c.status, 403);
    const now = new Date();
    const nextMonth = Date.UTC(now.getUTCFullYear(), now.getUTCMonth() + 1, 1);
    const retry = Number(c.headers.get("retry-after"));
    assert.ok(Math.abs(retry - (nextMonth - now.getTime()) / 1000) <= 2);
    assert.equal(c.headers.get("x-should-retry"), "false");
    assert.equal((await errorOf(c)).code, "quota_exceeded");
    assert.equal(s.fake.count, 2);
  } finally {
    await s.close();
  }
});

Deno.test("keys and user state", async (t) => {
  const s = await setup();
  try {
    await t.step("missing, malformed and unknown keys → 401 invalid_api_key", async () => {
      for (const key of ["", "sk-nope", "kw_" + "A".repeat(43)]) {
        const res = await s.chat(CHAT, { key });
        assert.equal(res.status, 401);
        assert.equal((await errorOf(res)).code, "invalid_api_key");
      }
      const none = await s.app.request("/v1/chat/completions", {
        method: "POST",
        body: JSON.stringify(CHAT),
      });
      assert.equal(none.status, 401);
      await none.body?.cancel();
    });
    await t.step("rotated key → 401 at once, the new key works", async () => {
      assert.equal((await s.chat()).status, 200);
      const rot = await s.app.request("/api/key/rotate", {
        method: "POST",
        headers: bearer(s.session),
      });
      assert.equal(rot.status, 200);
      const fresh = String((await json(rot)).apiKey);
      const old = await s.chat();
      assert.equal(old.status, 401);
      assert.equal((await errorOf(old)).code, "invalid_api_key");
      const ok = await s.chat(CHAT, { key: fresh });
      assert.equal(ok.status, 200);
      await ok.text();
      s.apiKey = fresh;
    });
    await t.step("disabled user → 403 user_disabled at once, enabled again → 200", async () => {
      await s.app.services.users.setStatus(s.userId, "disabled");
      const res = await s.chat();
      assert.equal(res.status, 403);
      assertRateHeaders(res);
      assert.equal((await errorOf(res)).code, "user_disabled");
      await s.app.services.users.setStatus(s.userId, "active");
      const again = await s.chat();
      assert.equal(again.status, 200);
      await again.text();
    });
    await t.step("deleted user (key revoked) → 401, nothing counted", async () => {
      const before = await s.usage();
      await s.app.services.users.markDeleted(s.userId);
      const res = await s.chat();
      assert.equal(res.status, 401);
      assert.equal((await errorOf(res)).code, "invalid_api_key");
      assert.deepEqual(await s.usage(), before);
    });
  } finally {
    await s.close();
  }
});

Deno.test("a key revoked while requests race never gets through after the revocation", async () => {
  const s = await setup({ RATE_LIMIT_RPM: "1000" });
  s.fake.jsonDelayMs = 50; // a call begun before the revocation's commit is seen cancelled
  try {
    const racing = Array.from({ length: 30 }, () => s.chat());
    const revoked = s.app.services.users.markDeleted(s.userId);
    const results = await Promise.all(racing);
    await revoked;
    for (const r of results) {
      assert.ok([200, 401].includes(r.status), String(r.status));
      await drain(r);
    }
    // Every admitted request was answered upstream (a call begun for one the revocation refused
    // was cancelled), and none is admitted any more.
    const admitted = results.filter((r) => r.status === 200).length;
    await eventually(() => s.fake.count - s.fake.requestsAborted === admitted);
    assert.equal((await s.chat()).status, 401);
  } finally {
    await s.close();
  }
});

Deno.test("a disable or a limit change holds for every request after it, for users with quotas too", async (t) => {
  // With a quota, each admission reads the user's counters, and a refusal read fresh must not
  // leave the user record remembered from before the change in use for the next request.
  const s = await setup({ TOKEN_LIMIT_DAILY: "1000000" });
  const statuses = async (n: number) => {
    const got: number[] = [];
    for (let i = 0; i < n; i++) {
      const res = await s.chat();
      got.push(res.status);
      await res.body?.cancel();
    }
    return got;
  };
  try {
    await t.step("disabled: 403 every time, not just the first", async () => {
      assert.deepEqual(await statuses(2), [200, 200]);
      await s.app.services.users.setStatus(s.userId, "disabled");
      assert.deepEqual(await statuses(4), [403, 403, 403, 403]);
      await s.app.services.users.setStatus(s.userId, "active");
      assert.deepEqual(await statuses(2), [200, 200]);
    });
    await t.step("rpd lowered below today's count: 403 every time", async () => {
      await s.app.services.users.setLimits(s.userId, { rpd: 1 });
      assert.deepEqual(await statuses(3), [403, 403, 403]);
      await s.app.services.users.setLimits(s.userId, { rpd: null });
    });
    await t.step("a budget spent: 403 every time", async () => {
      assert.deepEqual(await statuses(1), [200]);
      await s.app.services.users.setLimits(s.userId, { budgetUsdMonthly: 0.000001 });
      assert.deepEqual(await statuses(3), [403, 403, 403]);
    });
  } finally {
    await s.close();
  }
});

Deno.test("a disable holds after another user's request has seen the change first", async () => {
  // Without quotas nothing is read per request: the commit's check of the cache epoch finds the
  // change. Here another user's request meets the moved epoch first; the disabled user's record,
  // remembered from before, must not then pass as current.
  const s = await setup();
  try {
    const other = await s.app.services.users.provision("user_other");
    const ok = async (key?: string) => {
      const res = await s.chat(CHAT, key ? { key } : undefined);
      await res.body?.cancel();
      return res.status;
    };
    assert.deepEqual([await ok(), await ok(other.apiKey)], [200, 200]);
    await s.app.services.users.setStatus(s.userId, "disabled");
    assert.equal(await ok(other.apiKey), 200);
    assert.deepEqual([await ok(), await ok(), await ok()], [403, 403, 403]);
  } finally {
    await s.close();
  }
});

/** A KV whose next atomic commit first runs `before` (to land a write between read and commit). */
/** A KV that runs `hook.before` (once) just before its next atomic commit. */
function kvWithHook(kv: Deno.Kv) {
  const hook = { before: null as null | (() => Promise<unknown>) };
  const proxy = interceptCommits(kv, async (commit) => {
    const before = hook.before;
    hook.before = null;
    if (before) await before();
    return await commit();
  });
  return { kv: proxy, hook };
}

Deno.test("a change landing while the admission commits: the upstream call, begun at once, is cancelled and the refusal answered", async (t) => {
  const s = await setup();
  try {
    const { kv, hook } = kvWithHook(s.app.kv);
    const { config, log } = s.app.services;
    const ledger = new Ledger(kv, config, { log });
    const slots = new UpstreamSlots(kv, config, ledger, log);
    const gateway = new Gateway({ config, kv, log, ledger, slots });
    const call = () =>
      gateway.handle(
        openaiChat,
        new Request("http://localhost/v1/chat/completions", {
          method: "POST",
          headers: bearer(s.apiKey),
          body: JSON.stringify(CHAT),
        }),
      ).then(async (r) => (await r.text(), r.status), (e) => e.code);
    await t.step(
      "an admitted request goes through (and this process remembers the user)",
      async () => {
        assert.equal(await call(), 200);
        assert.equal(s.fake.count, 1);
      },
    );
    // The upstream now takes its time: an optimistic call is still waiting when it is cancelled.
    s.fake.mode = "slow_headers";
    await t.step("disable → 403", async () => {
      hook.before = () => s.app.services.users.setStatus(s.userId, "disabled");
      assert.equal(await call(), "user_disabled");
      assert.equal(s.fake.count, 2, "the call began while the admission committed");
      await eventually(() => s.fake.requestsAborted === 1);
      await s.app.services.users.setStatus(s.userId, "active");
    });
    await t.step(
      "rotation → 401; after a conflict the next call waits for the commit",
      async () => {
        // The disable's conflict marked the user contended: no call starts before the commit.
        hook.before = () => s.app.services.users.rotate(s.userId);
        assert.equal(await call(), "invalid_api_key");
        assert.equal(s.fake.count, 2);
      },
    );
    await t.step("only the admitted request counted", async () => {
      assert.equal((await s.usage()).requests, 1);
    });
    await ledger.close();
  } finally {
    await s.close();
  }
});

Deno.test("another process takes the last of the allowance while this one commits: cancelled upstream, 403", async () => {
  const dir = await Deno.makeTempDir();
  const fake = new FakeGlm();
  const env = {
    GLM_BASE_URL: fake.baseUrl,
    DENO_KV_PATH: `${dir}/kv.sqlite3`,
    RATE_LIMIT_RPD: "3",
  };
  const a = await testApp(env);
  const b = await testApp(env);
  try {
    const { apiKey } = await a.services.users.provision("user_race");
    const chat = (app: TestApp) =>
      app.request("/v1/chat/completions", {
        method: "POST",
        headers: { ...bearer(apiKey), "content-type": "application/json" },
        body: JSON.stringify(CHAT),
      });
    const first = await chat(a); // A now remembers the user's rate entry (1 of 3 used today)
    assert.equal(first.status, 200);
    await first.text();
    for (let i = 0; i < 2; i++) { // B takes the other two
      const res = await chat(b);
      assert.equal(res.status, 200);
      await res.text();
    }
    fake.mode = "slow_headers";
    // A decides on what it remembers (1 used: admitted, with one to spare), starts the upstream
    // call, and its commit fails on B's writes: decided again on fresh reads, refused, and the
    // call cancelled.
    const third = await chat(a);
    assert.equal(third.status, 403);
    assert.equal(
      (await json<{ error: { code: string } }>(third)).error.code,
      "quota_exceeded",
    );
    assert.equal(third.headers.get("x-should-retry"), "false");
    assert.equal(fake.count, 4, "the call began while the admission committed");
    await eventually(() => fake.requestsAborted === 1);
    const usage = await userUsage(a.kv, a.services.config.pricing, "user_race", 1);
    assert.equal(usage.today.requests, 3);
  } finally {
    await a.close();
    await b.close();
    await fake.close();
    await Deno.remove(dir, { recursive: true });
  }
});
