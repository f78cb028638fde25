/**
 * budget.threshold alerts (CONTRACT §7 Events): when a user's spend in a UTC month reaches 80 %
 * and 100 % of their monthly budget, once each per user and month across every process.
 */
import type { Events } from "../alerts/deliver.ts";
import { keys } from "../core/kv.ts";
import { BoundedMap } from "../core/kv_ops.ts";
import { type Month, utcMonth } from "../core/utc.ts";

export const BUDGET_THRESHOLDS = [80, 100] as const;
export type BudgetPercent = typeof BUDGET_THRESHOLDS[number];

/** A claim outlives its month (the longest is 31 days) so a late settlement cannot re-send it. */
const CLAIM_MS = 40 * 24 * 3_600_000;
/** Claims each Events (each KV handle) has seen, so settlements past 80 % cost no KV commit. */
const SEEN_MAX = 100_000;
const seenBy = new WeakMap<Events, BoundedMap<string, true>>();

/**
 * Sends budget.threshold for each threshold `spentUsd` has reached and no process has reported
 * yet for this user and month. Returns the percents this call sent. Call it after the spend is
 * committed (a settlement, the cost-summary job); a budget of 0 (unlimited) sends nothing.
 * Never throws: a KV failure is logged, and the threshold is tried again on the next call.
 */
export async function checkBudget(
  events: Events,
  user: { id: string },
  spentUsd: number,
  budgetUsd: number,
  month: Month = utcMonth(),
): Promise<BudgetPercent[]> {
  if (!(budgetUsd > 0) || !Number.isFinite(spentUsd)) return [];
  let seen = seenBy.get(events);
  if (!seen) seenBy.set(events, seen = new BoundedMap(SEEN_MAX));
  const sent: BudgetPercent[] = [];
  for (const percent of BUDGET_THRESHOLDS) {
    // Compared in micro-dollars so 80 % of $0.10 is reached by exactly $0.08 despite floats.
    if (Math.round(spentUsd * 1e6) * 100 < Math.round(budgetUsd * 1e6) * percent) continue;
    const memo = `${user.id}\u0000${month}\u0000${percent}`;
    if (seen.has(memo)) continue;
    const outcome = await events.alertOnce(keys.budgetAlert(user.id, month, percent), CLAIM_MS, {
      type: "budget.threshold",
      userId: user.id,
      percent,
      budgetUsd,
      spentUsd: Math.round(spentUsd * 1e6) / 1e6,
      month,
    });
    if (outcome === "failed") continue; // logged; the next settlement or cron run tries again
    seen.set(memo, true);
    if (outcome === "sent") sent.push(percent);
  }
  return sent;
}
