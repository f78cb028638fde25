import assert from "node:assert/strict";
import { bearer, clerkEnv, ClerkIssuer, json, testApp } from "../support/helpers.ts";

const issuer = await ClerkIssuer.create();

Deno.test("key API", async (t) => {
  const app = await testApp(clerkEnv(issuer));
  try {
    const token = await issuer.token("user_alice");
    let first: Record<string, unknown> = {};
    await t.step("POST /api/key creates with 201, then 200 with the same key", async () => {
      const res = await app.request("/api/key", { method: "POST", headers: bearer(token) });
      assert.equal(res.status, 201);
      assert.match(res.headers.get("content-type") ?? "", /application\/json/);
      first = await json(res);
      assert.match(String(first.apiKey), /^kw_[A-Za-z0-9_-]{43}$/);
      assert.equal(first.baseUrl, "http://localhost:8000/v1");
      assert.equal(first.anthropicBaseUrl, "http://localhost:8000");
      assert.equal(first.mode, "proxy");
      assert.equal(first.keyPrefix, String(first.apiKey).slice(0, 7));
      assert.equal(first.userId, "user_alice");
      assert.deepEqual(first.limits, {
        rpm: 60,
        rpd: 1000,
        tokensPerDay: null,
        budgetUsdMonthly: null,
      });
      const again = await app.request("/api/key", { method: "POST", headers: bearer(token) });
      assert.equal(again.status, 200);
      assert.equal((await json(again)).apiKey, first.apiKey);
    });
    await t.step("GET and the provision-user aliases return the same key", async () => {
      for (
        const [method, path] of [
          ["GET", "/api/key"],
          ["GET", "/api/auth/provision-user"],
          ["POST", "/api/auth/provision-user"],
        ]
      ) {
        const res = await app.request(path, { method, headers: bearer(token) });
        assert.equal(res.status, 200, `${method} ${path}`);
        assert.equal((await json(res)).apiKey, first.apiKey);
      }
    });
    await t.step("GET on a new user provisions with 200", async () => {
      const res = await app.request("/api/key", { headers: bearer(await issuer.token("user_g")) });
      assert.equal(res.status, 200);
      assert.match(String((await json(res)).apiKey), /^kw_/);
    });
    await t.step("rotate gives a new key and the old one stops resolving", async () => {
      const res = await app.request("/api/key/rotate", { method: "POST", headers: bearer(token) });
      assert.equal(res.status, 200);
      const rotated = await json(res);
      assert.notEqual(rotated.apiKey, first.apiKey);
      assert.equal(await app.services.users.resolveKey(String(first.apiKey)), null);
      assert.equal(
        (await app.services.users.resolveKey(String(rotated.apiKey)))?.id,
        "user_alice",
      );
      const get = await app.request("/api/key", { headers: bearer(token) });
      assert.equal((await json(get)).apiKey, rotated.apiKey);
    });
  } finally {
    await app.close();
  }
});

Deno.test("60 concurrent provisioning calls for one new user: one 201, one key", async () => {
  const app = await testApp(clerkEnv(issuer));
  try {
    const token = await issuer.token("user_race");
    const results = await Promise.all(
      Array.from(
        { length: 60 },
        () => app.request("/api/key", { method: "POST", headers: bearer(token) }),
      ),
    );
    const statuses = results.map((r) => r.status);
    assert.equal(statuses.filter((s) => s === 201).length, 1);
    assert.equal(statuses.filter((s) => s === 200).length, 59);
    const keys = new Set(await Promise.all(results.map(async (r) => (await json(r)).apiKey)));
    assert.equal(keys.size, 1);
    let indexed = 0;
    for await (const _ of app.kv.list({ prefix: ["keys_by_hash"] })) indexed++;
    assert.equal(indexed, 1);
  } finally {
    await app.close();
  }
});

Deno.test("shared mode hands out the master key and base URL", async () => {
  const app = await testApp(clerkEnv(issuer, { KEY_MODE: "shared" }));
  try {
    const res = await app.request("/api/key", { headers: bearer(await issuer.token("user_s")) });
    assert.equal(res.status, 200);
    const body = await json(res);
    assert.equal(body.mode, "shared");
    assert.equal(body.baseUrl, "https://open.bigmodel.cn/api/paas/v4");
    assert.match(String(body.apiKey), /^glm-master/);
  } finally {
    await app.close();
  }
});
