/** Usage read back: userUsage by day and model, GET /api/usage, shared mode's POST /api/usage. */
import assert from "node:assert/strict";
import { recordUsage, usageTotalsSince, userUsage } from "../../lib/usage/usage.ts";
import { FakeGlm } from "../../testing/fakes/glm.ts";
import { bearer, json, MASTER_KEY, testApp } from "../support/helpers.ts";
import { utcDay } from "../../lib/core/utc.ts";

const DAY = 86_400_000;

Deno.test("userUsage: zero-filled days oldest first, per-model totals, costs", async () => {
  const kv = await Deno.openKv(":memory:");
  try {
    const pricing = {
      "glm-4.6": { input: 0.6, output: 2.2 },
      "glm-4.5-air": { input: 0.2, output: 1.1 },
    };
    const now = Date.UTC(2026, 10, 25, 10);
    await recordUsage(kv, pricing, {
      userId: "u",
      model: "glm-4.6",
      promptTokens: 1000,
      completionTokens: 500,
      at: now,
    });
    await recordUsage(kv, pricing, {
      userId: "u",
      model: "glm-4.6",
      promptTokens: 10,
      completionTokens: 5,
      at: now,
    });
    await recordUsage(kv, pricing, {
      userId: "u",
      model: "glm-4.5-air",
      promptTokens: 100,
      completionTokens: 100,
      at: now - 2 * DAY,
    });
    await recordUsage(kv, pricing, {
      userId: "u",
      model: "glm-4.6",
      promptTokens: 1,
      completionTokens: 1,
      at: now - 5 * DAY,
    });
    await recordUsage(kv, pricing, {
      userId: "other",
      model: "glm-4.6",
      promptTokens: 9,
      completionTokens: 9,
      at: now,
    });

    const u = await userUsage(kv, pricing, "u", 3, now);
    assert.deepEqual(u.days.map((d) => d.date), ["2026-11-23", "2026-11-24", "2026-11-25"]);
    assert.deepEqual(u.days[1], {
      date: "2026-11-24",
      requests: 0,
      promptTokens: 0,
      completionTokens: 0,
      totalTokens: 0,
      costUsd: 0,
    });
    assert.deepEqual(u.today, {
      requests: 2,
      promptTokens: 1010,
      completionTokens: 505,
      totalTokens: 1515,
      costUsd: 0.001717, // 1010 × 0.6 + 505 × 2.2, per million
    });
    assert.equal(u.days[0].costUsd, 0.00013);
    assert.deepEqual(u.byModel.map((m) => [m.model, m.requests, m.totalTokens]), [
      ["glm-4.6", 2, 1515],
      ["glm-4.5-air", 1, 200],
    ]);
    const all = await usageTotalsSince(kv, pricing, "u", "2026-11-01", now);
    assert.equal(all.requests, 4);
    assert.equal(all.totalTokens, 1717);
  } finally {
    kv.close();
  }
});

Deno.test("GET /api/usage with a session and with the caller's own key", async (t) => {
  const fake = new FakeGlm();
  const app = await testApp({
    GLM_BASE_URL: fake.baseUrl,
    RATE_LIMIT_RPM: "10",
    RATE_LIMIT_RPD: "50",
    TOKEN_LIMIT_DAILY: "1000",
  });
  try {
    const { token, userId } = await app.services.sessions.issueLocal("grace@example.test");
    const apiKey = String(
      (await json(await app.request("/api/key", { method: "POST", headers: bearer(token) })))
        .apiKey,
    );
    for (let i = 0; i < 2; i++) {
      const res = await app.request("/v1/chat/completions", {
        method: "POST",
        headers: bearer(apiKey),
        body: JSON.stringify({
          model: "glm-4.6",
          messages: [{ role: "user", content: "hi" }],
          max_tokens: 100,
        }),
      });
      assert.equal(res.status, 200);
      await res.text();
    }

    let bySession: Record<string, unknown> = {};
    await t.step("session: the contract's shape", async () => {
      const res = await app.request("/api/usage?days=7", { headers: bearer(token) });
      assert.equal(res.status, 200);
      assert.match(res.headers.get("content-type") ?? "", /application\/json/);
      bySession = await json(res);
      assert.deepEqual(Object.keys(bySession).sort(), [
        "byKey",
        "byModel",
        "days",
        "limits",
        "remaining",
        "state",
        "thisMonth",
        "today",
        "userId",
      ]);
      assert.deepEqual(bySession.state, { status: "active" });
      assert.equal(bySession.userId, userId);
      assert.deepEqual(bySession.limits, {
        rpm: 10,
        rpd: 50,
        tokensPerDay: 1000,
        budgetUsdMonthly: null,
      });
      assert.deepEqual(bySession.remaining, {
        minute: 8,
        day: 48,
        tokensToday: 964,
        budgetUsd: null,
      });
      const cost = (2 * 11 * 0.6 + 2 * 7 * 2.2) / 1e6;
      assert.deepEqual(bySession.today, {
        requests: 2,
        promptTokens: 22,
        completionTokens: 14,
        totalTokens: 36,
        costUsd: Math.round(cost * 1e9) / 1e9,
      });
      const days = bySession.days as Array<{ date: string; requests: number }>;
      assert.equal(days.length, 7);
      assert.equal(days[6].date, utcDay());
      assert.equal(days[6].requests, 2);
      assert.equal(days[0].date, utcDay(Date.now() - 6 * DAY));
      assert.deepEqual(bySession.byModel, [{ model: "glm-4.6", ...bySession.today as object }]);
      // Both requests came with the default key.
      assert.deepEqual(bySession.byKey, [{
        keyId: "default",
        name: "Default key",
        requests: 2,
        totalTokens: 36,
        costUsd: Math.round(cost * 1e9) / 1e9,
      }]);
    });
    await t.step("the caller's kw_ key gives the same answer; default is 30 days", async () => {
      const res = await app.request("/api/usage", { headers: bearer(apiKey) });
      assert.equal(res.status, 200);
      const body = await json(res);
      assert.equal((body.days as unknown[]).length, 30);
      assert.deepEqual(body.today, bySession.today);
      assert.deepEqual(body.remaining, bySession.remaining);
    });
    await t.step("bad days → 400 naming days; no credentials or a bad key → 401", async () => {
      for (const days of ["0", "91", "abc", "1.5", "-1", ""]) {
        const res = await app.request(`/api/usage?days=${days}`, { headers: bearer(token) });
        assert.equal(res.status, 400, days);
        const err = (await json<{ error: { code: string; message: string } }>(res)).error;
        assert.equal(err.code, "invalid_request");
        assert.match(err.message, /^days/);
      }
      const anon = await app.request("/api/usage");
      assert.equal(anon.status, 401);
      assert.equal((await json<{ error: { code: string } }>(anon)).error.code, "unauthorized");
      const bad = await app.request("/api/usage", { headers: bearer("kw_" + "B".repeat(43)) });
      assert.equal(bad.status, 401);
      assert.equal((await json<{ error: { code: string } }>(bad)).error.code, "invalid_api_key");
    });
    await t.step("POST /api/usage is a 404 in proxy mode", async () => {
      const res = await app.request("/api/usage", {
        method: "POST",
        headers: { ...bearer(token), "content-type": "application/json" },
        body: JSON.stringify({ model: "glm-4.6", promptTokens: 1, completionTokens: 1 }),
      });
      assert.equal(res.status, 404);
      assert.equal((await json<{ error: { code: string } }>(res)).error.code, "not_found");
    });
  } finally {
    await fake.close();
    await app.close();
  }
});

Deno.test("shared mode: no gateway, the master key handed out, POST /api/usage counts and refuses", async (t) => {
  const app = await testApp({ KEY_MODE: "shared", RATE_LIMIT_RPM: "3", TOKEN_LIMIT_DAILY: "100" });
  try {
    const { token, userId } = await app.services.sessions.issueLocal("linus@example.test");
    const report = (body: unknown) =>
      app.request("/api/usage", {
        method: "POST",
        headers: { ...bearer(token), "content-type": "application/json" },
        body: JSON.stringify(body),
      });
    await t.step("/v1 answers 404 not_found", async () => {
      for (const [method, path] of [["POST", "/v1/chat/completions"], ["GET", "/v1/models"]]) {
        const res = await app.request(path, { method, headers: bearer("kw_" + "A".repeat(43)) });
        assert.equal(res.status, 404, path);
        assert.equal((await json<{ error: { code: string } }>(res)).error.code, "not_found");
      }
    });
    await t.step("/api/key hands out the master key", async () => {
      const res = await app.request("/api/key", { headers: bearer(token) });
      assert.equal(res.status, 200);
      const body = await json(res);
      assert.equal(body.apiKey, MASTER_KEY);
      assert.equal(body.mode, "shared");
    });
    await t.step("bad reports → 400 naming the field, nothing counted", async () => {
      for (
        const [body, field] of [
          [{ model: "glm-4.6", promptTokens: -1, completionTokens: 0 }, /^promptTokens/],
          [{ model: "glm-4.6", promptTokens: 1.5, completionTokens: 0 }, /^promptTokens/],
          [{ promptTokens: 1, completionTokens: 0 }, /^model/],
          [{ model: "glm-4.6", promptTokens: 1 }, /^completionTokens/],
        ] as const
      ) {
        const res = await report(body);
        assert.equal(res.status, 400);
        assert.match((await json<{ error: { message: string } }>(res)).error.message, field);
      }
      const anon = await app.request("/api/usage", { method: "POST", body: "{}" });
      assert.equal(anon.status, 401);
    });
    await t.step("reports count against the limits and 403 once spent", async () => {
      const first = await report({ model: "glm-4.6", promptTokens: 60, completionTokens: 10 });
      assert.equal(first.status, 200);
      assert.equal(first.headers.get("x-ratelimit-remaining-requests"), "2");
      assert.deepEqual(await json(first), {
        ok: true,
        remaining: { minute: 2, day: 999, tokensToday: 30, budgetUsd: null },
      });
      const second = await report({ model: "glm-4.6", promptTokens: 40, completionTokens: 0 });
      assert.equal(second.status, 200); // crosses the token quota: allowed
      const third = await report({ model: "glm-4.6", promptTokens: 1, completionTokens: 1 });
      assert.equal(third.status, 403);
      assert.equal(third.headers.get("x-should-retry"), "false");
      assert.match(third.headers.get("retry-after") ?? "", /^\d+$/);
      assert.equal((await json<{ error: { code: string } }>(third)).error.code, "quota_exceeded");
      const usage = await userUsage(app.kv, app.services.config.pricing, userId, 1);
      assert.equal(usage.today.requests, 2);
      assert.equal(usage.today.totalTokens, 110);
    });
    await t.step("the request limit applies too", async () => {
      await app.services.users.setLimits(userId, { tokensPerDay: 0 });
      const res = await report({ model: "glm-4.6", promptTokens: 1, completionTokens: 1 });
      assert.equal(res.status, 200); // third of rpm 3
      const limited = await report({ model: "glm-4.6", promptTokens: 1, completionTokens: 1 });
      assert.equal(limited.status, 429);
      assert.equal(
        (await json<{ error: { code: string } }>(limited)).error.code,
        "rate_limit_exceeded",
      );
      assert.match(limited.headers.get("retry-after") ?? "", /^[1-9]\d*$/);
    });
  } finally {
    await app.close();
  }
});
