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
 * - Both live in ONE entry per user (`keys.rate(userId)`). A request reads the user record, that
 *   entry and (when a quota applies) the quota counters in one `getMany`, decides, and writes the
 *   new state with an atomic commit that checks the user record and the rate entry. The user
 *   record holds the hash of the current key and is rewritten in the same commit as the key index
 *   by every rotation, revocation and status change, so a concurrent one makes the commit fail;
 *   so does a concurrent admission. The request then starts over from a fresh read (jittered
 *   back-off): N simultaneous requests against an allowance of L admit exactly min(N, L), and a
 *   key revoked or a user disabled concurrently cannot slip through.
 *   Refusals write nothing: a refused request never counts against any limit.
 * - In one process, concurrent admissions are group-committed (`Admitter`): requests arriving
 *   while a commit is in flight are decided together, in arrival order, and written with one
 *   atomic commit that checks every entry the batch read — the same guarantee, far fewer commits.
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
import type { Config } from "../core/config.ts";
import { AppError } from "../core/errors.ts";
import { commitOrConflict, type Day, keys, u64, utcDay, utcMonth } from "../core/kv.ts";
import type { UserRecord } from "../identity/users.ts";

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
  /** False when the quota counters were not read (the user had no quota when last seen). */
  countersRead: boolean;
  tokensToday: number;
  spendNanoMonth: number;
}

/** Keys per KV getMany call. */
const GET_MANY_MAX = 10;

/** Reads many keys with as few getMany calls as KV allows, all in parallel. */
async function getAll(kv: Deno.Kv, wanted: Deno.KvKey[]): Promise<Deno.KvEntryMaybe<unknown>[]> {
  if (wanted.length <= GET_MANY_MAX) return await kv.getMany(wanted);
  const calls = [];
  for (let i = 0; i < wanted.length; i += GET_MANY_MAX) {
    calls.push(kv.getMany(wanted.slice(i, i + GET_MANY_MAX)));
  }
  return (await Promise.all(calls)).flat();
}

const counterKeys = (userId: string, now: number) => [
  keys.tokensByDay(userId, utcDay(now)),
  keys.spendByMonth(userId, utcMonth(now)),
];

/**
 * Snapshots for several users: user record and rate entry always, quota counters for the users
 * `withCounters` names — packed into getMany calls of 10 keys (one round trip, in parallel).
 */
export async function readSnapshots(
  kv: Deno.Kv,
  userIds: string[],
  now: number,
  withCounters: (userId: string) => boolean,
): Promise<Map<string, LimitSnapshot>> {
  const wanted: Deno.KvKey[] = [];
  for (const id of userIds) {
    wanted.push(keys.user(id), keys.rate(id));
    if (withCounters(id)) wanted.push(...counterKeys(id, now));
  }
  const entries = await getAll(kv, wanted);
  const out = new Map<string, LimitSnapshot>();
  let i = 0;
  for (const id of userIds) {
    const userEntry = entries[i++] as Deno.KvEntryMaybe<UserRecord>;
    const rateEntry = entries[i++] as Deno.KvEntryMaybe<RateState>;
    const countersRead = withCounters(id);
    out.set(id, {
      now,
      userEntry,
      rateEntry,
      countersRead,
      tokensToday: countersRead ? u64(entries[i++].value) : 0,
      spendNanoMonth: countersRead ? u64(entries[i++].value) : 0,
    });
  }
  return out;
}

/** Fills in the quota counters of snapshots read without them (second round trip). */
async function readCounters(kv: Deno.Kv, snaps: Array<[string, LimitSnapshot]>) {
  const entries = await getAll(kv, snaps.flatMap(([id, s]) => counterKeys(id, s.now)));
  snaps.forEach(([, snap], n) => {
    snap.countersRead = true;
    snap.tokensToday = u64(entries[2 * n].value);
    snap.spendNanoMonth = u64(entries[2 * n + 1].value);
  });
}

export async function readSnapshot(
  kv: Deno.Kv,
  userId: string,
  now: number,
): Promise<LimitSnapshot> {
  return (await readSnapshots(kv, [userId], now, () => true)).get(userId)!;
}

const hasQuota = (l: EffectiveLimits) => l.tokensPerDay !== null || l.budgetUsdMonthly !== null;

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
  /**
   * Runs on every fresh snapshot before the limits (key, user state, model checks); throws an
   * AppError to refuse. `headers` are the rate headers as they stand (nothing consumed).
   */
  validate: (snap: LimitSnapshot, headers: Record<string, string>) => UserRecord;
  clock?: () => number;
  maxAttempts?: number;
}

type Evaluation =
  | { ok: true; admission: Admission; next: RateState }
  | { ok: false; error: unknown };

/**
 * Decides one request on a snapshot, with `state` as the user's rate state (the snapshot's, or
 * the state left by earlier requests of the same batch). Pure: writes nothing.
 */
function evaluate(
  config: Config,
  snap: LimitSnapshot,
  state: RateState | null,
  validate: AdmitOptions["validate"],
): Evaluation {
  const now = snap.now;
  const limits = effectiveLimits(config, snap.userEntry.value ?? { limits: {} });
  const decision = decideRate(state, limits, now);
  const current = rateHeaders(limits, decision.before, now);
  let user: UserRecord;
  try {
    user = validate(snap, current);
  } catch (error) {
    return { ok: false, error };
  }
  if (!decision.allowed) {
    return {
      ok: false,
      error: new AppError(
        "rate_limit_exceeded",
        decision.before.remainingDay < 1
          ? `Daily request limit of ${limits.rpd} reached; it resets at 00:00 UTC.`
          : `Rate limit of ${limits.rpm} requests per minute reached; retry in ${decision.retryAfter}s.`,
        { ...current, "retry-after": String(decision.retryAfter) },
      ),
    };
  }
  const quota = quotaRefusal(limits, snap, current);
  if (quota) return { ok: false, error: quota };
  return {
    ok: true,
    next: decision.next,
    admission: {
      user,
      limits,
      headers: rateHeaders(limits, decision.after, now),
      remaining: remainingOf(limits, decision.after, snap.tokensToday, snap.spendNanoMonth),
    },
  };
}

/** The rate entry is worthless after a day; KV drops idle users' entries. */
const RATE_EXPIRE_MS = 2 * DAY_MS;

/**
 * Admits one request against the user's request limits and quotas, exactly under concurrency
 * (see the comment at the top). Throws AppError 429 (or what `validate` throws) when refused.
 */
export async function admit(kv: Deno.Kv, config: Config, o: AdmitOptions): Promise<Admission> {
  const clock = o.clock ?? Date.now;
  const maxAttempts = o.maxAttempts ?? 100;
  for (let attempt = 0; attempt < maxAttempts; attempt++) {
    if (attempt > 0) await backoff(attempt);
    const snap = await readSnapshot(kv, o.userId, clock());
    const result = evaluate(config, snap, snap.rateEntry.value, o.validate);
    if (!result.ok) throw result.error;
    const op = kv.atomic().check(snap.userEntry).check(snap.rateEntry);
    op.set(keys.rate(o.userId), result.next, { expireIn: RATE_EXPIRE_MS });
    if ((await commitOrConflict(op)).ok) return result.admission;
  }
  throw new Error(`rate limit: KV commit kept conflicting after ${maxAttempts} attempts`);
}

interface Pending {
  o: AdmitOptions;
  resolve: (a: Admission) => void;
  reject: (err: unknown) => void;
}

/** At most 2 checks per request and 100 per KV commit. */
const MAX_BATCH = 50;
/** Batch attempts before the requests of a conflicting batch go on one by one. */
const BATCH_ATTEMPTS = 3;

/**
 * Writes without checks (usage sums) that ride along in the Admitter's commits, so a busy
 * gateway makes one KV commit per batch instead of one for admissions and one for usage.
 */
export interface ExtraWrites {
  hasPending(): boolean;
  /** Adds queued writes to `op` using at most `budget` mutations; null when nothing is queued. */
  take(op: Deno.AtomicOperation, budget: number): ExtraBatch | null;
}

export interface ExtraBatch {
  /** The commit went through (no error) or failed for good (error). */
  settle(err?: unknown): void;
  /** The commit did not happen (a check failed): put the writes back for the next one. */
  requeue(): void;
}

/** How long usage writes wait for an admission commit to ride with before going alone. */
const LINGER_MS = 10;

/** KV allows 1000 mutations per commit; admissions use at most MAX_BATCH of them. */
const MAX_MUTATIONS = 1000;

/**
 * Group commit for admissions (the gateway's hot path). A request is admitted at once when no
 * batch is in flight; requests arriving meanwhile form the next batch, which reads every user's
 * snapshot (one getMany each, in parallel), decides the requests in arrival order — requests of
 * one user see the rate state left by the ones before them — and writes every admission with ONE
 * atomic commit that checks all the entries it read. Exactness is the same as `admit`: the commit
 * fails if any entry changed since it was read (another process, a rotation, a disable…), and
 * the batch is decided again from fresh reads. Outcomes, refusals included, are only delivered
 * once the commit went through. After repeated conflicts the batch falls back to `admit`.
 */
export class Admitter {
  private queue: Pending[] = [];
  private running = false;
  /**
   * Users seen with a quota, whose counters are read up front. Only a hint to save a round
   * trip: the decision always uses the user record just read, and reads the counters when a
   * quota applies that the hint missed.
   */
  private readonly quotaUsers = new Set<string>();
  private readonly defaultQuota: boolean;
  private readonly wantsCounters = (userId: string) =>
    this.defaultQuota || this.quotaUsers.has(userId);
  private extra: ExtraWrites | null = null;

  constructor(
    private readonly kv: Deno.Kv,
    private readonly config: Config,
    private readonly clock: () => number = Date.now,
  ) {
    this.defaultQuota = hasQuota(effectiveLimits(config, { limits: {} }));
  }

  private remember(userId: string) {
    if (this.quotaUsers.size >= 100_000) this.quotaUsers.clear();
    this.quotaUsers.add(userId);
  }

  admit(o: Omit<AdmitOptions, "clock" | "maxAttempts">): Promise<Admission> {
    return new Promise((resolve, reject) => {
      this.queue.push({ o, resolve, reject });
      this.wake?.();
      this.kick();
    });
  }

  private wake: (() => void) | null = null;

  /** Waits up to LINGER_MS for an admission to arrive (no delay on any request's path). */
  private linger(): Promise<void> {
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(timer);
        this.wake = null;
        resolve();
      };
      const timer = setTimeout(done, LINGER_MS);
      this.wake = done;
    });
  }

  /** Lets `extra`'s writes ride along in this admitter's commits (it calls kick() on new ones). */
  carry(extra: ExtraWrites) {
    this.extra = extra;
  }

  /** Starts the writer loop unless it is running (it drains admissions and extra writes). */
  kick() {
    if (!this.running) this.run();
  }

  private async run() {
    this.running = true;
    try {
      while (this.queue.length || this.extra?.hasPending()) {
        // Extra writes alone wait a moment for an admission to ride with: one commit, not two.
        if (!this.queue.length) await this.linger();
        const batch = this.queue.splice(0, MAX_BATCH);
        try {
          if (batch.length) await this.settle(batch);
          else await this.commitExtraOnly();
        } catch (err) {
          for (const p of batch) p.reject(err);
        }
      }
    } finally {
      this.running = false;
    }
  }

  /** Nothing to admit: commit the extra writes alone (sums carry no checks, so no conflict). */
  private async commitExtraOnly() {
    const op = this.kv.atomic();
    const extra = this.extra?.take(op, MAX_MUTATIONS);
    if (!extra) return;
    try {
      const res = await commitOrConflict(op);
      if (res.ok) extra.settle();
      else extra.requeue();
    } catch (err) {
      extra.settle(err);
    }
  }

  /** Last known user and rate entries (with versionstamps) per user; see `snapshots`. */
  private readonly known = new Map<
    string,
    { userEntry: Deno.KvEntryMaybe<UserRecord>; rateEntry: Deno.KvEntryMaybe<RateState> }
  >();

  private know(
    userId: string,
    userEntry: Deno.KvEntryMaybe<UserRecord>,
    rateEntry: Deno.KvEntryMaybe<RateState>,
  ) {
    if (this.known.size >= 100_000 && !this.known.has(userId)) this.known.clear();
    this.known.set(userId, { userEntry, rateEntry });
  }

  /**
   * Snapshots for a batch. Users whose entries this process wrote or read last are not read
   * again: an admission decided on remembered entries is only written if the commit's checks
   * prove them current (else the batch is decided again from fresh reads), and a refusal decided
   * on them is decided again on a fresh read (`fresh`). So remembered state saves a KV round trip
   * but never decides an outcome on its own.
   */
  private async snapshots(
    userIds: string[],
    now: number,
    fresh: Set<string>,
  ): Promise<{ snaps: Map<string, LimitSnapshot>; remembered: Set<string> }> {
    const toRead = userIds.filter((id) => fresh.has(id) || !this.known.has(id));
    const read = toRead.length
      ? await readSnapshots(this.kv, toRead, now, this.wantsCounters)
      : new Map<string, LimitSnapshot>();
    const snaps = new Map<string, LimitSnapshot>();
    const remembered = new Set<string>();
    for (const id of userIds) {
      const got = read.get(id);
      if (got) {
        this.know(id, got.userEntry, got.rateEntry);
        snaps.set(id, got);
        continue;
      }
      const k = this.known.get(id)!;
      remembered.add(id);
      snaps.set(id, {
        now,
        userEntry: k.userEntry,
        rateEntry: k.rateEntry,
        countersRead: false,
        tokensToday: 0,
        spendNanoMonth: 0,
      });
    }
    // Quota counters move with every answer: read them whenever a quota applies.
    const missing = [...snaps].filter(([, snap]) =>
      !snap.countersRead &&
      hasQuota(effectiveLimits(this.config, snap.userEntry.value ?? { limits: {} }))
    );
    if (missing.length) {
      await readCounters(this.kv, missing);
      for (const [id] of missing) this.remember(id);
    }
    return { snaps, remembered };
  }

  private async settle(batch: Pending[]) {
    const userIds = [...new Set(batch.map((p) => p.o.userId))];
    const fresh = new Set<string>();
    let conflicts = 0;
    while (conflicts < BATCH_ATTEMPTS) {
      const now = this.clock();
      const { snaps, remembered } = await this.snapshots(userIds, now, fresh);
      const states = new Map<string, RateState>();
      const outcomes: Evaluation[] = [];
      const op = this.kv.atomic();
      const checked = new Set<string>();
      const stale = new Set<string>();
      for (const { o } of batch) {
        const snap = snaps.get(o.userId)!;
        const state = states.get(o.userId) ?? snap.rateEntry.value;
        const result = evaluate(this.config, snap, state, o.validate);
        outcomes.push(result);
        if (!result.ok) {
          if (remembered.has(o.userId)) stale.add(o.userId);
          continue;
        }
        states.set(o.userId, result.next);
        if (!checked.has(o.userId)) {
          checked.add(o.userId);
          op.check(snap.userEntry).check(snap.rateEntry);
        }
      }
      if (stale.size) {
        // A refusal must rest on a fresh read: decide the batch again with those users read.
        for (const id of stale) fresh.add(id);
        continue;
      }
      if (states.size === 0) {
        for (const [i, p] of batch.entries()) {
          const r = outcomes[i];
          if (!r.ok) p.reject(r.error);
        }
        return;
      }
      for (const [userId, next] of states) {
        op.set(keys.rate(userId), next, { expireIn: RATE_EXPIRE_MS });
      }
      const extra = this.extra?.take(op, MAX_MUTATIONS - states.size);
      let res: Deno.KvCommitResult | Deno.KvCommitError;
      try {
        res = await commitOrConflict(op);
      } catch (err) {
        extra?.settle(err);
        for (const id of userIds) this.known.delete(id);
        throw err;
      }
      if (res.ok) {
        extra?.settle();
        for (const [userId, next] of states) {
          this.know(userId, snaps.get(userId)!.userEntry, {
            key: keys.rate(userId),
            value: next,
            versionstamp: res.versionstamp,
          });
        }
        for (const [i, p] of batch.entries()) {
          const r = outcomes[i];
          if (r.ok) p.resolve(r.admission);
          else p.reject(r.error);
        }
        return;
      }
      extra?.requeue();
      // Something changed under us (another process, a rotation, a disable…): read everything.
      for (const id of userIds) fresh.add(id);
      conflicts++;
      await backoff(conflicts + 1);
    }
    // Persistent conflicts (several processes hammering the same users): go on one by one.
    for (const id of userIds) this.known.delete(id);
    await Promise.all(batch.map(async (p) => {
      try {
        p.resolve(await admit(this.kv, this.config, { ...p.o, clock: this.clock }));
      } catch (err) {
        p.reject(err);
      }
    }));
  }
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
  const snap = await readSnapshot(kv, userId, now);
  const limits = effectiveLimits(config, snap.userEntry.value ?? { limits: {} });
  const view = rateView(snap.rateEntry.value, limits, now);
  return {
    limits,
    remaining: remainingOf(limits, view, snap.tokensToday, snap.spendNanoMonth),
    user: snap.userEntry.value,
  };
}
