/** Usage API (CONTRACT §5 Usage): GET /api/usage (session or own key), POST /api/usage (shared). */
import { type Context, Hono } from "hono";
import { z } from "zod";
import { AppError } from "../../lib/core/errors.ts";
import { reportUsage, usageReport } from "../../lib/usage/usage.ts";
import type { Services } from "../../lib/core/services.ts";
import type { UsageBody } from "../../lib/api_types.ts";
import { serviceState } from "../../lib/limits/upstream/outage.ts";
import { describeRoute } from "../openapi.ts";
import { UsageBodySchema } from "../../lib/api_schemas.ts";
import { type AppEnv, jsonBody, parseWith, readSession, requireSession } from "../context.ts";

const DAYS = "must be a whole number from 1 to 90";
const querySchema = z.object({
  days: z.string().regex(/^\d+$/, DAYS).optional()
    .transform((v) => (v === undefined ? 30 : Number(v)))
    .pipe(z.number().int().min(1, DAYS).max(90, DAYS)),
});

const reportSchema = z.object({
  model: z.string().min(1).max(200),
  promptTokens: z.number().int().min(0).max(1e9),
  completionTokens: z.number().int().min(0).max(1e9),
}).strict();

describeRoute({
  method: "get",
  path: "/api/usage",
  summary: "The caller's usage, limits, what is left, account state and service state",
  caller: "sessionOrKey",
  query: querySchema,
  ok: { description: "Usage over the last `days` UTC days.", schema: UsageBodySchema },
  errors: [400, 401],
});
describeRoute({
  method: "post",
  path: "/api/usage",
  summary: "Shared key mode only: report one call made with the shared key",
  caller: "session",
  body: reportSchema,
  ok: {
    description: "Counted.",
    schema: z.object({ ok: z.literal(true), remaining: UsageBodySchema.shape.remaining }),
  },
  errors: [400, 401, 403, 404, 429],
});

/** The caller's user id: their own `kw_` key (proxy mode) or a session (401 without either). */
export function callerIdOf(services: Services) {
  const { config, gateway } = services;
  return async (c: Context<AppEnv>): Promise<string> => {
    const authorization = c.req.header("authorization");
    if (config.keyMode === "proxy" && /^bearer\s+kw_/i.test(authorization ?? "")) {
      return (await gateway.authenticate(authorization)).id;
    }
    const found = await readSession(c, services);
    if (!found) {
      throw new AppError(
        "unauthorized",
        "Sign in first, or send your API key as 'Authorization: Bearer kw_…'.",
      );
    }
    return found.session.userId;
  };
}

export function usageRoutes(services: Services) {
  const { config, kv, users } = services;
  const app = new Hono<AppEnv>();
  const callerId = callerIdOf(services);

  app.get("/usage", async (c) => {
    const { days } = parseWith(querySchema, { days: c.req.query("days") }, "days");
    const userId = await callerId(c);
    c.header("cache-control", "no-store");
    const [report, service] = await Promise.all([
      usageReport(kv, config, userId, days),
      serviceState(config, services.slots.pool),
    ]);
    return c.json({ ...report, service } satisfies UsageBody);
  });

  // Shared mode only: in proxy mode the gateway meters usage and this path is a plain 404.
  if (config.keyMode !== "shared") return app;
  app.post("/usage", requireSession(services), async (c) => {
    const body = await jsonBody(c, reportSchema);
    const result = await reportUsage(services.ledger, users, c.get("session").userId, body);
    for (const [name, value] of Object.entries(result.headers)) c.header(name, value);
    c.header("cache-control", "no-store");
    return c.json({ ok: true, remaining: result.remaining });
  });
  return app;
}
