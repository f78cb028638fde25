import assert from "node:assert/strict";
import { recordUsage } from "../../../lib/usage/usage.ts";
import { bearer, clerkEnv, ClerkIssuer, json, testApp } from "../../support/helpers.ts";

const issuer = await ClerkIssuer.create();

Deno.test("operator API", async (t) => {
  const app = await testApp(clerkEnv(issuer, { ADMIN_USER_IDS: "user_boss, user_other_boss" }));
  try {
    const boss = bearer(await issuer.token("user_boss"));
    const alice = bearer(await issuer.token("user_alice"));
    await app.request("/api/key", { method: "POST", headers: alice });
    const { pricing } = app.services.config;
    const now = Date.now();
    await recordUsage(app.kv, pricing, {
      userId: "user_alice",
      model: "glm-4.6",
      promptTokens: 1_000_000,
      completionTokens: 500_000,
      at: now,
    });
    await recordUsage(app.kv, pricing, {
      userId: "user_alice",
      model: "glm-4.5-air",
      promptTokens: 100,
      completionTokens: 10,
      at: now - 5 * 86_400_000,
    });
    // Outside the 30-day window: not counted.
    await recordUsage(app.kv, pricing, {
      userId: "user_alice",
      model: "glm-4.6",
      promptTokens: 7,
      completionTokens: 7,
      at: now - 31 * 86_400_000,
    });

    await t.step("non-admins get 403 forbidden, no session 401", async () => {
      const res = await app.request("/api/admin/users", { headers: alice });
      assert.equal(res.status, 403);
      assert.equal((await json<{ error: { code: string } }>(res)).error.code, "forbidden");
      const anon = await app.request("/api/admin/users/user_alice/disable", { method: "POST" });
      assert.equal(anon.status, 401);
    });

    await t.step("lists users with 30-day usage", async () => {
      const res = await app.request("/api/admin/users", { headers: boss });
      assert.equal(res.status, 200);
      const { users } = await json<{ users: Array<Record<string, unknown>> }>(res);
      const a = users.find((u) => u.userId === "user_alice")!;
      assert.equal(a.status, "active");
      assert.match(String(a.keyPrefix), /^kw_/);
      assert.deepEqual(a.usage30d, {
        requests: 2,
        totalTokens: 1_500_110,
        costUsd: 1.700031, // 0.6 + 1.1 + (100 × 0.2 + 10 × 1.1) / 1e6, rounded to the nano-dollar
      });
      // The latest UTC day with usage in the window, and the limits in force.
      assert.equal(a.lastActiveAt, new Date(now).toISOString().slice(0, 10));
      assert.deepEqual(a.effectiveLimits, {
        rpm: 60,
        rpd: 1000,
        tokensPerDay: null,
        budgetUsdMonthly: null,
      });
      assert.equal(
        users.find((u) => u.userId === "user_boss"),
        undefined,
        "operators are users only once provisioned",
      );
    });

    await t.step("an operator cannot disable themselves (403), another operator can", async () => {
      await app.request("/api/key", { method: "POST", headers: boss });
      const self = await app.request("/api/admin/users/user_boss/disable", {
        method: "POST",
        headers: boss,
      });
      assert.equal(self.status, 403);
      const body = await json<{ error: { code: string; message: string } }>(self);
      assert.equal(body.error.code, "forbidden");
      assert.match(body.error.message, /your own account/);
      assert.equal((await app.services.users.get("user_boss"))?.status, "active");
      const other = bearer(await issuer.token("user_other_boss"));
      const res = await app.request("/api/admin/users/user_boss/disable", {
        method: "POST",
        headers: other,
      });
      assert.equal(res.status, 200);
      await res.body?.cancel();
      await app.services.users.setStatus("user_boss", "active");
    });

    await t.step("disable, enable and limit overrides", async () => {
      let res = await app.request("/api/admin/users/user_alice/disable", {
        method: "POST",
        headers: boss,
      });
      assert.equal(res.status, 200);
      assert.equal((await app.services.users.get("user_alice"))?.status, "disabled");
      // The changed user as the list shows them: their usage too, not zeros.
      const changed = (await json<{ user: Record<string, unknown> }>(res)).user;
      assert.equal(changed.status, "disabled");
      assert.deepEqual(changed.usage30d, {
        requests: 2,
        totalTokens: 1_500_110,
        costUsd: 1.700031,
      });
      assert.equal(changed.lastActiveAt, new Date(now).toISOString().slice(0, 10));
      res = await app.request("/api/admin/users/user_alice/enable", {
        method: "POST",
        headers: boss,
      });
      assert.equal((await app.services.users.get("user_alice"))?.status, "active");
      res = await app.request("/api/admin/users/user_alice/limits", {
        method: "PUT",
        headers: { ...boss, "content-type": "application/json" },
        body: JSON.stringify({ rpm: 5, tokensPerDay: 1000 }),
      });
      assert.equal(res.status, 200);
      const key = await json(await app.request("/api/key", { headers: alice }));
      assert.deepEqual(key.limits, {
        rpm: 5,
        rpd: 1000,
        tokensPerDay: 1000,
        budgetUsdMonthly: null,
      });
      res = await app.request("/api/admin/users/user_alice/limits", {
        method: "PUT",
        headers: { ...boss, "content-type": "application/json" },
        body: JSON.stringify({ rpm: null }),
      });
      assert.deepEqual((await app.services.users.get("user_alice"))?.limits, {
        tokensPerDay: 1000,
      });
    });

    await t.step("bad input names the problem; unknown user 404", async () => {
      let res = await app.request("/api/admin/users/user_alice/limits", {
        method: "PUT",
        headers: { ...boss, "content-type": "application/json" },
        body: JSON.stringify({ rpm: "lots" }),
      });
      assert.equal(res.status, 400);
      assert.match((await json<{ error: { message: string } }>(res)).error.message, /^rpm/);
      res = await app.request("/api/admin/users/user_alice/limits", {
        method: "PUT",
        headers: { ...boss, "content-type": "application/json" },
        body: JSON.stringify({ color: "red" }),
      });
      assert.equal(res.status, 400);
      res = await app.request("/api/admin/users/nobody/disable", { method: "POST", headers: boss });
      assert.equal(res.status, 404);
      assert.equal((await json<{ error: { code: string } }>(res)).error.code, "not_found");
    });

    await t.step("a deleted user: enable and limit changes are refused alike, 403", async () => {
      await app.services.users.markDeleted("user_gone");
      for (
        const [method, path, body] of [
          ["POST", "/api/admin/users/user_gone/enable", undefined],
          ["PUT", "/api/admin/users/user_gone/limits", JSON.stringify({ rpm: 5 })],
        ] as const
      ) {
        const res = await app.request(path, {
          method,
          headers: { ...boss, "content-type": "application/json" },
          body,
        });
        assert.equal(res.status, 403, path);
        assert.equal((await json<{ error: { code: string } }>(res)).error.code, "user_deleted");
      }
      assert.deepEqual((await app.services.users.get("user_gone"))?.limits, {});
    });
  } finally {
    await app.close();
  }
});
