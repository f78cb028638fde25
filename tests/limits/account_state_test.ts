/**
 * The account's true state: GET /api/usage's `state` after real gateway requests
 * spend each limit, and /api/key* refusing a disabled or deleted user (CONTRACT §5).
 */
import assert from "node:assert/strict";
import { accountState } from "../../lib/limits/account_state.ts";
import { FakeGlm } from "../../testing/fakes/glm.ts";
import { bearer, clerkEnv, ClerkIssuer, json, testApp } from "../support/helpers.ts";

const issuer = await ClerkIssuer.create();

const chat = (apiKey: string) => ({
  method: "POST",
  headers: { ...bearer(apiKey), "content-type": "application/json" },
  body: JSON.stringify({
    model: "glm-4.6",
    messages: [{ role: "user", content: "hi" }],
    max_tokens: 7,
  }),
});

/** A user with a key, on an app with these limits, before a fake GLM. */
async function setUp(env: Record<string, string>) {
  const fake = new FakeGlm();
  const app = await testApp(clerkEnv(issuer, { GLM_BASE_URL: fake.baseUrl, ...env }));
  const token = await issuer.token("user_state");
  const key = await json(await app.request("/api/key", { method: "POST", headers: bearer(token) }));
  const apiKey = String(key.apiKey);
  return {
    app,
    token,
    apiKey,
    state: async () => {
      const res = await app.request("/api/usage?days=1", { headers: bearer(token) });
      assert.equal(res.status, 200);
      return (await json(res)).state as Record<string, unknown>;
    },
    /** Sends chat requests until the gateway refuses one; returns the refusal. */
    spend: async () => {
      for (let i = 0; i < 50; i++) {
        const res = await app.request("/v1/chat/completions", chat(apiKey));
        if (res.status !== 200) return { status: res.status, body: await json(res) };
        await res.text();
      }
      throw new Error("never refused");
    },
    close: async () => {
      await app.close();
      await fake.close();
    },
  };
}

const nextUtcMidnight = () => new Date(Math.ceil((Date.now() + 1) / 86_400_000) * 86_400_000);
const nextUtcMonth = () => {
  const d = new Date();
  return new Date(Date.UTC(d.getUTCFullYear(), d.getUTCMonth() + 1, 1));
};

Deno.test("state: active, then paused by each limit the gateway enforces", async (t) => {
  await t.step("requests per day: paused until 00:00 UTC", async () => {
    const s = await setUp({ RATE_LIMIT_RPD: "2" });
    try {
      assert.deepEqual(await s.state(), { status: "active" });
      const refused = await s.spend();
      assert.equal(refused.status, 403);
      assert.deepEqual(await s.state(), {
        status: "paused",
        reason: "requests_per_day",
        reasons: ["requests_per_day"],
        until: nextUtcMidnight().toISOString(),
      });
    } finally {
      await s.close();
    }
  });
  await t.step("tokens per day: paused until 00:00 UTC", async () => {
    // The fake meters 18 tokens a request and each reserves 13 (a 6-token prompt estimate and
    // max_tokens 7): two requests use the 36 tokens up exactly, the third is refused.
    const s = await setUp({ TOKEN_LIMIT_DAILY: "36" });
    try {
      const refused = await s.spend();
      assert.equal(refused.status, 403);
      assert.equal((refused.body.error as Record<string, string>).code, "quota_exceeded");
      const state = await s.state();
      assert.equal(state.status, "paused");
      assert.equal(state.reason, "tokens_per_day");
      assert.equal(state.until, nextUtcMidnight().toISOString());
    } finally {
      await s.close();
    }
  });
  await t.step("monthly budget: paused until the 1st (UTC)", async () => {
    // glm-4.6 costs $0.6 / $2.2 per million tokens: 11 + 7 tokens are $0.000022 a request, and
    // each reserves $0.000019, so two requests spend $0.000044 exactly.
    const s = await setUp({ BUDGET_USD_MONTHLY: "0.000044" });
    try {
      const refused = await s.spend();
      assert.equal(refused.status, 403);
      const state = await s.state();
      assert.equal(state.status, "paused");
      assert.equal(state.reason, "budget_monthly");
      assert.equal(state.until, nextUtcMonth().toISOString());
    } finally {
      await s.close();
    }
  });
});

Deno.test("state: disabled and deleted; /api/key* answers 403", async (t) => {
  const s = await setUp({ ADMIN_USER_IDS: "user_admin" });
  try {
    const admin = await issuer.token("user_admin");
    const res = await s.app.request("/api/admin/users/user_state/disable", {
      method: "POST",
      headers: bearer(admin),
    });
    assert.equal(res.status, 200);
    await res.text();
    await t.step("the gateway refuses, and the state says why", async () => {
      const refused = await s.spend();
      assert.equal(refused.status, 403);
      assert.deepEqual(await s.state(), { status: "disabled" });
    });
    for (
      const [method, path] of [
        ["GET", "/api/key"],
        ["POST", "/api/key"],
        ["POST", "/api/key/rotate"],
        ["GET", "/api/auth/provision-user"],
        ["POST", "/api/auth/provision-user"],
      ]
    ) {
      await t.step(`${method} ${path} → 403 user_disabled`, async () => {
        const res = await s.app.request(path, { method, headers: bearer(s.token) });
        assert.equal(res.status, 403);
        assert.match(res.headers.get("content-type") ?? "", /application\/json/);
        const body = await json(res);
        assert.equal((body.error as Record<string, string>).code, "user_disabled");
        assert.ok(!JSON.stringify(body).includes("kw_"), "no key in the refusal");
      });
    }
    await t.step("the key did not rotate while disabled", async () => {
      assert.equal((await s.app.services.users.resolveKey(s.apiKey))?.id, "user_state");
    });
    await t.step("enabled again: 200 and the same key", async () => {
      await s.app.services.users.setStatus("user_state", "active");
      const res = await s.app.request("/api/key", { headers: bearer(s.token) });
      assert.equal(res.status, 200);
      assert.equal((await json(res)).apiKey, s.apiKey);
      assert.deepEqual(await s.state(), { status: "active" });
    });
    await t.step("deleted: 403 user_deleted, state deleted", async () => {
      await s.app.services.users.markDeleted("user_state");
      const res = await s.app.request("/api/key", { headers: bearer(s.token) });
      assert.equal(res.status, 403);
      assert.equal(((await json(res)).error as Record<string, string>).code, "user_deleted");
      assert.deepEqual(await s.state(), { status: "deleted" });
    });
  } finally {
    await s.close();
  }
});

Deno.test("accountState: the longest pause wins, every spent limit is listed", () => {
  const now = Date.UTC(2026, 10, 26, 5, 45);
  const limits = { rpm: 60, rpd: 10, tokensPerDay: 100, budgetUsdMonthly: 1 };
  assert.deepEqual(
    accountState({ status: "active" }, limits, {
      requestsLeftToday: 0,
      tokensToday: 100,
      spendNanoMonth: 1e9,
    }, now),
    {
      status: "paused",
      reason: "budget_monthly",
      reasons: ["requests_per_day", "tokens_per_day", "budget_monthly"],
      until: "2026-12-01T00:00:00.000Z",
    },
  );
  assert.deepEqual(
    accountState({ status: "active" }, { ...limits, tokensPerDay: null, budgetUsdMonthly: null }, {
      requestsLeftToday: 1,
      tokensToday: 10 ** 9,
      spendNanoMonth: 10 ** 15,
    }, now),
    { status: "active" },
    "unlimited quotas never pause",
  );
});
