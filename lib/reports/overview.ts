/** Operator views over all users, built on the cost report (summaries where current). */
import type { Pricing } from "../usage/pricing.ts";
import { roundUsd } from "../usage/pricing.ts";
import { buildReport } from "./report.ts";
import type { WindowTotals } from "../usage/totals.ts";
import { addDays, utcDay } from "../core/utc.ts";
import { systemClock } from "../core/clock.ts";

export interface OperatorOverview {
  /** Per-user totals over the window (users without usage are absent). */
  users: Map<string, WindowTotals>;
  /** One entry per UTC day of the window, oldest first, zero-filled. */
  days: Array<WindowTotals & { day: string; users: number }>;
  /** Everyone over the whole window. */
  totals: WindowTotals;
  /** Each user's latest UTC day with usage in the window (users without usage are absent). */
  lastActive: Map<string, string>;
}

/** Usage of every user over the last `days` UTC days, including today. */
export async function operatorOverview(
  kv: Deno.Kv,
  pricing: Pricing,
  now = systemClock(),
  days = 30,
): Promise<OperatorOverview> {
  const to = utcDay(now);
  const from = addDays(to, -(days - 1));
  const report = await buildReport(kv, pricing, { from, to, perDay: true, now });
  const users = new Map<string, WindowTotals>(
    report.users.map((u) => [u.userId, {
      requests: u.requests,
      totalTokens: u.totalTokens,
      costUsd: u.costUsd,
    }]),
  );
  const byDay = new Map<string, WindowTotals & { day: string; users: number }>();
  for (let i = 0; i < days; i++) {
    const day = addDays(from, i);
    byDay.set(day, { day, requests: 0, totalTokens: 0, costUsd: 0, users: 0 });
  }
  const lastActive = new Map<string, string>();
  for (const line of report.daily) {
    // Read from the usage counters, so the gateway's hot path gets no extra write for it.
    if (line.requests > 0 && (lastActive.get(line.userId) ?? "") < line.date) {
      lastActive.set(line.userId, line.date);
    }
    const d = byDay.get(line.date);
    if (!d) continue;
    d.requests += line.requests;
    d.totalTokens += line.totalTokens;
    d.costUsd = roundUsd(d.costUsd + line.costUsd);
    d.users++;
  }
  const { requests, totalTokens, costUsd } = report.totals;
  return {
    users,
    days: [...byDay.values()],
    totals: { requests, totalTokens, costUsd },
    lastActive,
  };
}
