/**
 * GET /openapi.json: a valid OpenAPI 3.1 document (checked by an OpenAPI validator from npm) that
 * lists exactly the `/api/*` and `/v1/*` routes the app serves — compared with the router's own
 * route table in both key modes, so a route added without its description fails here — and whose
 * answer schemas are the same types the routes build (lib/api_types.ts).
 */
import assert from "node:assert/strict";
import { Validator } from "@seriousme/openapi-schema-validator";
import type { z } from "zod";
import { createApp } from "../../routes/mod.ts";
import { openApiPath } from "../../routes/openapi.ts";
import type * as Schemas from "../../lib/api_schemas.ts";
import type * as Types from "../../lib/api_types.ts";
import { testApp } from "../support/helpers.ts";

/** `METHOD /path` (OpenAPI notation) of every route a router serves under /api, /v1 and the rest. */
function served(app: ReturnType<typeof createApp>): Set<string> {
  const out = new Set<string>();
  for (const { method, path } of app.routes) {
    // Middleware (app.use) and shared mode's catch-alls are ALL: not endpoints of their own.
    if (method === "ALL" || path.includes("*")) continue;
    if (!path.startsWith("/api/") && !path.startsWith("/v1/")) continue;
    out.add(`${method} ${openApiPath(path)}`);
  }
  return out;
}

type OpenApiDoc = {
  openapi: string;
  paths: Record<
    string,
    Record<string, {
      parameters?: { name: string; in: string }[];
      requestBody?: { content: Record<string, { schema: unknown }> };
      responses: Record<string, unknown>;
    }>
  >;
  components: { schemas: Record<string, { required?: string[]; properties?: object }> };
};

Deno.test("GET /openapi.json: valid OpenAPI 3.1, every route the app serves, nothing else", async (t) => {
  const proxy = await testApp();
  const shared = await testApp({ KEY_MODE: "shared" });
  try {
    const res = await proxy.request("/openapi.json");
    assert.equal(res.status, 200);
    assert.match(res.headers.get("content-type") ?? "", /^application\/json/);
    const doc = await res.json() as OpenApiDoc;

    await t.step("an OpenAPI validator accepts it as 3.1", async () => {
      const validator = new Validator();
      const result = await validator.validate(structuredClone(doc));
      assert.deepEqual(result, { valid: true }, JSON.stringify(result.errors, null, 2));
      assert.equal(validator.version, "3.1");
      assert.equal(doc.openapi, "3.1.0");
    });

    await t.step("its operations are the router's /api and /v1 routes, both key modes", () => {
      const routes = new Set([
        ...served(createApp(proxy.services)),
        ...served(createApp(shared.services)),
      ]);
      const documented = new Set<string>();
      for (const [path, ops] of Object.entries(doc.paths)) {
        for (const method of Object.keys(ops)) {
          if (path.startsWith("/api/") || path.startsWith("/v1/")) {
            documented.add(`${method.toUpperCase()} ${path}`);
          }
        }
      }
      const missing = [...routes].filter((r) => !documented.has(r));
      const stale = [...documented].filter((r) => !routes.has(r));
      assert.deepEqual(missing, [], "served but not in /openapi.json (describeRoute next to it)");
      assert.deepEqual(stale, [], "in /openapi.json but not served");
      // The table was really read: the gateway, the operator API and shared mode's report.
      for (
        const route of [
          "POST /v1/chat/completions",
          "POST /v1/messages/count_tokens",
          "GET /v1/models/{id}",
          "GET /api/admin/users",
          "PUT /api/admin/users/{id}/limits",
          "POST /api/usage",
        ]
      ) assert.ok(routes.has(route), route);
    });

    await t.step("bodies, params and answers come from the routes' own schemas", () => {
      const limits = doc.paths["/api/admin/users/{id}/limits"].put;
      assert.deepEqual(limits.parameters?.map((p) => [p.in, p.name]), [["path", "id"]]);
      const list = doc.paths["/api/admin/users"].get;
      assert.deepEqual(list.parameters?.map((p) => p.name).sort(), [
        "cursor",
        "limit",
        "query",
        "status",
      ]);
      assert.deepEqual(
        doc.components.schemas.AdminUsers.required?.sort(),
        ["next", "total", "users"],
      );
      const chat = doc.paths["/v1/chat/completions"].post;
      assert.ok(chat.requestBody?.content["application/json"]);
      assert.match(JSON.stringify(chat.requestBody), /"required":\["model","messages"\]/);
      assert.ok("429" in chat.responses && "503" in chat.responses);
      const key = doc.paths["/api/key"].post;
      assert.ok("201" in key.responses && "200" in key.responses);
      assert.match(JSON.stringify(doc.paths["/api/usage"].get), /"name":"days"/);
    });
  } finally {
    await proxy.close();
    await shared.close();
  }
});

// The answer schemas and the types the routes build are the same types: if either changes alone,
// this file stops type-checking (deno task check).
type Same<A, B> = [A] extends [B] ? ([B] extends [A] ? true : false) : false;
const sameShapes: {
  key: Same<z.infer<typeof Schemas.KeyBodySchema>, Types.KeyBody>;
  usage: Same<z.infer<typeof Schemas.UsageBodySchema>, Types.UsageBody>;
  keys: Same<z.infer<typeof Schemas.KeysBodySchema>, Types.KeysBody>;
  requests: Same<z.infer<typeof Schemas.RequestsBodySchema>, Types.RequestsBody>;
  device: Same<z.infer<typeof Schemas.DeviceStartSchema>, Types.DeviceStartBody>;
  adminUser: Same<z.infer<typeof Schemas.AdminUserSchema>, Types.AdminUserBody>;
  adminUsers: Same<z.infer<typeof Schemas.AdminUsersSchema>, Types.AdminUsersBody>;
  changed: Same<z.infer<typeof Schemas.AdminUserChangedSchema>, Types.AdminUserChangedBody>;
  error: Same<z.infer<typeof Schemas.ErrorBodySchema>["error"], Types.ErrorBody["error"]>;
} = {
  key: true,
  usage: true,
  keys: true,
  requests: true,
  device: true,
  adminUser: true,
  adminUsers: true,
  changed: true,
  error: true,
};
Deno.test("the answer schemas are the API's types", () => {
  assert.ok(Object.values(sameShapes).every((v) => v === true));
});
