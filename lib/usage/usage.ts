/** Usage metering: KV sum counters per user, UTC day and model (never conflict, never lose). */
import {
  commitOrConflict,
  CONFLICT,
  type Day,
  keys,
  retryAtomic,
  u64,
  USAGE_FIELDS,
  utcDay,
  utcMonth,
} from "../core/kv.ts";
import type { Config } from "../core/config.ts";
import { AppError } from "../core/errors.ts";
import {
  admit,
  type Admitter,
  type ExtraBatch,
  type ExtraWrites,
  limitStatus,
  type Remaining,
} from "../limits/limits.ts";
import { costNanoUsd, costUsd, type Pricing, roundUsd } from "./pricing.ts";
import type { Users } from "../identity/users.ts";

export interface UsageEvent {
  userId: string;
  model: string;
  promptTokens: number;
  completionTokens: number;
  /** When the request happened (ms since epoch); default now. */
  at?: number;
  /** Count a request (default 1; 0 adds tokens to a request already counted). */
  requests?: number;
}

export interface UsageTotals {
  requests: number;
  promptTokens: number;
  completionTokens: number;
  totalTokens: number;
  costUsd: number;
}

const big = (n: number) => new Deno.KvU64(BigInt(Math.max(0, Math.floor(n))));

/** Records one request's usage in a single atomic commit of sum mutations. */
export async function recordUsage(kv: Deno.Kv, pricing: Pricing, e: UsageEvent): Promise<void> {
  await commitUsage(kv, pricing, [e]);
}

/** Adds each event's sums to `into`, merged by key (events of one user/day/model share keys). */
function addSums(
  into: Map<string, { key: Deno.KvKey; n: bigint }>,
  pricing: Pricing,
  e: UsageEvent,
) {
  const at = e.at ?? Date.now();
  const day = utcDay(at);
  const add = (key: Deno.KvKey, n: bigint) => {
    const id = JSON.stringify(key);
    const found = into.get(id);
    if (found) found.n += n;
    else into.set(id, { key, n });
  };
  const values = {
    requests: big(e.requests ?? 1).value,
    prompt: big(e.promptTokens).value,
    completion: big(e.completionTokens).value,
  };
  for (const field of USAGE_FIELDS) {
    add(keys.usageDaily(day, e.userId, e.model, field), values[field]);
  }
  add(keys.tokensByDay(e.userId, day), values.prompt + values.completion);
  add(
    keys.spendByMonth(e.userId, utcMonth(at)),
    costNanoUsd(pricing, e.model, e.promptTokens, e.completionTokens),
  );
  add(keys.usageDayVersion(day), 1n);
}

/** Sum mutations per event at most (so a batch stays under KV's 1000 mutations per commit). */
const SUMS_PER_EVENT = 6;
const MAX_BATCH = Math.floor(1000 / SUMS_PER_EVENT);

/** Records several events in ONE atomic commit of sum mutations (all or nothing). */
export async function commitUsage(
  kv: Deno.Kv,
  pricing: Pricing,
  events: UsageEvent[],
): Promise<void> {
  if (events.length > MAX_BATCH) throw new Error(`commitUsage: at most ${MAX_BATCH} events`);
  const sums = new Map<string, { key: Deno.KvKey; n: bigint }>();
  for (const e of events) addSums(sums, pricing, e);
  // Sums never conflict; only another process holding the file lock can make a commit wait.
  await retryAtomic(async () => {
    const op = kv.atomic();
    for (const { key, n } of sums.values()) op.sum(key, n);
    return (await commitOrConflict(op)).ok ? undefined : CONFLICT;
  }, "record usage");
}

/**
 * Group commit for the gateway's usage writes: an event is committed at once when no commit is
 * in flight; events that arrive meanwhile go together into the next commit. With `rideWith`, the
 * events travel in the Admitter's commits instead (one KV commit per batch for admissions and
 * usage together). Adds no delay when idle; never delays the relayed bytes.
 */
export class UsageRecorder implements ExtraWrites {
  private queue: Array<{ e: UsageEvent; done: (err?: unknown) => void }> = [];
  private running = false;
  private owner: Admitter | null = null;

  constructor(private readonly kv: Deno.Kv, private readonly pricing: Pricing) {}

  /** Hands the commits over to an admitter's writer loop. */
  rideWith(admitter: Admitter) {
    admitter.carry(this);
    this.owner = admitter;
  }

  /** Resolves once the event is committed; rejects if its batch could not be. */
  record(e: UsageEvent): Promise<void> {
    return new Promise((resolve, reject) => {
      this.queue.push({ e, done: (err) => err === undefined ? resolve() : reject(err) });
      if (this.owner) this.owner.kick();
      else if (!this.running) this.run();
    });
  }

  hasPending(): boolean {
    return this.queue.length > 0;
  }

  take(op: Deno.AtomicOperation, budget: number): ExtraBatch | null {
    const max = Math.min(MAX_BATCH, Math.floor(budget / SUMS_PER_EVENT));
    if (!this.queue.length || max < 1) return null;
    const batch = this.queue.splice(0, max);
    const sums = new Map<string, { key: Deno.KvKey; n: bigint }>();
    for (const b of batch) addSums(sums, this.pricing, b.e);
    for (const { key, n } of sums.values()) op.sum(key, n);
    return {
      settle: (err) => {
        for (const b of batch) b.done(err);
      },
      requeue: () => {
        this.queue.unshift(...batch);
      },
    };
  }

  private async run() {
    this.running = true;
    while (this.queue.length) {
      const batch = this.queue.splice(0, MAX_BATCH);
      try {
        await commitUsage(this.kv, this.pricing, batch.map((b) => b.e));
        for (const b of batch) b.done();
      } catch (err) {
        for (const b of batch) b.done(err ?? new Error("usage commit failed"));
      }
    }
    this.running = false;
  }
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

type Raw = { requests: number; prompt: number; completion: number };

const DAY_MS = 86_400_000;

/** The UTC day `n` days before the day of `now` (0 = today). */
export function dayBefore(now: number, n: number): Day {
  return utcDay(now - n * DAY_MS);
}

function nextDay(day: Day): Day {
  return utcDay(Date.parse(`${day}T00:00:00Z`) + DAY_MS);
}

function totals(pricing: Pricing, model: string | null, raw: Raw, cost?: number): UsageTotals {
  return {
    requests: raw.requests,
    promptTokens: raw.prompt,
    completionTokens: raw.completion,
    totalTokens: raw.prompt + raw.completion,
    costUsd: roundUsd(
      cost ?? (model === null ? 0 : costUsd(pricing, model, raw.prompt, raw.completion)),
    ),
  };
}

/**
 * One user's counters per day and model from `from` to `to` (inclusive): one short range list
 * per day over the day-major keys (`["usage_daily", day, userId]`), never a scan of other users.
 * Reads are not on the gateway's hot path; one copy of the counters keeps every request's
 * commit small.
 */
export async function userCounters(
  kv: Deno.Kv,
  userId: string,
  from: Day,
  to: Day,
): Promise<Map<Day, Map<string, Raw>>> {
  const days: Day[] = [];
  for (let day = from; day <= to; day = nextDay(day)) days.push(day);
  const out = new Map<Day, Map<string, Raw>>();
  const readDay = async (day: Day) => {
    const models = new Map<string, Raw>();
    const iter = kv.list<Deno.KvU64>({ prefix: [...keys.usageDailyDay(day), userId] });
    for await (const entry of iter) {
      const [, , , model, field] = entry.key;
      if (typeof model !== "string") continue;
      let raw = models.get(model);
      if (!raw) models.set(model, raw = { requests: 0, prompt: 0, completion: 0 });
      if (field === "requests" || field === "prompt" || field === "completion") {
        raw[field] += u64(entry.value);
      }
    }
    if (models.size) out.set(day, models);
  };
  // A few days in flight at once: the reads overlap (a remote KV's round trips most of all).
  for (let i = 0; i < days.length; i += 10) await Promise.all(days.slice(i, i + 10).map(readDay));
  return out;
}

/** A user's usage over the last `days` UTC days including today (GET /api/usage, dashboard). */
export async function userUsage(
  kv: Deno.Kv,
  pricing: Pricing,
  userId: string,
  days: number,
  now: number = Date.now(),
): Promise<UserUsage> {
  const today = utcDay(now);
  const from = dayBefore(now, days - 1);
  const counters = await userCounters(kv, userId, from, today);
  const perModel = new Map<string, Raw>();
  const list: DayUsage[] = [];
  for (let day = from; day <= today; day = nextDay(day)) {
    const sum: Raw = { requests: 0, prompt: 0, completion: 0 };
    let cost = 0;
    for (const [model, raw] of counters.get(day) ?? []) {
      sum.requests += raw.requests;
      sum.prompt += raw.prompt;
      sum.completion += raw.completion;
      cost += costUsd(pricing, model, raw.prompt, raw.completion);
      const m = perModel.get(model) ?? { requests: 0, prompt: 0, completion: 0 };
      m.requests += raw.requests;
      m.prompt += raw.prompt;
      m.completion += raw.completion;
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
  now: number = Date.now(),
): Promise<UsageTotals> {
  const counters = await userCounters(kv, userId, since, utcDay(now));
  const sum: Raw = { requests: 0, prompt: 0, completion: 0 };
  let cost = 0;
  for (const models of counters.values()) {
    for (const [model, raw] of models) {
      sum.requests += raw.requests;
      sum.prompt += raw.prompt;
      sum.completion += raw.completion;
      cost += costUsd(pricing, model, raw.prompt, raw.completion);
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
  now: number = Date.now(),
) {
  const [status, usage] = await Promise.all([
    limitStatus(kv, config, userId, now),
    userUsage(kv, config.pricing, userId, days, now),
  ]);
  return { userId, limits: status.limits, remaining: status.remaining, ...usage };
}

export interface UsageReport {
  model: string;
  promptTokens: number;
  completionTokens: number;
}

/**
 * POST /api/usage (shared key mode): a client reports one call it made with the shared key. It
 * counts against the request limits and quotas exactly like a gateway request (429 once spent;
 * a refused report is not recorded) and is then recorded.
 */
export async function reportUsage(
  kv: Deno.Kv,
  config: Config,
  users: Users,
  userId: string,
  report: UsageReport,
  now: () => number = Date.now,
): Promise<{ remaining: Remaining; headers: Record<string, string> }> {
  // Reports come from signed-in users who may not have opened the dashboard yet.
  if (!(await users.get(userId))) await users.provision(userId);
  const admission = await admit(kv, config, {
    userId,
    clock: now,
    validate: (snap, headers) => {
      const user = snap.userEntry.value;
      if (!user || user.status === "deleted") {
        throw new AppError("user_deleted", "This account has been deleted.", headers);
      }
      if (user.status === "disabled") {
        throw new AppError("user_disabled", "This account has been disabled.", headers);
      }
      return user;
    },
  });
  await recordUsage(kv, config.pricing, { userId, ...report, at: now() });
  const tokens = report.promptTokens + report.completionTokens;
  const r = admission.remaining;
  const spent = costNanoUsd(
    config.pricing,
    report.model,
    report.promptTokens,
    report.completionTokens,
  );
  return {
    headers: admission.headers,
    remaining: {
      ...r,
      tokensToday: r.tokensToday === null ? null : Math.max(0, r.tokensToday - tokens),
      budgetUsd: r.budgetUsd === null
        ? null
        : Math.max(0, Math.round(r.budgetUsd * 1e9 - Number(spent)) / 1e9),
    },
  };
}
