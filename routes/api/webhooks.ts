/** Clerk webhooks (CONTRACT §5): POST /api/webhooks/clerk. The body limit is set in routes/mod.ts. */
import { Hono } from "hono";
import type { Services } from "../../lib/core/services.ts";
import { ClerkWebhooks } from "../../lib/clerk/webhooks.ts";
import type { AppEnv } from "../context.ts";
import { describeRoute } from "../openapi.ts";
import { OkSchema } from "../../lib/api_schemas.ts";
import { z } from "zod";

describeRoute({
  method: "post",
  path: "/api/webhooks/clerk",
  summary: "Clerk's user.created, user.updated and user.deleted (Svix-signed)",
  description: "Verified with the svix-id, svix-timestamp and svix-signature headers.",
  caller: "svix",
  body: z.looseObject({ type: z.string(), data: z.looseObject({}) }),
  ok: {
    description: "Handled, a repeat (duplicate), or a type not handled (ignored).",
    schema: OkSchema,
  },
  errors: [400, 413, 503],
});

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
