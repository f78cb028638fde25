/**
 * The caller's keys (CONTRACT §5 Keys): GET /api/keys lists them, never their secrets, with
 * their 30-day usage and last use; DELETE /api/keys/:id revokes one connected app's key at once
 * across processes. Session auth, and also the app's own key for deleting itself (an editor's
 * "disconnect" holds nothing else).
 */
import { type Context, Hono } from "hono";
import { z } from "zod";
import { AppError } from "../../lib/core/errors.ts";
import type { Services } from "../../lib/core/services.ts";
import { listKeys } from "../../lib/usage/key_usage.ts";
import type { KeysBody } from "../../lib/api_types.ts";
import { type AppEnv, assertSameOrigin, parseWith, readSession } from "../context.ts";
import { describeRoute } from "../openapi.ts";
import { KeysBodySchema, OkSchema } from "../../lib/api_schemas.ts";

const idSchema = z.object({
  id: z.string().regex(/^(default|k_[A-Za-z0-9_-]{22})$/, 'must be "default" or a key id (k_…)'),
});

describeRoute({
  method: "get",
  path: "/api/keys",
  summary: "The caller's keys (the default key first), never their secrets",
  caller: "session",
  ok: { description: "Every key, with its 30-day usage and last use.", schema: KeysBodySchema },
  errors: [401, 403],
});
describeRoute({
  method: "delete",
  path: "/api/keys/:id",
  summary: "Revokes one connected app's key at once, across processes",
  description: "A session may revoke any of its connected apps' keys; an app's own key " +
    "(Authorization: Bearer kw_…) may revoke only itself. The default key cannot be deleted " +
    "(rotate it instead).",
  caller: "sessionOrKey",
  params: idSchema,
  ok: { description: "Revoked.", schema: OkSchema },
  errors: [400, 401, 403, 404],
});

export function keysRoutes(services: Services) {
  const { config, gateway, kv, users } = services;
  const app = new Hono<AppEnv>();

  const signedIn = async (c: Context<AppEnv>) => {
    const found = await readSession(c, services);
    if (!found) {
      throw new AppError(
        "unauthorized",
        "Sign in first: /api/keys takes a session (an app may revoke its own key with it).",
      );
    }
    // A cookie-authenticated write needs the same-origin check (CONTRACT §3).
    if (found.via === "cookie") assertSameOrigin(c, services);
    return found.session.userId;
  };

  app.get("/keys", async (c) => {
    const userId = await signedIn(c);
    const user = await users.get(userId);
    c.header("cache-control", "no-store");
    const body: KeysBody = {
      keys: user ? await listKeys(kv, config.pricing, user, services.clock()) : [],
    };
    return c.json(body);
  });

  app.delete("/keys/:id", async (c) => {
    const authorization = c.req.header("authorization");
    const { id } = parseWith(idSchema, { id: c.req.param("id") }, "id");
    let userId: string;
    if (config.keyMode === "proxy" && /^bearer\s+kw_/i.test(authorization ?? "")) {
      // An app's own key may revoke itself, and nothing else.
      const caller = await gateway.authenticateKey(authorization);
      if (caller.keyId !== id) {
        throw new AppError(
          "forbidden",
          "An app's key can revoke only itself; sign in to revoke other keys.",
        );
      }
      userId = caller.user.id;
    } else {
      userId = await signedIn(c);
    }
    await users.revokeAppKey(userId, id);
    c.header("cache-control", "no-store");
    return c.json({ ok: true });
  });
  return app;
}
