/**
 * Per-user limits: effective values (overrides over defaults), request limits and quotas.
 *
 * ## Algorithm
 * All state lives in KV, so any number of processes sharing one KV enforce the same limits.
 *
 * - Requests per minute: GCRA (generic cell rate algorithm) with burst = rpm. Each user has a
 *   "theoretical arrival time" `tat` (ms). With interval T = 60 000 / rpm, a request at `now` is
 *   admitted when `max(tat, now) + T − now ≤ 60 000`, and then `tat := max(tat, now) + T`. A fresh
 *   user can therefore send rpm requests at once; after that one request every T ms. This is a
 *   token bucket of capacity rpm refilled continuously, with no window edges to game.
 * - Requests per UTC day: a counter that belongs to the calendar day it was written on (it
 *   restarts at 00:00 UTC).
 * - Both live in ONE entry per user (`keys.rate(userId)`). A request reads the user record, the
 *   key index entry, that entry and the quota counters in one `getMany`, decides, and writes the
 *   new state with an atomic commit that checks the user record, the key index entry and the rate
 *   entry. A concurrent rotation, revocation, disable or admission makes the commit fail and the
 *   request starts over from a fresh read (jittered back-off), so N simultaneous requests against
 *   an allowance of L admit exactly min(N, L), and a key revoked concurrently cannot slip through.
 *   Refusals write nothing: a refused request never counts against any limit.
 * - Quotas (tokens per UTC day, spend per UTC month in nano-USD) are KvU64 sums written by the
 *   usage meter after each answer. They are checked before the request: once a counter has reached
 *   its limit the next request is refused, so the request that crosses the limit is allowed.
 *   Tokens are only known after the answer, so the counters are not part of the atomic check.
 *
 * Rate headers (every gateway response after the key check):
 * - `x-ratelimit-limit-requests`: the requests-per-minute limit (rpm);
 * - `x-ratelimit-remaining-requests`: requests that could be sent right now — the smaller of what
 *   is left of the minute allowance and of the day allowance;
 * - `x-ratelimit-reset-requests`: OpenAI-style duration ("850ms", "12s", "1m30s", "5h3m0s") until
 *   that allowance is whole again: the minute bucket refilled, or 00:00 UTC when the day
 *   allowance is the smaller one.
 * 429 answers carry `Retry-After` in whole seconds (≥ 1) until a retry can succeed.
 */
import type { Config } from "./config.ts";
import { AppError } from "./errors.ts";
import { type Day, keys, u64, utcDay, utcMonth } from "./kv.ts";
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

/** The one KV entry per user holding both request limits. */
export interface RateState {
  /** GCRA theoretical arrival time, ms since the epoch. */
  tat: number;
  day: Day;
  dayCount: number;
}

const MINUTE_MS = 60_000;
const DAY_MS = 86_400_000;
/** Absorbs float error in tat so that exactly rpm requests fit into a fresh minute. */
const EPSILON = 1e-6;

export interface RateView {
  remainingMinute: number;
  remainingDay: number;
  /** ms until the minute allowance is whole again. */
  minuteResetMs: number;
}

/** What is left of the request limits at `now`, without consuming anything. */
export function rateView(state: RateState | null, limits: EffectiveLimits, now: number): RateView {
  const interval = MINUTE_MS / limits.rpm;
  const base = state ? Math.max(state.tat, now) : now;
  const remainingMinute = Math.max(
    0,
    Math.floor((MINUTE_MS - (base - now)) / interval + EPSILON),
  );
  const dayCount = state && state.day === utcDay(now) ? state.dayCount : 0;
  return {
    remainingMinute,
    remainingDay: Math.max(0, limits.rpd - dayCount),
    minuteResetMs: base - now,
  };
}

export interface RateDecision {
  allowed: boolean;
  /** The state to write when allowed. */
  next: RateState;
  /** The view as it stands, before this request. */
  before: RateView;
  /** The view after admitting this request (equals `before` when refused). */
  after: RateView;
  /** Whole seconds until a retry can succeed (refusals only). */
  retryAfter: number;
}

/** GCRA + day counter decision for one request at `now`. */
export function decideRate(
  state: RateState | null,
  limits: EffectiveLimits,
  now: number,
): RateDecision {
  const before = rateView(state, limits, now);
  const interval = MINUTE_MS / limits.rpm;
  const base = state ? Math.max(state.tat, now) : now;
  const today = utcDay(now);
  const dayCount = state && state.day === today ? state.dayCount : 0;
  const allowed = before.remainingMinute >= 1 && before.remainingDay >= 1;
  const next: RateState = { tat: base + interval, day: today, dayCount: dayCount + 1 };
  if (allowed) {
    const after = {
      remainingMinute: before.remainingMinute - 1,
      remainingDay: before.remainingDay - 1,
      minuteResetMs: next.tat - now,
    };
    return { allowed, next, before, after, retryAfter: 0 };
  }
  let waitMs = 0;
  if (before.remainingMinute < 1) waitMs = base + interval - MINUTE_MS - now;
  if (before.remainingDay < 1) waitMs = Math.max(waitMs, msUntilNextDay(now));
  const retryAfter = Math.max(1, Math.ceil(waitMs / 1000));
  return { allowed, next, before, after: before, retryAfter };
}

export function msUntilNextDay(now: number): number {
  return DAY_MS - (now % DAY_MS);
}

export function msUntilNextMonth(now: number): number {
  const d = new Date(now);
  return Date.UTC(d.getUTCFullYear(), d.getUTCMonth() + 1, 1) - now;
}

/** OpenAI-style duration: "850ms", "12s", "1.5s", "1m30s", "5h3m0s". */
export function formatDuration(ms: number): string {
  if (ms <= 0) return "0s";
  if (ms < 1000) return `${Math.ceil(ms)}ms`;
  const totalS = ms / 1000;
  if (totalS < 60) return `${Math.round(totalS * 1000) / 1000}s`;
  const s = Math.ceil(totalS);
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const rest = s % 60;
  return h > 0 ? `${h}h${m}m${rest}s` : `${m}m${rest}s`;
}

/** The three x-ratelimit-* headers for a view (see the comment at the top). */
export function rateHeaders(
  limits: EffectiveLimits,
  view: RateView,
  now: number,
): Record<string, string> {
  const dayBinds = view.remainingDay < view.remainingMinute;
  return {
    "x-ratelimit-limit-requests": String(limits.rpm),
    "x-ratelimit-remaining-requests": String(Math.min(view.remainingMinute, view.remainingDay)),
    "x-ratelimit-reset-requests": formatDuration(
      dayBinds ? msUntilNextDay(now) : view.minuteResetMs,
    ),
  };
}

/** Everything one admission decision needs, read in one KV round trip. */
export interface LimitSnapshot {
  now: number;
  userEntry: Deno.KvEntryMaybe<UserRecord>;
  rateEntry: Deno.KvEntryMaybe<RateState>;
  /** The key index entry when the request came with an API key. */
  indexEntry: Deno.KvEntryMaybe<{ userId: string }> | null;
  tokensToday: number;
  spendNanoMonth: number;
}

export async function readSnapshot(
  kv: Deno.Kv,
  userId: string,
  keyHash: string | null,
  now: number,
): Promise<LimitSnapshot> {
  const wanted: Deno.KvKey[] = [
    keys.user(userId),
    keys.rate(userId),
    keys.tokensByDay(userId, utcDay(now)),
    keys.spendByMonth(userId, utcMonth(now)),
  ];
  if (keyHash) wanted.push(keys.keyByHash(keyHash));
  const entries = await kv.getMany(wanted);
  return {
    now,
    userEntry: entries[0] as Deno.KvEntryMaybe<UserRecord>,
    rateEntry: entries[1] as Deno.KvEntryMaybe<RateState>,
    tokensToday: u64(entries[2].value),
    spendNanoMonth: u64(entries[3].value),
    indexEntry: keyHash ? entries[4] as Deno.KvEntryMaybe<{ userId: string }> : null,
  };
}

export interface Remaining {
  minute: number;
  day: number;
  tokensToday: number | null;
  budgetUsd: number | null;
}

export function remainingOf(
  limits: EffectiveLimits,
  view: RateView,
  tokensToday: number,
  spendNanoMonth: number,
): Remaining {
  return {
    minute: view.remainingMinute,
    day: view.remainingDay,
    tokensToday: limits.tokensPerDay === null
      ? null
      : Math.max(0, limits.tokensPerDay - tokensToday),
    budgetUsd: limits.budgetUsdMonthly === null
      ? null
      : Math.max(0, Math.round(limits.budgetUsdMonthly * 1e9 - spendNanoMonth) / 1e9),
  };
}

/** The quota refusal for a snapshot, or null when both quotas have room left. */
export function quotaRefusal(
  limits: EffectiveLimits,
  snap: Pick<LimitSnapshot, "tokensToday" | "spendNanoMonth" | "now">,
  headers: Record<string, string>,
): AppError | null {
  if (limits.tokensPerDay !== null && snap.tokensToday >= limits.tokensPerDay) {
    return new AppError(
      "quota_exceeded",
      `Daily token quota of ${limits.tokensPerDay} tokens is used up; it resets at 00:00 UTC.`,
      { ...headers, "retry-after": String(Math.ceil(msUntilNextDay(snap.now) / 1000)) },
    );
  }
  if (
    limits.budgetUsdMonthly !== null && snap.spendNanoMonth >= limits.budgetUsdMonthly * 1e9
  ) {
    return new AppError(
      "quota_exceeded",
      `Monthly budget of $${limits.budgetUsdMonthly} is spent; it resets on the 1st (UTC).`,
      { ...headers, "retry-after": String(Math.ceil(msUntilNextMonth(snap.now) / 1000)) },
    );
  }
  return null;
}

export interface Admission {
  user: UserRecord;
  limits: EffectiveLimits;
  headers: Record<string, string>;
  remaining: Remaining;
}

export interface AdmitOptions {
  userId: string;
  /** Set for API-key requests: the key index entry must still point at this user. */
  keyHash: string | null;
  /**
   * Runs on every fresh snapshot before the limits (key, user state, model checks); throws an
   * AppError to refuse. `headers` are the rate headers as they stand (nothing consumed).
   */
  validate: (snap: LimitSnapshot, headers: Record<string, string>) => UserRecord;
  clock?: () => number;
  maxAttempts?: number;
}

/**
 * Admits one request against the user's request limits and quotas, exactly under concurrency
 * (see the comment at the top). Throws AppError 429 (or what `validate` throws) when refused.
 */
export async function admit(kv: Deno.Kv, config: Config, o: AdmitOptions): Promise<Admission> {
  const clock = o.clock ?? Date.now;
  const maxAttempts = o.maxAttempts ?? 100;
  for (let attempt = 0; attempt < maxAttempts; attempt++) {
    if (attempt > 0) await backoff(attempt);
    const snap = await readSnapshot(kv, o.userId, o.keyHash, clock());
    const now = snap.now;
    const limits = effectiveLimits(config, snap.userEntry.value ?? { limits: {} });
    const decision = decideRate(snap.rateEntry.value, limits, now);
    const current = rateHeaders(limits, decision.before, now);
    const user = o.validate(snap, current);
    if (!decision.allowed) {
      throw new AppError(
        "rate_limit_exceeded",
        decision.before.remainingDay < 1
          ? `Daily request limit of ${limits.rpd} reached; it resets at 00:00 UTC.`
          : `Rate limit of ${limits.rpm} requests per minute reached; retry in ${decision.retryAfter}s.`,
        { ...current, "retry-after": String(decision.retryAfter) },
      );
    }
    const quota = quotaRefusal(limits, snap, current);
    if (quota) throw quota;
    const op = kv.atomic().check(snap.userEntry).check(snap.rateEntry);
    if (snap.indexEntry) op.check(snap.indexEntry);
    // The state is worthless after a day; let KV drop idle users' entries.
    op.set(keys.rate(o.userId), decision.next, { expireIn: 2 * DAY_MS });
    const res = await commitOrConflict(op);
    if (res.ok) {
      return {
        user,
        limits,
        headers: rateHeaders(limits, decision.after, now),
        remaining: remainingOf(limits, decision.after, snap.tokensToday, snap.spendNanoMonth),
      };
    }
  }
  throw new Error(`rate limit: KV commit kept conflicting after ${maxAttempts} attempts`);
}

/** Jittered exponential back-off so a burst of contenders does not retry in lock-step. */
function backoff(attempt: number): Promise<void> {
  if (attempt === 1) return Promise.resolve();
  const capMs = Math.min(2 ** (attempt - 1), 25);
  return new Promise((r) => setTimeout(r, Math.random() * capMs));
}

/** The user's limits and what is left of them right now (dashboard, GET /api/usage). */
export async function limitStatus(
  kv: Deno.Kv,
  config: Config,
  userId: string,
  now: number = Date.now(),
): Promise<{ limits: EffectiveLimits; remaining: Remaining; user: UserRecord | null }> {
  const snap = await readSnapshot(kv, userId, null, now);
  const limits = effectiveLimits(config, snap.userEntry.value ?? { limits: {} });
  const view = rateView(snap.rateEntry.value, limits, now);
  return {
    limits,
    remaining: remainingOf(limits, view, snap.tokensToday, snap.spendNanoMonth),
    user: snap.userEntry.value,
  };
}
