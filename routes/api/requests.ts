/**
 * The per-request log (CONTRACT §5 "Requests"): `GET /api/requests` (the caller's own, by
 * session or their own key) and `GET /api/admin/requests` (operators, with filters). The log
 * itself is lib/observe/request_log.ts.
 */
import { Hono } from "hono";
import { z } from "zod";
import { AppError } from "../../lib/core/errors.ts";
import type { Services } from "../../lib/core/services.ts";
import { DAY_MS } from "../../lib/core/utc.ts";
import type { RequestsBody } from "../../lib/api_types.ts";
import type { RequestQuery } from "../../lib/observe/log_store.ts";
import { type AppEnv, parseWith, requireSession } from "../context.ts";
import { callerIdOf } from "./usage.ts";
import { requireOperator } from "./admin.ts";
import { describeRoute } from "../openapi.ts";
import { RequestsBodySchema } from "../../lib/api_schemas.ts";

const LIMIT = "must be a whole number from 1 to 200";
const limit = z.string().regex(/^\d{1,3}$/, LIMIT).optional()
  .transform((v) => (v === undefined ? 50 : Number(v)))
  .pipe(z.number().int().min(1, LIMIT).max(200, LIMIT));
const cursor = z.string().min(1).max(2000)
  .regex(/^[A-Za-z0-9_-]+$/, "not a cursor from this listing's `next`").optional();

const DATE = /^\d{4}-\d{2}-\d{2}$/;
const INSTANT = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d{1,3})?)?(Z|[+-]\d{2}:\d{2})$/;
/** A UTC day (YYYY-MM-DD) or an ISO time with its offset; `end`: a day counts to its end. */
const time = (end: boolean) =>
  z.string().optional().transform((raw, ctx) => {
    if (raw === undefined) return undefined;
    const day = DATE.test(raw);
    const ms = day ? Date.parse(`${raw}T00:00:00Z`) : INSTANT.test(raw) ? Date.parse(raw) : NaN;
    if (!Number.isFinite(ms)) {
      ctx.addIssue({
        code: "custom",
        message: "must be a date (YYYY-MM-DD, UTC) or an ISO time such as 2026-12-06T14:02:00Z",
      });
      return z.NEVER;
    }
    return day && end ? ms + DAY_MS : ms;
  });

const ownQuery = z.object({ limit, cursor }).strict();
const adminQuery = z.object({
  user: z.string().min(1).max(200).regex(/^[A-Za-z0-9_.:-]+$/, "is not a user id").optional(),
  model: z.string().min(1).max(200).optional(),
  status: z.string().regex(/^\d{3}$/, "must be an HTTP status such as 429").optional()
    .transform((v) => (v === undefined ? undefined : Number(v)))
    .pipe(z.number().int().min(100).max(599).optional()),
  keyId: z.string().min(1).max(200).regex(/^[A-Za-z0-9_.:-]+$/, "is not a key id").optional(),
  from: time(false),
  to: time(true),
  limit,
  cursor,
}).strict();

/** The query, checked: a parameter the listing does not take is named, then the schema's. */
function queryOf<S extends z.ZodObject>(
  schema: S,
  query: Record<string, string>,
  path: string,
): z.infer<S> {
  const known = Object.keys(schema.shape);
  const unknown = Object.keys(query).find((name) => !known.includes(name));
  if (unknown !== undefined) {
    throw new AppError(
      "invalid_request",
      `${unknown.slice(0, 50)}: not a parameter of ${path} (it takes ${known.join(", ")})`,
    );
  }
  return parseWith(schema, query, "query");
}

/**
 * The operators' listing's query (GET /api/admin/requests, the /admin/requests page): every
 * filter checked, 400 invalid_request naming the first that is wrong.
 */
export function adminRequestQuery(query: Record<string, string>, path: string): RequestQuery {
  const q = queryOf(adminQuery, query, path);
  if (q.from !== undefined && q.to !== undefined && q.from >= q.to) {
    throw new AppError("invalid_request", "from: must be before to");
  }
  return {
    userId: q.user,
    model: q.model,
    status: q.status,
    keyId: q.keyId,
    from: q.from,
    to: q.to,
    limit: q.limit,
    cursor: q.cursor,
  };
}

describeRoute({
  method: "get",
  path: "/api/requests",
  summary: "The caller's own requests, newest first (the per-request log)",
  caller: "sessionOrKey",
  query: ownQuery,
  ok: { description: "A page of the log, and the cursor of the next.", schema: RequestsBodySchema },
  errors: [400, 401],
});
describeRoute({
  method: "get",
  path: "/api/admin/requests",
  summary: "Everyone's requests, newest first, with any filters combined (operators)",
  caller: "operator",
  query: adminQuery,
  ok: { description: "A page of the log, and the cursor of the next.", schema: RequestsBodySchema },
  errors: [400, 401, 403],
});

export function requestRoutes(services: Services) {
  const { requestLog } = services;
  const app = new Hono<AppEnv>();
  const callerId = callerIdOf(services);

  const operator = requireOperator(services);

  app.get("/requests", async (c) => {
    const q = queryOf(ownQuery, c.req.query(), c.req.path);
    const userId = await callerId(c);
    c.header("cache-control", "no-store");
    return c.json(await requestLog.list({ ...q, userId }) satisfies RequestsBody);
  });

  app.get("/admin/requests", requireSession(services), operator, async (c) => {
    const query = adminRequestQuery(c.req.query(), c.req.path);
    c.header("cache-control", "no-store");
    return c.json(await requestLog.list(query) satisfies RequestsBody);
  });
  return app;
}
