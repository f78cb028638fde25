/**
 * Operators are active users: an id in ADMIN_USER_IDS whose own record is disabled or deleted is
 * refused on every operator route and page. The routes come from the app's own route table, so a
 * route added later is covered without editing this test.
 */
import assert from "node:assert/strict";
import { createApp } from "../../routes/mod.ts";
import { bearer, clerkEnv, ClerkIssuer, json, testApp } from "../support/helpers.ts";

const issuer = await ClerkIssuer.create();

/** Every operator route the router serves: method and path, `:params` filled with `userId`. */
function operatorRoutes(app: ReturnType<typeof createApp>, userId: string) {
  const seen = new Set<string>();
  const routes: { method: string; path: string }[] = [];
  for (const { method, path } of app.routes) {
    // Middleware is registered as ALL (and often on a wildcard): not a route of its own.
    if (method === "ALL" || path.includes("*")) continue;
    if (!path.startsWith("/api/admin") && !path.startsWith("/admin")) continue;
    const filled = path.replace(/:[A-Za-z_]+(\{[^}]*\})?/g, encodeURIComponent(userId));
    const id = `${method} ${filled}`;
    if (seen.has(id)) continue;
    seen.add(id);
    routes.push({ method, path: filled });
  }
  return routes;
}

Deno.test("a disabled or deleted operator is refused on every operator route and page", async (t) => {
  const app = await testApp(
    clerkEnv(issuer, { ADMIN_USER_IDS: "user_boss,user_off,user_gone" }),
  );
  try {
    const users = app.services.users;
    for (const id of ["user_boss", "user_off", "user_gone", "user_alice"]) {
      await users.provision(id, { email: `${id}@example.com`, firstName: null, lastName: null });
    }
    await users.setStatus("user_off", "disabled", "user_boss");
    await users.markDeleted("user_gone");
    const routes = operatorRoutes(createApp(app.services), "user_alice");
    const api = routes.filter((r) => r.path.startsWith("/api/"));
    const pages = routes.filter((r) => !r.path.startsWith("/api/"));
    // The table really was read: the list, the three writes and both pages at least.
    assert.ok(api.length >= 4, `operator API routes found: ${JSON.stringify(api)}`);
    assert.ok(pages.length >= 2, `operator pages found: ${JSON.stringify(pages)}`);

    const send = async (who: string, route: { method: string; path: string }) =>
      await app.request(route.path, {
        method: route.method,
        headers: { ...bearer(await issuer.token(who)), "content-type": "application/json" },
        body: route.method === "GET" || route.method === "HEAD" ? undefined : '{"rpm":5}',
      });

    for (const [who, reason] of [["user_off", /disabled/], ["user_gone", /deleted/]] as const) {
      await t.step(`${who}: 403 forbidden on every operator route and page`, async () => {
        for (const route of api) {
          const res = await send(who, route);
          assert.equal(res.status, 403, `${route.method} ${route.path}`);
          assert.match(res.headers.get("content-type") ?? "", /application\/json/);
          const body = await json<{ error: { code: string; message: string } }>(res);
          assert.equal(body.error.code, "forbidden", `${route.method} ${route.path}`);
          assert.match(body.error.message, reason);
        }
        for (const route of pages) {
          const res = await send(who, route);
          assert.equal(res.status, 403, `${route.method} ${route.path}`);
          assert.match(res.headers.get("content-type") ?? "", /text\/html/);
          const html = await res.text();
          assert.match(html, /Operators only/);
          assert.match(html, reason);
        }
        // Nothing was changed by the refused writes.
        const alice = await users.get("user_alice");
        assert.equal(alice?.status, "active");
        assert.deepEqual(alice?.limits, {});
      });
    }

    await t.step("the pages' navigation has no Admin link for them", async () => {
      for (const who of ["user_off", "user_gone", "user_alice"]) {
        const res = await app.request("/", { headers: bearer(await issuer.token(who)) });
        assert.equal(res.status, 200);
        assert.doesNotMatch(await res.text(), /href="\/admin"/, who);
      }
      const res = await app.request("/", { headers: bearer(await issuer.token("user_boss")) });
      assert.match(await res.text(), /href="\/admin"/);
    });

    await t.step("an active operator is served on the same routes (none is a 403)", async () => {
      for (const route of [...pages, ...api]) {
        const res = await send("user_boss", route);
        await res.body?.cancel();
        assert.ok(res.status < 400, `${route.method} ${route.path}: ${res.status}`);
      }
    });

    await t.step("enabled again, the operator is one again", async () => {
      await users.setStatus("user_off", "active", "user_boss");
      const res = await send("user_off", { method: "GET", path: "/api/admin/users" });
      assert.equal(res.status, 200);
      await res.body?.cancel();
    });
  } finally {
    await app.close();
  }
});
