/** Effective per-user limits: the user's overrides over the configured defaults. */
import type { Config } from "./config.ts";
import type { UserRecord } from "./users.ts";

export interface EffectiveLimits {
  rpm: number;
  rpd: number;
  /** null = unlimited */
  tokensPerDay: number | null;
  /** null = unlimited */
  budgetUsdMonthly: number | null;
}

export function effectiveLimits(config: Config, user: Pick<UserRecord, "limits">): EffectiveLimits {
  const o = user.limits;
  const tokens = o.tokensPerDay ?? config.limits.tokensPerDay;
  const budget = o.budgetUsdMonthly ?? config.limits.budgetUsdMonthly;
  return {
    rpm: o.rpm ?? config.limits.rpm,
    rpd: o.rpd ?? config.limits.rpd,
    tokensPerDay: tokens > 0 ? tokens : null,
    budgetUsdMonthly: budget > 0 ? budget : null,
  };
}
