/** Operator API (CONTRACT §5): users with 30-day usage, disable/enable, limit overrides. */
import { type Context, Hono, type Next } from "hono";
import { z } from "zod";
import { operatorOverview } from "../../lib/reports/overview.ts";
import { AppError } from "../../lib/core/errors.ts";
import { effectiveLimits } from "../../lib/limits/policy.ts";
import type { Services } from "../../lib/core/services.ts";
import type { Config } from "../../lib/core/config.ts";
import type { UserRecord } from "../../lib/identity/users.ts";
import type { AdminUserBody, AdminUserChangedBody, AdminUsersBody } from "../../lib/api_types.ts";
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
    usage30d: usage ? usage : { requests: 0, totalTokens: 0, costUsd: 0 },
  };
}

export function adminRoutes(services: Services) {
  const { config, users, kv } = services;
  const app = new Hono<AppEnv>();
  const session = requireSession(services);
  const admin = async (c: Context<AppEnv>, next: Next) => {
    if (!config.adminUserIds.has(c.get("session").userId)) {
      throw new AppError("forbidden", "Operators only: your user id is not in ADMIN_USER_IDS.");
    }
    await next();
  };

  const shape = (
    user: UserRecord,
    usage?: { requests: number; totalTokens: number; costUsd: number },
    lastActive?: string,
  ) => adminUserView(config, user, usage, lastActive);

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
      const user = await users.setStatus(id, status, c.get("session").userId);
      return c.json({ user: shape(user) } satisfies AdminUserChangedBody);
    });
  }

  app.put("/admin/users/:id/limits", session, admin, async (c) => {
    const { id } = parseWith(userIdParam, c.req.param(), "id");
    const patch = await jsonBody(c, limitsBody);
    const user = await users.setLimits(id, patch);
    return c.json({ user: shape(user) } satisfies AdminUserChangedBody);
  });
  return app;
}
