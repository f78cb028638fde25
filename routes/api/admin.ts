/** Operator API (CONTRACT §5): users with 30-day usage, disable/enable, limit overrides. */
import { type Context, Hono, type Next } from "hono";
import { z } from "zod";
import { decodeCursor, listUsers, type UserListRow } from "../../lib/reports/admin_users.ts";
import { AppError } from "../../lib/core/errors.ts";
import { effectiveLimits } from "../../lib/limits/policy.ts";
import type { Services } from "../../lib/core/services.ts";
import type { Config } from "../../lib/core/config.ts";
import { keyCount, type UserRecord } from "../../lib/identity/users.ts";
import type {
  AdminUserBody,
  AdminUserChangedBody,
  AdminUsersBody,
  UsageBody,
} from "../../lib/api_types.ts";
import { operatorCheck, operatorRefusal } from "../../lib/identity/operators.ts";
import { usageReport } from "../../lib/usage/usage.ts";
import { sumUsage } from "../../lib/usage/totals.ts";
import { roundUsd } from "../../lib/usage/pricing.ts";
import { type AppEnv, jsonBody, parseWith, requireSession } from "../context.ts";
import { describeRoute } from "../openapi.ts";
import { AdminUserChangedSchema, AdminUsersSchema } from "../../lib/api_schemas.ts";

const userIdParam = z.object({ id: z.string().min(1).max(200).regex(/^[A-Za-z0-9_.:-]+$/) });

const nullableInt = (max: number) => z.number().int().min(0).max(max).nullable().optional();
const limitsBody = z.object({
  rpm: z.number().int().min(1).max(1_000_000).nullable().optional(),
  rpd: z.number().int().min(1).max(100_000_000).nullable().optional(),
  tokensPerDay: nullableInt(Number.MAX_SAFE_INTEGER),
  budgetUsdMonthly: z.number().finite().min(0).max(1e9).nullable().optional(),
}).strict().refine((b) => Object.keys(b).length > 0, {
  message: "give at least one of rpm, rpd, tokensPerDay, budgetUsdMonthly",
});

/** What the users list knows of a user beyond the record: their state and 30-day usage. */
export interface AdminUserFacts {
  status?: UserListRow["status"];
  pausedBy?: UserListRow["pausedBy"];
  pausedUntil?: string | null;
  usage30d?: { requests: number; totalTokens: number; costUsd: number };
  lastActive?: string | null;
}

/**
 * One user for the operator: the contract's fields, plus the overrides (`limits`), the limits
 * in force (`effectiveLimits`) and when a paused user works again (`pausedUntil`).
 */
export function adminUserView(
  config: Config,
  user: UserRecord,
  facts: AdminUserFacts = {},
): AdminUserBody {
  const usage = facts.usage30d;
  return {
    userId: user.id,
    email: user.email,
    status: facts.status ?? user.status,
    pausedBy: facts.pausedBy ?? null,
    pausedUntil: facts.pausedUntil ?? null,
    createdAt: user.createdAt,
    lastActiveAt: facts.lastActive ?? null,
    keyPrefix: user.key?.prefix ?? null,
    keys: keyCount(user),
    limits: user.limits,
    effectiveLimits: effectiveLimits(config, user),
    // Sums of floats: rounded, so no 1.7000309999999998 reaches the JSON.
    usage30d: usage
      ? {
        requests: usage.requests,
        totalTokens: usage.totalTokens,
        costUsd: roundUsd(usage.costUsd),
      }
      : { requests: 0, totalTokens: 0, costUsd: 0 },
  };
}

const PAUSED_BY = {
  requests_per_day: "requests",
  tokens_per_day: "tokens",
  budget_monthly: "budget",
} as const;

/**
 * One user for the operator with their last 30 UTC days read (the per-user page, and the answer
 * to an operator's change); `usage` is the report it was read from.
 */
export async function adminUserRead(
  kv: Deno.Kv,
  config: Config,
  user: UserRecord,
  now = Date.now(),
): Promise<{ view: AdminUserBody; usage: UsageBody }> {
  const usage = await usageReport(kv, config, user.id, 30, now);
  const lastActive = usage.days.findLast((d) => d.requests > 0)?.date ?? null;
  const state = usage.state;
  const view = adminUserView(config, user, {
    usage30d: sumUsage(usage.days),
    lastActive,
    ...(state.status === "paused"
      ? { status: "paused", pausedBy: PAUSED_BY[state.reason], pausedUntil: state.until }
      : {}),
  });
  return { view, usage };
}

const LIMIT = "must be a whole number from 1 to 200";
/** GET /api/admin/users's query string (CONTRACT §5 Operator). */
export const adminUsersQuery = z.object({
  query: z.string().max(200, "has at most 200 characters").optional(),
  status: z.enum(["active", "paused", "disabled", "deleted"]).optional(),
  limit: z.string().regex(/^\d+$/, LIMIT).optional()
    .transform((v) => (v === undefined ? 50 : Number(v)))
    .pipe(z.number().int().min(1, LIMIT).max(200, LIMIT)),
  cursor: z.string().max(400).refine((c) => decodeCursor(c) !== null, {
    message: "is not a cursor from this list's `next`",
  }).optional(),
});

describeRoute({
  method: "get",
  path: "/api/admin/users",
  summary: "Users by 30-day cost: searched, filtered by status, one page",
  caller: "operator",
  query: adminUsersQuery,
  ok: { description: "One page, and the total matching.", schema: AdminUsersSchema },
  errors: [400, 401, 403],
});
for (const action of ["disable", "enable"] as const) {
  describeRoute({
    method: "post",
    path: `/api/admin/users/:id/${action}`,
    summary: action === "disable"
      ? "Disables a user: their keys are refused at once (never your own account)"
      : "Enables a disabled user",
    caller: "operator",
    params: userIdParam,
    ok: { description: "The user now.", schema: AdminUserChangedSchema },
    errors: [400, 401, 403, 404],
  });
}
describeRoute({
  method: "put",
  path: "/api/admin/users/:id/limits",
  summary: "Overrides a user's limits (null clears an override)",
  caller: "operator",
  params: userIdParam,
  body: limitsBody,
  ok: { description: "The user now.", schema: AdminUserChangedSchema },
  errors: [400, 401, 403, 404],
});

/**
 * After requireSession: an operator (ADMIN_USER_IDS, own account active), else 403 forbidden. Every
 * /api/admin/* route takes it (tests/routes/operator_access_test.ts walks the router to check).
 */
export function requireOperator(services: Services) {
  return async (c: Context<AppEnv>, next: Next) => {
    const check = await operatorCheck(services.config, services.users, c.get("session").userId);
    if (!check.operator) throw new AppError("forbidden", operatorRefusal(check.why));
    await next();
  };
}

export function adminRoutes(services: Services) {
  const { config, users, kv } = services;
  const app = new Hono<AppEnv>();
  const session = requireSession(services);
  const admin = requireOperator(services);

  /** The user after an operator's change, with their usage as the list shows it. */
  const changed = async (c: Context<AppEnv>, user: UserRecord) =>
    c.json({ user: (await adminUserRead(kv, config, user)).view } satisfies AdminUserChangedBody);

  app.get("/admin/users", session, admin, async (c) => {
    const q = parseWith(adminUsersQuery, {
      query: c.req.query("query") || undefined,
      status: c.req.query("status") || undefined,
      limit: c.req.query("limit"),
      cursor: c.req.query("cursor") || undefined,
    }, "query");
    const page = await listUsers(kv, config, users, q);
    c.header("cache-control", "no-store");
    return c.json(
      {
        users: page.rows.map((r) => adminUserView(config, r.user, r)),
        next: page.next,
        total: page.total,
      } satisfies AdminUsersBody,
    );
  });

  for (const [action, status] of [["disable", "disabled"], ["enable", "active"]] as const) {
    app.post(`/admin/users/:id/${action}`, session, admin, async (c) => {
      const { id } = parseWith(userIdParam, c.req.param(), "id");
      // An operator who disables themselves loses /admin and their key in one click.
      if (action === "disable" && id === c.get("session").userId) {
        throw new AppError(
          "forbidden",
          "You cannot disable your own account; ask another operator.",
        );
      }
      return await changed(c, await users.setStatus(id, status, c.get("session").userId));
    });
  }

  app.put("/admin/users/:id/limits", session, admin, async (c) => {
    const { id } = parseWith(userIdParam, c.req.param(), "id");
    const patch = await jsonBody(c, limitsBody);
    return await changed(c, await users.setLimits(id, patch));
  });
  return app;
}
