/** Operator API (CONTRACT §5): users with 30-day usage, disable/enable, limit overrides. */
import { type Context, Hono, type Next } from "hono";
import { z } from "zod";
import { operatorOverview } from "../../lib/reports/overview.ts";
import { AppError } from "../../lib/core/errors.ts";
import { effectiveLimits } from "../../lib/limits/policy.ts";
import type { Services } from "../../lib/core/services.ts";
import type { Config } from "../../lib/core/config.ts";
import type { UserRecord } from "../../lib/identity/users.ts";
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

/**
 * One user for the operator: the contract's fields, plus the overrides (`limits`), the limits
 * in force (`effectiveLimits`) and the latest UTC day with usage in the last 30 (`lastActive`).
 */
export function adminUserView(
  config: Config,
  user: UserRecord,
  usage?: { requests: number; totalTokens: number; costUsd: number },
  lastActive?: string | null,
): AdminUserBody {
  return {
    userId: user.id,
    email: user.email,
    status: user.status,
    createdAt: user.createdAt,
    keyPrefix: user.key?.prefix ?? null,
    limits: user.limits,
    effectiveLimits: effectiveLimits(config, user),
    lastActive: lastActive ?? null,
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
  return { view: adminUserView(config, user, sumUsage(usage.days), lastActive), usage };
}

export function adminRoutes(services: Services) {
  const { config, users, kv } = services;
  const app = new Hono<AppEnv>();
  const session = requireSession(services);
  const admin = async (c: Context<AppEnv>, next: Next) => {
    const check = await operatorCheck(config, users, c.get("session").userId);
    if (!check.operator) throw new AppError("forbidden", operatorRefusal(check.why));
    await next();
  };

  const shape = (
    user: UserRecord,
    usage?: { requests: number; totalTokens: number; costUsd: number },
    lastActive?: string,
  ) => adminUserView(config, user, usage, lastActive);
  /** The user after an operator's change, with their usage as the list shows it. */
  const changed = async (c: Context<AppEnv>, user: UserRecord) =>
    c.json({ user: (await adminUserRead(kv, config, user)).view } satisfies AdminUserChangedBody);

  app.get("/admin/users", session, admin, async (c) => {
    const { users: totals, lastActive } = await operatorOverview(kv, config.pricing);
    const list = [];
    for await (const user of users.list()) {
      list.push(shape(user, totals.get(user.id), lastActive.get(user.id)));
    }
    c.header("cache-control", "no-store");
    return c.json({ users: list } satisfies AdminUsersBody);
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
