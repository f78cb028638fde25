/** Usage metering: KV sum counters per user, UTC day and model (never conflict, never lose). */
import { commitOrConflict, CONFLICT, keys, retryAtomic, u64 } from "../core/kv.ts";
import { KV_MAX_MUTATIONS } from "../core/kv_ops.ts";
import { systemClock } from "../core/clock.ts";
import type { Config } from "../core/config.ts";
import type { UsageBody } from "../api_types.ts";
import { checkUserState, type Remaining, userDeleted } from "../limits/policy.ts";
import { accountState } from "../limits/account_state.ts";
import type { Ledger } from "../limits/admission.ts";
import { limitStatus } from "../limits/status.ts";
import { costNanoUsd, costUsd, type Pricing, roundUsd } from "./pricing.ts";
import type { Users } from "../identity/users.ts";
import { addUsageSums, applySums, type UsageEvent } from "./record.ts";
import { byKeyRows } from "./key_usage.ts";
import { type KeyModelCounters, readUserDays } from "./read.ts";
import type { UsageTotals } from "./totals.ts";
export {
  addSum,
  addUsageSums,
  type TokenUsage,
  type UsageEvent,
  type UsageSums,
} from "./record.ts";
import { addDays, type Day, DAY_MS, utcDay, utcMonth } from "../core/utc.ts";

export type { UsageTotals };

/**
 * Records usage directly, outside any lease: imports and fixtures. It bypasses the limit entry,
 * so limits decided meanwhile may not see it; the gateway and POST /api/usage settle leases.
 */
export async function recordUsage(kv: Deno.Kv, pricing: Pricing, e: UsageEvent): Promise<void> {
  await commitUsage(kv, pricing, [e]);
}

/** Sum mutations per event at most (so a batch stays under KV's 1000 mutations per commit). */
const SUMS_PER_EVENT = 8;
const MAX_BATCH = Math.floor(KV_MAX_MUTATIONS / SUMS_PER_EVENT);

/** Records several events in ONE atomic commit of sum mutations (all or nothing). */
export async function commitUsage(
  kv: Deno.Kv,
  pricing: Pricing,
  events: UsageEvent[],
): Promise<void> {
  if (events.length > MAX_BATCH) throw new Error(`commitUsage: at most ${MAX_BATCH} events`);
  const sums = new Map<string, { key: Deno.KvKey; n: bigint }>();
  for (const e of events) addUsageSums(sums, pricing, e);
  // Sums never conflict; only another process holding the file lock can make a commit wait.
  await retryAtomic(async () => {
    const op = kv.atomic();
    applySums(op, sums);
    return (await commitOrConflict(op)).ok ? undefined : CONFLICT;
  }, "record usage");
}

export { u64 };

export interface DayUsage extends UsageTotals {
  date: Day;
}

export interface ModelUsage extends UsageTotals {
  model: string;
}

export interface UserUsage {
  today: UsageTotals;
  /** One entry per UTC day, oldest first, zero-filled. */
  days: DayUsage[];
  /** Per model over the whole range, most expensive first (then most tokens, then by name). */
  byModel: ModelUsage[];
}

type Raw = { requests: number; prompt: number; completion: number; cached: number };
const emptyRaw = (): Raw => ({ requests: 0, prompt: 0, completion: 0, cached: 0 });

/** The UTC day `n` days before the day of `now` (0 = today). */
export function dayBefore(now: number, n: number): Day {
  return utcDay(now - n * DAY_MS);
}

function totals(pricing: Pricing, model: string | null, raw: Raw, cost?: number): UsageTotals {
  return {
    requests: raw.requests,
    promptTokens: raw.prompt,
    completionTokens: raw.completion,
    totalTokens: raw.prompt + raw.completion,
    costUsd: roundUsd(
      cost ??
        (model === null ? 0 : costUsd(pricing, model, raw.prompt, raw.completion, raw.cached)),
    ),
  };
}

/**
 * One user's counters per day and model from `from` to `to` (inclusive), summed over keys.
 * Reads are not on the gateway's hot path; one copy of the counters keeps every request's
 * commit small.
 */
export async function userCounters(
  kv: Deno.Kv,
  userId: string,
  from: Day,
  to: Day,
): Promise<Map<Day, Map<string, Raw>>> {
  return byModel(await readUserDays(kv, userId, from, to));
}

/** Counters per day and key summed per day and model. */
function byModel(days: Map<Day, KeyModelCounters[]>): Map<Day, Map<string, Raw>> {
  const out = new Map<Day, Map<string, Raw>>();
  for (const [day, rows] of days) {
    const models = new Map<string, Raw>();
    for (const row of rows) {
      let raw = models.get(row.model);
      if (!raw) models.set(row.model, raw = emptyRaw());
      raw.requests += row.requests;
      raw.prompt += row.promptTokens;
      raw.completion += row.completionTokens;
      raw.cached += row.cachedTokens;
    }
    out.set(day, models);
  }
  return out;
}

/** A user's usage over the last `days` UTC days including today (GET /api/usage, dashboard). */
export async function userUsage(
  kv: Deno.Kv,
  pricing: Pricing,
  userId: string,
  days: number,
  now: number = systemClock(),
): Promise<UserUsage> {
  const from = dayBefore(now, days - 1);
  return usageOf(pricing, await userCounters(kv, userId, from, utcDay(now)), from, now);
}

/** A user's usage from `from` through today, from their counters per day and model. */
function usageOf(
  pricing: Pricing,
  counters: Map<Day, Map<string, Raw>>,
  from: Day,
  now: number,
): UserUsage {
  const today = utcDay(now);
  const perModel = new Map<string, Raw>();
  const list: DayUsage[] = [];
  for (let day = from; day <= today; day = addDays(day, 1)) {
    const sum: Raw = emptyRaw();
    let cost = 0;
    for (const [model, raw] of counters.get(day) ?? []) {
      sum.requests += raw.requests;
      sum.prompt += raw.prompt;
      sum.completion += raw.completion;
      sum.cached += raw.cached;
      cost += costUsd(pricing, model, raw.prompt, raw.completion, raw.cached);
      const m = perModel.get(model) ?? emptyRaw();
      m.requests += raw.requests;
      m.prompt += raw.prompt;
      m.completion += raw.completion;
      m.cached += raw.cached;
      perModel.set(model, m);
    }
    list.push({ date: day, ...totals(pricing, null, sum, cost) });
  }
  const byModel = [...perModel].map(([model, raw]) => ({
    model,
    ...totals(pricing, model, raw),
  })).sort((a, b) =>
    b.costUsd - a.costUsd || b.totalTokens - a.totalTokens || a.model.localeCompare(b.model)
  );
  const { date: _date, ...todayTotals } = list[list.length - 1];
  return { today: todayTotals, days: list, byModel };
}

/** A user's totals from the UTC day `since` through today (admin list: usage30d). */
export async function usageTotalsSince(
  kv: Deno.Kv,
  pricing: Pricing,
  userId: string,
  since: Day,
  now: number = systemClock(),
): Promise<UsageTotals> {
  const counters = await userCounters(kv, userId, since, utcDay(now));
  const sum: Raw = emptyRaw();
  let cost = 0;
  for (const models of counters.values()) {
    for (const [model, raw] of models) {
      sum.requests += raw.requests;
      sum.prompt += raw.prompt;
      sum.completion += raw.completion;
      sum.cached += raw.cached;
      cost += costUsd(pricing, model, raw.prompt, raw.completion, raw.cached);
    }
  }
  return totals(pricing, null, sum, cost);
}

/** GET /api/usage: the user's limits, what is left of them, and usage over `days` UTC days. */
export async function usageReport(
  kv: Deno.Kv,
  config: Config,
  userId: string,
  days: number,
  now: number = systemClock(),
) {
  const from = dayBefore(now, days - 1);
  // One read of the days' counters serves the totals and the split by key.
  const [status, counters, spend] = await Promise.all([
    limitStatus(kv, config, userId, now),
    readUserDays(kv, userId, from, utcDay(now)),
    kv.get<Deno.KvU64>(keys.spendByMonth(userId, utcMonth(now))),
  ]);
  const usage = usageOf(config.pricing, byModel(counters), from, now);
  const byKey = await byKeyRows(kv, config.pricing, status.user, userId, days, now, counters);
  const state = accountState(status.user, status.limits, {
    requestsLeftToday: status.view.remainingDay,
    tokensToday: usage.today.totalTokens,
    spendNanoMonth: u64(spend.value),
  }, now);
  // What the month's budget meter needs even when there is no budget (remaining is then null).
  const thisMonth = { costUsd: roundUsd(u64(spend.value) / 1e9) };
  return {
    userId,
    limits: status.limits,
    remaining: status.remaining,
    ...usage,
    byKey,
    thisMonth,
    state,
  } satisfies UsageBody;
}

export interface UsageReport {
  model: string;
  promptTokens: number;
  completionTokens: number;
}

/**
 * POST /api/usage (shared key mode): a client reports one call it made with the shared key. It
 * takes a Lease like a gateway request — the request limits apply, and the quotas refuse reports
 * once they are reached (the call was made already, so it reserves nothing) — and the lease is
 * settled with the reported tokens at once. A refused report is not recorded.
 */
export async function reportUsage(
  ledger: Ledger,
  users: Users,
  userId: string,
  report: UsageReport,
): Promise<{ remaining: Remaining; headers: Record<string, string> }> {
  // Reports come from signed-in users who may not have opened the dashboard yet.
  if (!(await users.get(userId))) await users.provision(userId);
  const lease = await ledger.admit({
    userId,
    model: report.model,
    reserve: { prompt: 0, output: 0 },
    validate: (user, headers) => {
      if (!user) throw userDeleted(headers);
      return checkUserState(user, headers);
    },
  });
  const charged = await lease.settle(
    { promptTokens: report.promptTokens, completionTokens: report.completionTokens },
    "complete",
  );
  const tokens = charged.promptTokens + charged.completionTokens;
  const r = lease.remaining;
  const spent = costNanoUsd(
    ledger.pricing,
    report.model,
    report.promptTokens,
    report.completionTokens,
  );
  return {
    headers: lease.headers,
    remaining: {
      ...r,
      tokensToday: r.tokensToday === null ? null : Math.max(0, r.tokensToday - tokens),
      budgetUsd: r.budgetUsd === null
        ? null
        : Math.max(0, Math.round(r.budgetUsd * 1e9 - Number(spent)) / 1e9),
    },
  };
}
