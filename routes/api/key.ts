/** Key API (CONTRACT §5): GET|POST /api/key, POST /api/key/rotate, /api/auth/provision-user. */
import { type Context, Hono } from "hono";
import { effectiveLimits } from "../../lib/limits.ts";
import type { Services } from "../../lib/services.ts";
import type { ProvisionResult } from "../../lib/users.ts";
import { type AppEnv, requireSession } from "../context.ts";

export function keyRoutes(services: Services) {
  const { config, users, clerkSync } = services;
  const app = new Hono<AppEnv>();
  // Per route, not app.use("*"): a sub-app's wildcard middleware would cover all of /api/*.
  const auth = requireSession(services);

  const body = (result: ProvisionResult) => {
    const shared = config.keyMode === "shared";
    const apiKey = shared ? config.glm.apiKey! : result.apiKey;
    return {
      apiKey,
      baseUrl: shared ? config.glm.baseUrl : `${config.publicUrl}/v1`,
      mode: config.keyMode,
      keyPrefix: apiKey.slice(0, 7),
      userId: result.user.id,
      createdAt: result.user.key?.createdAt ?? result.user.createdAt,
      limits: effectiveLimits(config, result.user),
    };
  };

  const provision = async (c: Context<AppEnv>) => {
    const session = c.get("session");
    const profile = session.email
      ? { email: session.email, firstName: null, lastName: null }
      : undefined;
    const result = await users.provision(session.userId, profile);
    if (result.created) clerkSync.afterProvision(result.user);
    c.header("cache-control", "no-store");
    return c.json(body(result), result.created && c.req.method === "POST" ? 201 : 200);
  };

  app.get("/key", auth, provision);
  app.post("/key", auth, provision);
  app.get("/auth/provision-user", auth, provision);
  app.post("/auth/provision-user", auth, provision);
  app.post("/key/rotate", auth, async (c) => {
    const session = c.get("session");
    await users.provision(session.userId);
    const result = await users.rotate(session.userId);
    clerkSync.afterProvision(result.user);
    c.header("cache-control", "no-store");
    return c.json(body(result), 200);
  });
  return app;
}
