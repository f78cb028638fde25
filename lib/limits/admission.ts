/**
 * Admission and settlement: every admitted request holds a Lease (CONTRACT §5 "Limits are
 * exact…", "Quotas are reserved…", "Usage is visible at once").
 *
 * ## State
 * One KV entry per user (`keys.rate`) holds the request limits (GCRA `tat`, the day's count) and
 * the leases of that user's requests in flight: for each, when it expires unless renewed, the
 * tokens and nano-USD it reserved, its prompt estimate and the completion tokens estimated from
 * what it had relayed at its last renewal. The used quotas are KvU64 sums (`keys.tokensByDay`,
 * `keys.spendByMonth`) that only change in a commit that also rewrites the user's limit entry.
 * An index `["lease_expiry", exp, leaseId] → userId` lets any process find expired leases.
 *
 * ## Commits
 * - **Admission** decides on the user record, the limit entry and the quota counters, in the
 *   contract's order (key and user state → model → request limits → concurrency → quotas), and
 *   writes the new limit entry with the lease added, checking the user record and the limit
 *   entry: a concurrent admission, settlement, rotation or disable anywhere makes the commit fail
 *   and the request is decided again from fresh reads. So N simultaneous requests against an
 *   allowance of L admit exactly min(N, L): requests per minute and day, slots
 *   (`CONCURRENCY_LIMIT`) and quota reservations alike, across any number of processes.
 * - **Settlement** removes the lease and adds what was used — the metered usage, or the
 *   estimate — to the usage counters, in one commit that checks the limit entry. The gateway
 *   awaits it before the answer's last byte, so a usage read after a response counts it.
 * - **Renewal**: a process renews its leases every few seconds while their requests live.
 *   A lease that is not renewed expires after LEASE_TTL_MS: it stops holding a slot at once, and
 *   the next commit for that user — or the reaper, which every process runs — removes it and
 *   charges its estimate (prompt estimate + completion relayed by its last renewal). A settlement
 *   that finds its lease already reaped charges only what goes beyond that estimate: nothing is
 *   lost and nothing is counted twice.
 *
 * ## Group commit
 * Operations that arrive while a commit is in flight go together into the next one, in arrival
 * order; one user's operations see the state left by the ones before them. A commit takes at most
 * 10 checks (KV Connect's limit: one or two per user) and stays far below 1000 mutations and
 * 800 KiB. Entries this process wrote last are not read again: an admission decided on them is
 * only written if the commit's checks prove them current, and a refusal decided on them is
 * decided again on a fresh read.
 */
import type { Config } from "../core/config.ts";
import { AppError } from "../core/errors.ts";
import { commitOrConflict, keys, u64, utcDay, utcMonth } from "../core/kv.ts";
import type { Logger } from "../core/log.ts";
import type { UserRecord } from "../identity/users.ts";
import { costNanoUsd, priceOf, type Pricing } from "../usage/pricing.ts";
import { addUsageSums, type TokenUsage, type UsageSums } from "../usage/usage.ts";
import { decideRate, type RateState, rateView } from "./gcra.ts";
import {
  type EffectiveLimits,
  effectiveLimits,
  FINAL,
  hasQuota,
  msUntilNextDay,
  msUntilNextMonth,
  rateHeaders,
  type Remaining,
  remainingOf,
} from "./policy.ts";

/** A lease not renewed for this long is expired: its slot is free, its estimate is charged. */
export const LEASE_TTL_MS = 20_000;
/** A lease is renewed once it is this old. */
const RENEW_AFTER_MS = 5_000;
/** How often renewals and the reaper run. */
const TICK_MS = 2_500;
/** Expired leases reaped per user and commit (each is 7 mutations). */
const REAP_PER_USER = 4;
/** KV Connect's limits per atomic commit (CONTRACT §8). */
export const KV_MAX_CHECKS = 10;
export const KV_MAX_MUTATIONS = 1000;
/** Mutations the operations of one batch may use; the rest is kept for reaping. */
const BATCH_MUTATIONS = KV_MAX_MUTATIONS - KV_MAX_CHECKS * (1 + REAP_PER_USER * 7);
const MAX_OPS = 64;
/** Batch attempts before a conflicting batch goes on one user at a time. */
const BATCH_ATTEMPTS = 3;
const MAX_ATTEMPTS = 100;
const DAY_MS = 86_400_000;
/** The limit entry is worthless after a day without requests; KV drops idle users' entries. */
const STATE_EXPIRE_MS = 2 * DAY_MS;
/** Keys per KV getMany call. */
const GET_MANY_MAX = 10;

/** One request in flight, as stored in the user's limit entry. */
export interface LeaseHold {
  /** Expires at (ms since the epoch) unless renewed. */
  exp: number;
  model: string;
  /** Reserved against the daily token quota and the monthly budget. */
  tokens: number;
  nano: number;
  /** Charged if the lease expires: the prompt estimate and the completion relayed so far. */
  prompt: number;
  completion: number;
}

/** The user's limit entry: request limits and the leases of requests in flight. */
export interface LimitState extends RateState {
  leases?: Record<string, LeaseHold>;
}

export type Outcome =
  /** The answer was relayed to its end. */
  | "complete"
  /** The upstream stream broke or stalled mid-answer. */
  | "cut"
  /** The client left. */
  | "cancelled"
  /** No answer in time (the upstream may have processed the prompt). */
  | "timeout"
  /** The upstream could not be reached: it never saw the request. */
  | "unreachable"
  /** The upstream refused the request (an error status): nothing was generated. */
  | "refused";

/** What a request is charged. */
export interface Charge {
  promptTokens: number;
  completionTokens: number;
  /** True when no `usage` was metered and the charge is the estimate. */
  estimated: boolean;
}

/**
 * The charge for an answer: its metered usage when there is one; otherwise the prompt estimate
 * plus the completion estimated from what was relayed when the upstream got the request and did
 * not refuse it, and nothing when it never got it or refused it.
 */
export function chargeFor(
  usage: TokenUsage | null,
  outcome: Outcome,
  promptEstimate: number,
  relayedTokens: number,
): Charge {
  if (usage) return { ...usage, estimated: false };
  if (outcome === "unreachable" || outcome === "refused") {
    return { promptTokens: 0, completionTokens: 0, estimated: false };
  }
  return { promptTokens: promptEstimate, completionTokens: relayedTokens, estimated: true };
}

export interface AdmitRequest {
  userId: string;
  /** The model as priced and recorded. */
  model: string;
  /** Tokens reserved against the quotas (prompt estimate and output allowance), 0 for none. */
  reserve: { prompt: number; output: number };
  /**
   * The key and user-state checks (and model allow-list) on each fresh read, before the limits;
   * throws an AppError to refuse. `headers` are the rate headers as they stand.
   */
  validate: (user: UserRecord | null, headers: Record<string, string>) => UserRecord;
}

/** An admitted request: holds its slot and reservation until settled. */
export class Lease {
  /** Completion tokens estimated from what has been relayed so far (the relay keeps it current). */
  relayedTokens = 0;
  /** The hold as last committed: what a reaper charges if this process dies. */
  committed: { exp: number; completion: number };
  /** A renewal is in flight. */
  renewing = false;
  private settling: Promise<Charge> | null = null;

  constructor(
    readonly id: string,
    readonly user: UserRecord,
    readonly limits: EffectiveLimits,
    /** x-ratelimit-* headers for the answer. */
    readonly headers: Record<string, string>,
    readonly remaining: Remaining,
    readonly model: string,
    readonly promptEstimate: number,
    exp: number,
    private readonly ledger: Ledger,
  ) {
    this.committed = { exp, completion: 0 };
  }

  /**
   * Replaces the reservation with what was used and frees the slot: one atomic commit. Once per
   * lease; later calls get the first call's promise. Resolves to what was charged.
   */
  settle(
    usage: TokenUsage | null,
    outcome: Outcome,
    relayedTokens = this.relayedTokens,
  ): Promise<Charge> {
    return this.settling ??= this.ledger.settle(
      this,
      chargeFor(usage, outcome, this.promptEstimate, relayedTokens),
    );
  }

  get settled(): boolean {
    return this.settling !== null;
  }
}

interface Deferred<T> {
  resolve: (v: T) => void;
  reject: (err: unknown) => void;
}

type Op =
  | ({ kind: "admit"; userId: string; req: AdmitRequest } & Deferred<Lease>)
  | ({ kind: "settle"; userId: string; lease: Lease; charge: Charge } & Deferred<Charge>)
  | ({ kind: "renew"; userId: string; leases: Lease[] } & Deferred<void>)
  | ({ kind: "reap"; userId: string; orphans: Deno.KvKey[] } & Deferred<void>);

const leaseExpiryKey = (exp: number, id: string) => ["lease_expiry", exp, id] as const;

/** Estimated mutations of an operation (the state entry is counted per user). */
function mutationsOf(op: Op): number {
  switch (op.kind) {
    case "admit":
      return 1;
    case "settle":
      return 1 + 6;
    case "renew":
      return 2 * op.leases.length;
    case "reap":
      return op.orphans.length;
  }
}

interface Snapshot {
  userEntry: Deno.KvEntryMaybe<UserRecord> | null;
  stateEntry: Deno.KvEntryMaybe<LimitState>;
  /** Quota counters, or null when not read (no admission, or no quota). */
  counters: { tokens: number; nano: number } | null;
  /** Decided on what this process remembers (not read in this attempt). */
  remembered: boolean;
}

/** The outcome of planning one batch on its snapshots (pure: nothing written). */
interface Plan {
  op: Deno.AtomicOperation;
  writes: boolean;
  /** Users whose refusals rest on remembered entries: read them and plan again. */
  stale: Set<string>;
  /** Runs after the commit went through (or when nothing had to be written). */
  deliver: Array<() => void>;
  /** New limit entries per user, to remember after the commit. */
  states: Map<string, LimitState>;
}

type Known = {
  userEntry: Deno.KvEntryMaybe<UserRecord> | null;
  stateEntry: Deno.KvEntryMaybe<LimitState>;
};

/**
 * The one admission path (gateway and shared mode's POST /api/usage): admits requests as Leases,
 * settles them, renews the live ones and reaps the expired ones, group-committed.
 */
export class Ledger {
  private queue: Op[] = [];
  private running = false;
  private idle: Array<() => void> = [];
  private readonly known = new Map<string, Known>();
  /** Users seen with a quota, whose counters are read up front (a hint; never decides). */
  private readonly quotaUsers = new Set<string>();
  private readonly defaultQuota: boolean;
  /** This process's leases not yet settled (renewed by the timer). */
  private readonly live = new Map<string, Lease>();
  private readonly reaping = new Set<string>();
  private readonly prefix = crypto.randomUUID().slice(0, 8);
  private seq = 0;
  private ticks = 0;
  private timer: ReturnType<typeof setInterval> | undefined;
  readonly pricing: Pricing;

  constructor(
    private readonly kv: Deno.Kv,
    private readonly config: Config,
    private readonly options: { clock?: () => number; log?: Logger } = {},
  ) {
    this.pricing = config.pricing;
    this.defaultQuota = hasQuota(effectiveLimits(config, { limits: {} }));
    const timer = setInterval(() => this.tick(), TICK_MS);
    Deno.unrefTimer(timer);
    this.timer = timer;
  }

  private now(): number {
    return (this.options.clock ?? Date.now)();
  }

  /** Admits one request (throws the refusal as an AppError). */
  admit(req: AdmitRequest): Promise<Lease> {
    return new Promise((resolve, reject) =>
      this.push({ kind: "admit", userId: req.userId, req, resolve, reject })
    );
  }

  /** Lease.settle's commit. */
  settle(lease: Lease, charge: Charge): Promise<Charge> {
    this.live.delete(lease.id);
    return new Promise((resolve, reject) =>
      this.push({ kind: "settle", userId: lease.user.id, lease, charge, resolve, reject })
    );
  }

  /** Leases of this process not yet settled. */
  get inFlight(): number {
    return this.live.size;
  }

  /** Stops the renewal timer and waits for queued commits (shutdown, tests). */
  async close(): Promise<void> {
    clearInterval(this.timer);
    this.timer = undefined;
    if (this.running || this.queue.length) await new Promise<void>((r) => this.idle.push(r));
  }

  private push(op: Op) {
    this.queue.push(op);
    if (!this.running) this.run();
  }

  private async run() {
    this.running = true;
    try {
      while (this.queue.length) {
        const batch = this.takeBatch();
        try {
          await this.commitBatch(batch, BATCH_ATTEMPTS);
        } catch (err) {
          for (const op of batch) op.reject(err);
        }
      }
    } finally {
      this.running = false;
      for (const r of this.idle.splice(0)) r();
    }
  }

  /** The next operations that fit one commit: ≤ 10 checks, bounded mutations, in order. */
  private takeBatch(): Op[] {
    const users = new Map<string, { admits: boolean }>();
    let checks = 0;
    let mutations = 0;
    let n = 0;
    for (; n < this.queue.length && n < MAX_OPS; n++) {
      const op = this.queue[n];
      const seen = users.get(op.userId);
      const admits = op.kind === "admit";
      const addChecks = (seen ? 0 : 1) + (admits && !seen?.admits ? 1 : 0);
      const addMutations = mutationsOf(op) + (seen ? 0 : 1);
      if (
        n > 0 && (checks + addChecks > KV_MAX_CHECKS || mutations + addMutations > BATCH_MUTATIONS)
      ) {
        break;
      }
      checks += addChecks;
      mutations += addMutations;
      users.set(op.userId, { admits: admits || !!seen?.admits });
    }
    return this.queue.splice(0, n);
  }

  private async commitBatch(batch: Op[], attempts: number): Promise<void> {
    const userIds = [...new Set(batch.map((op) => op.userId))];
    const fresh = new Set<string>();
    let conflicts = 0;
    while (true) {
      const now = this.now();
      const snaps = await this.snapshots(batch, userIds, now, fresh);
      const plan = this.plan(batch, snaps, now);
      if (plan.stale.size) {
        for (const id of plan.stale) fresh.add(id);
        continue;
      }
      if (!plan.writes) {
        for (const d of plan.deliver) d();
        return;
      }
      let res: Deno.KvCommitResult | Deno.KvCommitError;
      try {
        res = await commitOrConflict(plan.op);
      } catch (err) {
        for (const id of userIds) this.known.delete(id);
        throw err;
      }
      if (res.ok) {
        for (const [userId, value] of plan.states) {
          const snap = snaps.get(userId)!;
          this.remember(userId, snap.userEntry, {
            key: keys.rate(userId),
            value,
            versionstamp: res.versionstamp,
          });
        }
        for (const d of plan.deliver) d();
        return;
      }
      // Something changed under us (another process, a rotation, a disable…): read everything.
      for (const id of userIds) {
        fresh.add(id);
        this.known.delete(id);
      }
      conflicts++;
      if (conflicts >= attempts) break;
      await backoff(conflicts + 1);
    }
    if (userIds.length === 1) {
      throw new Error(`limits: KV commit kept conflicting after ${attempts} attempts`);
    }
    // Persistent conflicts (several processes busy with the same users): one user at a time.
    await Promise.all(userIds.map(async (id) => {
      const ops = batch.filter((op) => op.userId === id);
      try {
        await this.commitBatch(ops, MAX_ATTEMPTS);
      } catch (err) {
        for (const op of ops) op.reject(err);
      }
    }));
  }

  private remember(
    userId: string,
    userEntry: Deno.KvEntryMaybe<UserRecord> | null,
    stateEntry: Deno.KvEntryMaybe<LimitState>,
  ) {
    if (this.known.size >= 100_000 && !this.known.has(userId)) this.known.clear();
    this.known.set(userId, { userEntry, stateEntry });
  }

  /** Reads what the batch needs that this process does not remember (one round trip, usually). */
  private async snapshots(
    batch: Op[],
    userIds: string[],
    now: number,
    fresh: Set<string>,
  ): Promise<Map<string, Snapshot>> {
    const admitting = new Set(batch.filter((op) => op.kind === "admit").map((op) => op.userId));
    const wanted: Deno.KvKey[][] = [];
    const plans: Array<{ id: string; user: boolean; state: boolean; counters: boolean }> = [];
    for (const id of userIds) {
      const k = fresh.has(id) ? undefined : this.known.get(id);
      const admits = admitting.has(id);
      const p = {
        id,
        user: admits && !k?.userEntry,
        state: !k,
        counters: admits && (this.defaultQuota || this.quotaUsers.has(id)),
      };
      const group: Deno.KvKey[] = [];
      if (p.user) group.push(keys.user(id));
      if (p.state) group.push(keys.rate(id));
      if (p.counters) group.push(...counterKeys(id, now));
      if (group.length) wanted.push(group);
      plans.push(p);
    }
    const entries = await getGroups(this.kv, wanted);
    const out = new Map<string, Snapshot>();
    const missing: string[] = [];
    let i = 0;
    for (const p of plans) {
      const k = this.known.get(p.id);
      const userEntry = p.user
        ? entries[i++] as Deno.KvEntryMaybe<UserRecord>
        : k?.userEntry ?? null;
      const stateEntry = p.state ? entries[i++] as Deno.KvEntryMaybe<LimitState> : k!.stateEntry;
      const counters = p.counters
        ? { tokens: u64(entries[i++].value), nano: u64(entries[i++].value) }
        : null;
      out.set(p.id, { userEntry, stateEntry, counters, remembered: !(p.user && p.state) });
      if (p.state || p.user) this.remember(p.id, userEntry, stateEntry);
      if (
        admitting.has(p.id) && !counters &&
        hasQuota(effectiveLimits(this.config, userEntry?.value ?? { limits: {} }))
      ) missing.push(p.id);
    }
    if (missing.length) {
      // The quota hint missed these users: read their counters too (second round trip).
      // Safe although read after the limit entry: the counters only change together with it.
      const more = await getGroups(this.kv, missing.map((id) => counterKeys(id, now)));
      missing.forEach((id, n) => {
        out.get(id)!.counters = {
          tokens: u64(more[2 * n].value),
          nano: u64(more[2 * n + 1].value),
        };
        if (this.quotaUsers.size >= 100_000) this.quotaUsers.clear();
        this.quotaUsers.add(id);
      });
    }
    return out;
  }

  /** Decides every operation of the batch on its snapshots and builds the one commit. */
  private plan(batch: Op[], snaps: Map<string, Snapshot>, now: number): Plan {
    const op = this.kv.atomic();
    const plan: Plan = { op, writes: false, stale: new Set(), deliver: [], states: new Map() };
    const sums: UsageSums = new Map();
    const deleted = new Set<string>();
    const deleteIndex = (exp: number, id: string) => {
      deleted.add(id);
      op.delete(leaseExpiryKey(exp, id));
    };
    for (const userId of new Set(batch.map((o) => o.userId))) {
      const snap = snaps.get(userId)!;
      const ops = batch.filter((o) => o.userId === userId);
      const before = snap.stateEntry.value;
      const state: LimitState = before
        ? {
          tat: before.tat,
          day: before.day,
          dayCount: before.dayCount,
          leases: { ...before.leases },
        }
        : { tat: 0, day: "", dayCount: 0, leases: {} };
      const leases = state.leases!;
      let hasRate = before !== null;
      let changed = false;
      // Usage charged in this commit, counted against today's quotas by later admissions.
      let usedTokens = snap.counters?.tokens ?? 0;
      let usedNano = snap.counters?.nano ?? 0;
      const charge = (
        model: string,
        c: { prompt: number; completion: number; requests: number },
      ) => {
        addUsageSums(sums, this.pricing, {
          userId,
          model,
          promptTokens: c.prompt,
          completionTokens: c.completion,
          requests: c.requests,
          at: now,
        });
        usedTokens += c.prompt + c.completion;
        usedNano += Number(costNanoUsd(this.pricing, model, c.prompt, c.completion));
      };
      // Expired leases: their process did not renew them (it died, or lost KV for a while).
      let reaped = 0;
      for (const [id, hold] of Object.entries(leases)) {
        if (hold.exp > now || reaped >= REAP_PER_USER) continue;
        delete leases[id];
        deleteIndex(hold.exp, id);
        charge(hold.model, { prompt: hold.prompt, completion: hold.completion, requests: 1 });
        changed = true;
        reaped++;
      }
      let checkUser = false;
      for (const o of ops) {
        switch (o.kind) {
          case "admit": {
            const result = this.decide(o.req, snap, state, hasRate, now, usedTokens, usedNano);
            checkUser = true;
            if (!(result instanceof AppError)) {
              state.tat = result.next.tat;
              state.day = result.next.day;
              state.dayCount = result.next.dayCount;
              hasRate = true;
              leases[result.lease.id] = result.hold;
              op.set(leaseExpiryKey(result.hold.exp, result.lease.id), userId);
              changed = true;
              const lease = result.lease;
              plan.deliver.push(() => {
                this.live.set(lease.id, lease);
                o.resolve(lease);
              });
            } else {
              if (snap.remembered) plan.stale.add(userId);
              plan.deliver.push(() => o.reject(result));
            }
            break;
          }
          case "settle": {
            const { lease, charge: c } = o;
            const hold = leases[lease.id];
            if (hold) {
              delete leases[lease.id];
              deleteIndex(hold.exp, lease.id);
              changed = true;
              charge(lease.model, {
                prompt: c.promptTokens,
                completion: c.completionTokens,
                requests: 1,
              });
            } else {
              // Reaped already (charged its estimate as of its last renewal): only the rest.
              charge(lease.model, {
                prompt: Math.max(0, c.promptTokens - lease.promptEstimate),
                completion: Math.max(0, c.completionTokens - lease.committed.completion),
                requests: 0,
              });
            }
            plan.deliver.push(() => o.resolve(c));
            break;
          }
          case "renew": {
            const renewed: Array<[Lease, number, number]> = [];
            for (const lease of o.leases) {
              const hold = leases[lease.id];
              if (!hold) continue; // settled or reaped meanwhile
              const exp = now + LEASE_TTL_MS;
              op.delete(leaseExpiryKey(hold.exp, lease.id));
              op.set(leaseExpiryKey(exp, lease.id), userId);
              leases[lease.id] = { ...hold, exp, completion: lease.relayedTokens };
              renewed.push([lease, exp, lease.relayedTokens]);
              changed = true;
            }
            plan.deliver.push(() => {
              for (const [lease, exp, completion] of renewed) lease.committed = { exp, completion };
              o.resolve();
            });
            break;
          }
          case "reap": {
            // Index entries whose lease is gone (its limit entry expired): nothing to charge.
            for (const key of o.orphans) {
              const id = String(key[2]);
              if (!leases[id] && !deleted.has(id)) {
                deleted.add(id);
                op.delete(key);
                plan.writes = true;
              }
            }
            plan.deliver.push(() => o.resolve());
            break;
          }
        }
      }
      // Every commit that changes what a user has used rewrites their limit entry, so checking
      // that entry (and the user record, for admissions) makes every decision exact.
      op.check(snap.stateEntry);
      if (checkUser && snap.userEntry) op.check(snap.userEntry);
      if (changed && hasRate) {
        op.set(keys.rate(userId), state, { expireIn: STATE_EXPIRE_MS });
        plan.states.set(userId, state);
        plan.writes = true;
      }
    }
    for (const { key, n } of sums.values()) op.sum(key, n);
    if (sums.size) plan.writes = true;
    return plan;
  }

  /** One admission on the user's state as it stands in this batch (pure). */
  private decide(
    req: AdmitRequest,
    snap: Snapshot,
    state: LimitState,
    hasRate: boolean,
    now: number,
    usedTokens: number,
    usedNano: number,
  ): { lease: Lease; hold: LeaseHold; next: RateState } | AppError {
    const user = snap.userEntry?.value ?? null;
    const limits = effectiveLimits(this.config, user ?? { limits: {} });
    const rateState = hasRate ? state : null;
    const decision = decideRate(rateState, limits, now);
    const current = rateHeaders(limits, decision.before, now);
    let checked: UserRecord;
    try {
      checked = req.validate(user, current);
    } catch (err) {
      if (err instanceof AppError) return err;
      throw err;
    }
    if (limits.budgetUsdMonthly !== null && !priceOf(this.pricing, req.model)) {
      return new AppError(
        "model_not_allowed",
        `model: "${req.model}" has no price, and this account has a monthly budget; ` +
          "the operator must add a price for it (PRICING) before it can be used here.",
        current,
      );
    }
    if (!decision.allowed) {
      const dayLimit = decision.before.remainingDay < 1;
      return new AppError(
        "rate_limit_exceeded",
        dayLimit
          ? `Daily request limit of ${limits.rpd} reached; it resets at 00:00 UTC.`
          : `Rate limit of ${limits.rpm} requests per minute reached; retry in ${decision.retryAfter}s.`,
        { ...current, "retry-after": String(decision.retryAfter), ...(dayLimit ? FINAL : {}) },
      );
    }
    const holds = Object.values(state.leases!);
    const inFlight = holds.filter((h) => h.exp > now).length;
    if (inFlight >= this.config.concurrencyLimit) {
      return new AppError(
        "concurrency_limit_exceeded",
        `${this.config.concurrencyLimit} requests of this account are in flight already; ` +
          "retry when one of them has finished.",
        { ...current, "retry-after": "1" },
      );
    }
    const reserveTokens = req.reserve.prompt + req.reserve.output;
    const reserveNano = Number(
      costNanoUsd(this.pricing, req.model, req.reserve.prompt, req.reserve.output),
    );
    let heldTokens = 0;
    let heldNano = 0;
    for (const h of holds) {
      heldTokens += h.tokens;
      heldNano += h.nano;
    }
    const refusal = quotaRefusal(limits, now, current, {
      usedTokens,
      usedNano,
      heldTokens,
      heldNano,
      reserveTokens,
      reserveNano,
      reserveOutput: req.reserve.output,
    });
    if (refusal) return refusal;
    const id = `${this.prefix}-${(this.seq++).toString(36)}`;
    const exp = now + LEASE_TTL_MS;
    const hold: LeaseHold = {
      exp,
      model: req.model,
      tokens: reserveTokens,
      nano: reserveNano,
      prompt: req.reserve.prompt,
      completion: 0,
    };
    const lease = new Lease(
      id,
      checked,
      limits,
      rateHeaders(limits, decision.after, now),
      remainingOf(
        limits,
        decision.after,
        usedTokens + heldTokens + reserveTokens,
        usedNano + heldNano + reserveNano,
      ),
      req.model,
      req.reserve.prompt,
      exp,
      this,
    );
    return { lease, hold, next: decision.next };
  }

  /** Timer: renews this process's leases that are due, and (every other tick) reaps. */
  private tick() {
    const now = this.now();
    const due = new Map<string, Lease[]>();
    for (const lease of this.live.values()) {
      if (lease.renewing || lease.committed.exp - now > LEASE_TTL_MS - RENEW_AFTER_MS) continue;
      lease.renewing = true;
      const list = due.get(lease.user.id);
      if (list) list.push(lease);
      else due.set(lease.user.id, [lease]);
    }
    for (const [userId, leases] of due) {
      const done = () => {
        for (const l of leases) l.renewing = false;
      };
      this.push({
        kind: "renew",
        userId,
        leases,
        resolve: done,
        reject: (err) => {
          done();
          this.options.log?.warn("lease renewal failed", { userId, error: String(err) });
        },
      });
    }
    if (this.ticks++ % 2 === 0) {
      this.reap().catch((err) =>
        this.options.log?.warn("lease reaper failed", { error: String(err) })
      );
    }
  }

  /** Finds expired leases (any process's) and settles them with their estimate. */
  async reap(): Promise<void> {
    const now = this.now();
    const byUser = new Map<string, Deno.KvKey[]>();
    const iter = this.kv.list<string>(
      { start: ["lease_expiry"], end: ["lease_expiry", now] },
      { limit: 500 },
    );
    for await (const entry of iter) {
      const userId = entry.value;
      if (typeof userId !== "string" || this.reaping.has(userId)) continue;
      const list = byUser.get(userId);
      if (list) list.push(entry.key);
      else byUser.set(userId, [entry.key]);
    }
    await Promise.all([...byUser].map(([userId, orphans]) => {
      this.reaping.add(userId);
      return new Promise<void>((resolve, reject) =>
        this.push({ kind: "reap", userId, orphans: orphans.slice(0, 50), resolve, reject })
      ).finally(() => this.reaping.delete(userId));
    }));
  }
}

interface QuotaFigures {
  usedTokens: number;
  usedNano: number;
  heldTokens: number;
  heldNano: number;
  reserveTokens: number;
  reserveNano: number;
  reserveOutput: number;
}

/**
 * The quota refusal, or null when the reservation fits. A reservation that does not fit what is
 * left of the quota is refused until the quota resets (x-should-retry: false); one that only does
 * not fit beside the reservations of requests in flight may fit in a moment (Retry-After: 1).
 * A request reserving nothing (shared mode's reports) is refused once the quota is reached.
 */
export function quotaRefusal(
  limits: EffectiveLimits,
  now: number,
  headers: Record<string, string>,
  f: QuotaFigures,
): AppError | null {
  const check = (
    limit: number,
    used: number,
    held: number,
    reserve: number,
    words: { whole: string; resets: string; retryAfterMs: number; unit: (n: number) => string },
  ): AppError | null => {
    if (used + reserve <= limit && used < limit) {
      if (used + held + reserve <= limit && used + held < limit) return null;
      return new AppError(
        "quota_exceeded",
        `${words.unit(held)} of ${words.whole} are reserved by requests in flight; ` +
          "retry when they have finished.",
        { ...headers, "retry-after": "1" },
      );
    }
    const after = {
      ...headers,
      "retry-after": String(Math.ceil(words.retryAfterMs / 1000)),
      ...FINAL,
    };
    if (used >= limit) {
      return new AppError("quota_exceeded", `${words.whole} is used up; ${words.resets}.`, after);
    }
    return new AppError(
      "quota_exceeded",
      `This request reserves ${words.unit(reserve)} (its prompt and up to ${f.reserveOutput} ` +
        `output tokens) but ${words.unit(limit - used)} of ${words.whole} are left; ` +
        `lower max_tokens, or wait: ${words.resets}.`,
      after,
    );
  };
  if (limits.tokensPerDay !== null) {
    const limit = limits.tokensPerDay;
    const refused = check(limit, f.usedTokens, f.heldTokens, f.reserveTokens, {
      whole: `the daily token quota of ${limit} tokens`,
      resets: "it resets at 00:00 UTC",
      retryAfterMs: msUntilNextDay(now),
      unit: (n) => `${n} tokens`,
    });
    if (refused) return capitalized(refused);
  }
  if (limits.budgetUsdMonthly !== null) {
    const budget = limits.budgetUsdMonthly;
    const refused = check(Math.round(budget * 1e9), f.usedNano, f.heldNano, f.reserveNano, {
      whole: `the monthly budget of $${budget}`,
      resets: "it resets on the 1st (UTC)",
      retryAfterMs: msUntilNextMonth(now),
      unit: (n) => `$${(n / 1e9).toFixed(6).replace(/\.?0+$/, "")}`,
    });
    if (refused) return capitalized(refused);
  }
  return null;
}

function capitalized(err: AppError): AppError {
  return new AppError(err.code, err.message[0].toUpperCase() + err.message.slice(1), err.headers);
}

const counterKeys = (userId: string, now: number): Deno.KvKey[] => [
  keys.tokensByDay(userId, utcDay(now)),
  keys.spendByMonth(userId, utcMonth(now)),
];

/**
 * Reads groups of keys with as few getMany calls as KV allows (10 keys each), all in parallel,
 * never splitting a group: one user's limit entry and counters are read as one consistent
 * snapshot (a counter read before the entry it changes with could hide a settlement).
 */
async function getGroups(
  kv: Deno.Kv,
  groups: Deno.KvKey[][],
): Promise<Deno.KvEntryMaybe<unknown>[]> {
  const calls: Deno.KvKey[][] = [];
  let call: Deno.KvKey[] = [];
  for (const group of groups) {
    if (call.length + group.length > GET_MANY_MAX) {
      calls.push(call);
      call = [];
    }
    call.push(...group);
  }
  if (call.length) calls.push(call);
  if (calls.length === 1) return await kv.getMany(calls[0]);
  return (await Promise.all(calls.map((c) => kv.getMany(c)))).flat();
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
  const [userEntry, stateEntry, tokens, spend] = await kv.getMany<
    [UserRecord, LimitState, Deno.KvU64, Deno.KvU64]
  >([
    keys.user(userId),
    keys.rate(userId),
    keys.tokensByDay(userId, utcDay(now)),
    keys.spendByMonth(userId, utcMonth(now)),
  ]);
  const limits = effectiveLimits(config, userEntry.value ?? { limits: {} });
  const view = rateView(stateEntry.value, limits, now);
  let heldTokens = 0;
  let heldNano = 0;
  for (const h of Object.values(stateEntry.value?.leases ?? {})) {
    heldTokens += h.tokens;
    heldNano += h.nano;
  }
  return {
    limits,
    remaining: remainingOf(
      limits,
      view,
      u64(tokens.value) + heldTokens,
      u64(spend.value) + heldNano,
    ),
    user: userEntry.value,
  };
}
