/**
 * GET /api/requests (the caller's own log, by session or key) and GET /api/admin/requests
 * (operators, any filter combined): newest first, paginated by `next`, every query parameter
 * validated with an error naming it.
 */
import assert from "node:assert/strict";
import { FakeGlm } from "../../../testing/fakes/glm.ts";
import { bearer, clerkEnv, ClerkIssuer, json, testApp } from "../../support/helpers.ts";
import type { RequestsBody } from "../../../lib/api_types.ts";
import { utcDay } from "../../../lib/core/utc.ts";

const issuer = await ClerkIssuer.create();

Deno.test("the request log's listings: own and operators', filters, pages, validation", async (t) => {
  const fake = new FakeGlm();
  const app = await testApp(
    clerkEnv(issuer, { ADMIN_USER_IDS: "user_boss,user_boss2", GLM_BASE_URL: fake.baseUrl }),
  );
  try {
    const session = async (id: string) => bearer(await issuer.token(id));
    const keyOf = async (id: string) => {
      const res = await app.request("/api/key", { method: "POST", headers: await session(id) });
      return String((await json(res)).apiKey);
    };
    const alice = await keyOf("user_alice");
    const bob = await keyOf("user_bob");
    const chat = async (key: string, model = "glm-4.6") => {
      const res = await app.request("/v1/chat/completions", {
        method: "POST",
        headers: { ...bearer(key), "content-type": "application/json" },
        body: JSON.stringify({ model, messages: [{ role: "user", content: "hi" }] }),
      });
      await res.text();
      return res.status;
    };
    for (let i = 0; i < 3; i++) assert.equal(await chat(alice), 200);
    assert.equal(await chat(alice, "glm-4.5-air"), 200);
    assert.equal(await chat(bob), 200);
    assert.equal(await chat(bob), 200);
    fake.mode = "error500";
    assert.equal(await chat(bob), 500);
    fake.mode = "json";
    // A connected app's key: its requests carry its key id.
    const app1 = await app.services.users.createAppKey(
      "user_bob",
      { name: "VS Code", flow: "device" },
      20,
    );
    assert.equal(await chat(app1.apiKey), 200);

    const get = async (path: string, headers: HeadersInit) => {
      const res = await app.request(path, { headers });
      return { status: res.status, body: await json(res) };
    };
    const list = async (path: string, headers: HeadersInit) => {
      const { status, body } = await get(path, headers);
      assert.equal(status, 200, JSON.stringify(body));
      return body as unknown as RequestsBody;
    };
    const boss = await session("user_boss");

    await t.step("own requests, by session or by key, newest first", async () => {
      const bySession = await list("/api/requests", await session("user_alice"));
      const byKey = await list("/api/requests", bearer(alice));
      assert.deepEqual(byKey, bySession);
      assert.equal(bySession.requests.length, 4);
      assert.ok(bySession.requests.every((r) => r.userId === "user_alice"));
      assert.equal(bySession.requests[0].model, "glm-4.5-air", "the last one first");
      assert.equal(bySession.next, null);
    });

    await t.step("pages: limit and next walk the whole log once", async () => {
      const all = await list("/api/admin/requests", boss);
      assert.equal(all.requests.length, 8);
      const seen: string[] = [];
      let cursor: string | null = null;
      let pages = 0;
      do {
        const q: string = cursor ? `?limit=3&cursor=${cursor}` : "?limit=3";
        const page = await list(`/api/admin/requests${q}`, boss);
        assert.ok(page.requests.length <= 3);
        seen.push(...page.requests.map((r) => r.id));
        cursor = page.next;
        pages++;
      } while (cursor);
      assert.equal(pages, 3);
      assert.equal(seen.length, 8);
      assert.deepEqual(seen, all.requests.map((r) => r.id));
      const own: string[] = [];
      let next: string | null = null;
      do {
        const page = await list(
          `/api/requests?limit=1${next ? `&cursor=${next}` : ""}`,
          bearer(bob),
        );
        own.push(...page.requests.map((r) => r.id));
        next = page.next;
      } while (next);
      assert.equal(own.length, 4);
      assert.equal(new Set(own).size, 4);
    });

    await t.step("operator filters, each and combined", async () => {
      const ids = async (q: string) =>
        (await list(`/api/admin/requests?${q}`, boss)).requests.map((r) => [r.userId, r.model]);
      assert.equal((await ids("user=user_bob")).length, 4);
      assert.deepEqual(await ids("model=glm-4.5-air"), [["user_alice", "glm-4.5-air"]]);
      assert.deepEqual(await ids("status=500"), [["user_bob", "glm-4.6"]]);
      assert.deepEqual(await ids("user=user_bob&status=200&model=glm-4.6"), [
        ["user_bob", "glm-4.6"],
        ["user_bob", "glm-4.6"],
        ["user_bob", "glm-4.6"],
      ]);
      assert.equal((await ids("keyId=default")).length, 7);
      assert.deepEqual(await ids(`keyId=${app1.app.id}`), [["user_bob", "glm-4.6"]]);
      assert.equal((await ids("keyId=k_nothing")).length, 0);
      const today = utcDay(Date.now());
      assert.equal((await ids(`from=${today}&to=${today}`)).length, 8);
      assert.equal((await ids(`to=${today}T00:00:00Z`)).length, 0);
      assert.equal((await ids(`from=${new Date(Date.now() + 60_000).toISOString()}`)).length, 0);
      const filtered = await list(
        "/api/admin/requests?user=user_alice&model=glm-4.6&limit=2",
        boss,
      );
      assert.equal(filtered.requests.length, 2);
      const rest = await list(
        `/api/admin/requests?user=user_alice&model=glm-4.6&limit=2&cursor=${filtered.next}`,
        boss,
      );
      assert.equal(rest.requests.length, 1);
      assert.equal(rest.next, null);
    });

    await t.step("every query parameter is validated with a 400 naming it", async () => {
      const cases: Array<[string, HeadersInit, RegExp]> = [
        ["/api/requests?limit=0", bearer(alice), /^limit: must be at least 1/],
        ["/api/requests?limit=201", bearer(alice), /^limit: must be at most 200/],
        ["/api/requests?limit=ten", bearer(alice), /^limit: must be a whole number from 1 to 200/],
        ["/api/requests?cursor=%21%21", bearer(alice), /^cursor: not a cursor/],
        ["/api/requests?cursor=abc", bearer(alice), /^cursor: not a cursor/],
        ["/api/requests?user=user_bob", bearer(alice), /^user: not a parameter of \/api\/requests/],
        ["/api/admin/requests?status=abc", boss, /^status: /],
        ["/api/admin/requests?status=99", boss, /^status: /],
        ["/api/admin/requests?from=2026-13-45", boss, /^from: must be a date/],
        ["/api/admin/requests?to=yesterday", boss, /^to: must be a date/],
        ["/api/admin/requests?from=2026-12-06&to=2026-12-05", boss, /^from: must be before to/],
        ["/api/admin/requests?user=a%20b", boss, /^user: /],
        ["/api/admin/requests?keyId=%3Cx%3E", boss, /^keyId: /],
        ["/api/admin/requests?model=", boss, /^model: /],
        ["/api/admin/requests?sort=asc", boss, /^sort: not a parameter/],
      ];
      for (const [path, headers, message] of cases) {
        const { status, body } = await get(path, headers);
        assert.equal(status, 400, path);
        const error = (body as { error: { code: string; message: string } }).error;
        assert.equal(error.code, "invalid_request", path);
        assert.match(error.message, message, path);
      }
    });

    await t.step("access: no caller 401, a user 403 on the operators' listing", async () => {
      assert.equal((await get("/api/requests", {})).status, 401);
      assert.equal((await get("/api/admin/requests", {})).status, 401);
      const refused = await get("/api/admin/requests", await session("user_alice"));
      assert.equal(refused.status, 403);
      assert.equal((refused.body as { error: { code: string } }).error.code, "forbidden");
      assert.equal((await get("/api/admin/requests", bearer(alice))).status, 401, "keys: no");
    });

    await t.step("an operator whose own record is disabled is not an operator", async () => {
      await keyOf("user_boss");
      const res = await app.request("/api/admin/users/user_boss/disable", {
        method: "POST",
        headers: await session("user_boss2"),
      });
      assert.equal(res.status, 200);
      assert.equal((await get("/api/admin/requests", boss)).status, 403);
      assert.equal((await get("/api/admin/requests", await session("user_boss2"))).status, 200);
    });
  } finally {
    await fake.close();
    await app.close();
  }
});
