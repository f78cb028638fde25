/** Clerk webhooks (CONTRACT §5): POST /api/webhooks/clerk. The body limit is set in routes/mod.ts. */
import { Hono } from "hono";
import type { Services } from "../../lib/core/services.ts";
import { ClerkWebhooks } from "../../lib/clerk/webhooks.ts";
import type { AppEnv } from "../context.ts";

export function webhookRoutes(services: Services) {
  const { config, kv, users, clerkSync, log, clock } = services;
  const webhooks = new ClerkWebhooks(
    config.clerk.webhookSecrets,
    kv,
    users,
    clerkSync,
    log,
    clock,
  );
  const app = new Hono<AppEnv>();

  app.post("/webhooks/clerk", async (c) => {
    // The signature covers the exact bytes sent, so verify the raw text before any parsing.
    const rawBody = await c.req.text();
    return c.json(await webhooks.handle(rawBody, c.req.raw.headers), 200);
  });
  return app;
}
