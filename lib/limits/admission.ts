/**
 * Admission and settlement: every admitted request holds a Lease (CONTRACT §5 "Limits are
 * exact…", "Quotas are reserved…", "Usage is visible at once").
 *
 * ## State in KV
 * - `keys.rate(user)`: the request limits (GCRA `tat`, the day's count). Only admissions write it.
 * - `keys.leaseHeld(user, count|tokens|nano)`: KvU64 sums of what the user's requests in flight
 *   hold: slots, reserved tokens, reserved nano-USD.
 * - `keys.tokensByDay` / `keys.spendByMonth`: KvU64 sums of what was charged.
 * - `keys.lease(proc, id)`: one request in flight (its user, model, reservation, prompt estimate,
 *   completion relayed by its last renewal), under the process (ledger) that admitted it.
 * - `keys.leaseProc(proc)`: that process's heartbeat, renewed every few seconds.
 *
 * ## Commits
 * - **Admission** reads the user record, the rate entry and the sums, decides in the contract's
 *   order (key and user state → model → request limits → concurrency → quotas), writes the rate
 *   entry and the lease and adds the reservation to the held sums. It checks the rate entry (every
 *   admission anywhere rewrites it) and the cache epoch (every rotation, revocation, disable and
 *   limit change bumps it, lib/identity/cache_epoch.ts): a concurrent admission or such a change
 *   makes the commit fail and the request is decided again from fresh reads. So N simultaneous
 *   requests against an allowance of L admit exactly min(N, L) across any number of processes.
 * - **Settlement** deletes the lease, takes its reservation off the held sums and adds what was
 *   used — the metered usage or the estimate — to the charged sums and the usage counters: sums
 *   only, no per-user check, so many settlements share one commit. A settlement racing an
 *   admission can only make that admission's view of the held sums too high (a refusal a moment
 *   early) or, by what the request used beyond its reservation, its view of the charged sums too
 *   low: concurrent requests overspend a quota by at most what they use beyond their reservations.
 * - **Renewal and reaping**: each process renews its heartbeat, and the completion estimates of
 *   its longer leases, every few seconds. Every process's reaper looks for heartbeats expired for
 *   LEASE_TTL_MS: their leases are settled with their estimate (prompt estimate + completion
 *   relayed by their last renewal) in commits that check that heartbeat, so two reapers never
 *   charge one lease twice. A lease still waiting for an upstream slot is charged nothing and
 *   its request given back (the upstream never saw it). Every commit of a live process checks
 *   its own heartbeat: if it was reaped (the process stalled for longer than LEASE_TTL_MS), the
 *   process learns which of its leases are gone, and settling those later charges only what goes
 *   beyond the estimate.
 *
 * ## Group commit
 * Operations that arrive while commits are in flight go together into the next one, in arrival
 * order, one user's operations seeing the state the ones before them left. A commit takes at most
 * 10 checks (KV Connect's limit: the heartbeat, the cache epoch and one per admitting user) and
 * stays far below 1000 mutations and 800 KiB. Several batches for different users are in flight
 * at once. Entries this process wrote last are not read again: an admission decided on them is
 * only written if the commit's checks prove them current, and a refusal decided on them is
 * decided again on a fresh read.
 */
import type { Config } from "../core/config.ts";
import { AppError } from "../core/errors.ts";
import { commitOrConflict, keys, u64 } from "../core/kv.ts";
import type { Logger } from "../core/log.ts";
import type { UserRecord } from "../identity/users.ts";
import { costNanoUsd, priceOf, type Pricing } from "../usage/pricing.ts";
import { addSum, addUsageSums, type TokenUsage, type UsageSums } from "../usage/usage.ts";
import { decideRate, type RateState, type RateView, rateView, withRefunds } from "./gcra.ts";
import {
  type EffectiveLimits,
  effectiveLimits,
  FINAL,
  givenBackHeader,
  hasQuota,
  rateHeaders,
  type Remaining,
  remainingOf,
} from "./policy.ts";
import { DAY_MS, msUntilNextDay, msUntilNextMonth, utcDay, utcMonth } from "../core/utc.ts";

/** A process whose heartbeat is this old is dead: its slots are freed, its estimates charged. */
export const LEASE_TTL_MS = 20_000;
/** A lease's completion estimate is written at renewals once it is this old. */
const RENEW_AFTER_MS = 5_000;
/** How often the heartbeat is renewed and the reaper runs. */
const TICK_MS = 2_500;
/** KV Connect's limits per atomic commit (CONTRACT §8). */
export const KV_MAX_CHECKS = 10;
export const KV_MAX_MUTATIONS = 1000;
/** Mutations the operations of one batch may use: the per-op figures are estimates. */
const BATCH_MUTATIONS = KV_MAX_MUTATIONS - 100;
const MAX_OPS = 128;
/** Batches committed at once (never two for one user). */
const MAX_BATCHES = 2;
/** Batch attempts before a conflicting batch goes on one user at a time. */
const BATCH_ATTEMPTS = 3;
const MAX_ATTEMPTS = 100;
/** The rate entry is worthless after a day without requests; KV drops idle users' entries. */
const RATE_EXPIRE_MS = 2 * DAY_MS;
/** Keys per KV getMany call. */
const GET_MANY_MAX = 10;
/** Background attempts (1 s, 2 s, … apart) for a settlement whose commit failed. */
const SETTLE_RETRIES = 10;
/** Leases a reaper settles per commit (10 mutations each). */
const REAP_PER_COMMIT = 80;
/** 2^64: adding 2^64 − n to a KvU64 sum subtracts n (KV sums wrap around). */
const WRAP = 1n << 64n;

/** What a lease key holds: enough to charge the request if its process dies. */
export interface LeaseRecord {
  userId: string;
  model: string;
  /** Reserved against the daily token quota and the monthly budget. */
  tokens: number;
  nano: number;
  /** The prompt estimate, and the completion relayed by the last renewal. */
  prompt: number;
  completion: number;
  /** Admitted at (ms since the epoch). */
  at: number;
  /** The model whose upstream slot it holds (UPSTREAM_CONCURRENCY), once it has one. */
  slot?: string;
  /**
   * Admitted to wait for an upstream slot: until `slot` is set the upstream has not seen it, so a
   * reaper charges it nothing and gives the request back to the user's limits.
   */
  waitsForSlot?: true;
}

interface Heartbeat {
  /** The process is presumed dead after this (ms since the epoch). */
  exp: number;
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
  /** The upstream refused the request (an error status): nothing was generated. */
  | "refused"
  /** The client left before the request reached the upstream (it waited for a slot). */
  | "left"
  /**
   * Not served for reasons that are not the user's (no upstream slot in time, GLM throttling,
   * the operator's GLM account refused, an upstream 5xx, the upstream unreachable): nothing is
   * counted, and the request allowance is given back.
   */
  | "not_served";

/** What a request is charged. */
export interface Charge {
  promptTokens: number;
  completionTokens: number;
  /** Of the prompt tokens, those the upstream served from its cache. */
  cachedTokens?: number;
  /** True when no `usage` was metered and the charge is the estimate. */
  estimated: boolean;
  /** Not counted at all: the request allowance is given back (outcome "not_served"). */
  spared?: boolean;
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
  if (outcome === "not_served") {
    return { promptTokens: 0, completionTokens: 0, estimated: false, spared: true };
  }
  if (usage) return { ...usage, estimated: false };
  if (outcome === "refused" || outcome === "left") {
    return { promptTokens: 0, completionTokens: 0, estimated: false };
  }
  return { promptTokens: promptEstimate, completionTokens: relayedTokens, estimated: true };
}

/**
 * Whether a request not served is given back to the request limits: only on the UTC day it was
 * admitted. Given back after midnight it would come off the new day's count, which it was never
 * part of (and the minute it took is long over).
 */
function refundable(r: LeaseRecord, now: number): boolean {
  return utcDay(r.at) === utcDay(now);
}

/**
 * A held sum as read. Held sums go up and down; one that went below zero (a bug, or a lease
 * given back twice) wraps around in KvU64, and would then refuse the user for good: it counts
 * as nothing held instead.
 */
function heldSum(value: unknown): number {
  if (value instanceof Deno.KvU64 && value.value >= 1n << 63n) return 0;
  return u64(value);
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
  /**
   * Called when a snapshot admits the request with room to spare, before the admission commit is
   * sent (the gateway starts its upstream call then). The commit may still fail and the request
   * be refused after all: admit() rejecting is the last word.
   */
  onAdmitted?: () => void;
  /** The request waits for an upstream slot after admission (its model has a cap). */
  waitsForSlot?: boolean;
}

/** An admitted request: holds its slot and reservation until settled. */
export class Lease {
  /** Completion tokens estimated from what has been relayed so far (the relay keeps it current). */
  relayedTokens = 0;
  /** The completion estimate in KV: what a reaper charges if this process dies. */
  committedCompletion = 0;
  /** Reaped while this process was stalled: its reservation was given back and estimate charged. */
  lost = false;
  /** Its settlement has been asked for (renewals leave it alone). */
  closing = false;
  /**
   * Its entry in KV may not be what this process holds, or may not exist (a commit that threw
   * and may have landed): its settlement reads the entry first and frees what that says.
   */
  uncertain = false;
  private settling: Promise<Charge> | null = null;

  constructor(
    readonly id: string,
    readonly user: UserRecord,
    readonly limits: EffectiveLimits,
    /** x-ratelimit-* headers for the answer (a request given back shows as not taken). */
    public headers: Record<string, string>,
    readonly remaining: Remaining,
    readonly record: LeaseRecord,
    private readonly ledger: Ledger,
  ) {}

  get model(): string {
    return this.record.model;
  }

  get promptEstimate(): number {
    return this.record.prompt;
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
    if (this.settling) return this.settling;
    const charge = chargeFor(usage, outcome, this.record.prompt, relayedTokens);
    if (charge.spared) this.giveBack();
    return this.settling = this.ledger.settle(this, charge);
  }

  /** The answer's headers say the request is given back (its settlement will not count it). */
  giveBack(): void {
    this.headers = { ...this.headers, ...givenBackHeader(this.limits, this.remaining) };
  }
}

interface Deferred<T> {
  resolve: (v: T) => void;
  reject: (err: unknown) => void;
}

type Op =
  | ({ kind: "admit"; userId: string; req: AdmitRequest } & Deferred<Lease>)
  | (
    & {
      kind: "settle";
      userId: string;
      lease: Lease;
      charge: Charge;
      /** A retried settlement checks its lease entry: an earlier attempt may have landed. */
      guard?: Deno.KvEntryMaybe<LeaseRecord>;
    }
    & Deferred<Charge>
  );

/** Users' entries as this process last read or wrote them. */
interface Known {
  /**
   * The cache epoch's versionstamp the user record was valid under. Every disable, limit change
   * and rotation moves the epoch: a record known under another epoch is read again.
   */
  epoch: string | null;
  userEntry: Deno.KvEntryMaybe<UserRecord>;
  rateEntry: Deno.KvEntryMaybe<RateState>;
  /** The user's refund counter as last read. */
  refunds: number;
  /** Held sums as of that read, plus this process's changes since. */
  held: Held;
}

/** After a conflict on a user, how long this process does not start calls before commits land. */
const CONTENDED_MS = 5_000;

interface Held {
  count: number;
  tokens: number;
  nano: number;
}

interface Snapshot extends Known {
  /** Charged this day and month (read for users with a quota). */
  used: { tokens: number; nano: number } | null;
  /** Decided on what this process remembers (not read in this attempt). */
  remembered: boolean;
}

const HELD_FIELDS = ["count", "tokens", "nano"] as const;

/**
 * The one admission path (gateway and shared mode's POST /api/usage): admits requests as Leases,
 * settles them, renews this process's heartbeat and reaps dead processes' leases, group-committed.
 */
export class Ledger {
  private queue: Op[] = [];
  /** Batches being committed, and the users they hold. */
  private readonly inFlight = new Set<Promise<void>>();
  private readonly busy = new Set<string>();
  private idle: Array<() => void> = [];
  private readonly known = new Map<string, Known>();
  /** Users whose commits conflicted lately (another process is busy with them): no speculation. */
  private readonly contended = new Map<string, number>();
  /** Users seen with a quota, whose counters are read up front (a hint; never decides). */
  private readonly quotaUsers = new Set<string>();
  private readonly defaultQuota: boolean;
  /** This process's leases not yet settled. */
  private readonly live = new Map<string, Lease>();
  /** Leases whose settlement never landed: left for a reaper once this process has ended. */
  private readonly unsettled = new Set<string>();
  /** This ledger's id: its leases live under it. */
  readonly procId = crypto.randomUUID();
  private seq = 0;
  private ticks = 0;
  private timer: ReturnType<typeof setInterval> | undefined;
  /** The heartbeat as this process last wrote it; every commit checks it. */
  private heartbeat: { versionstamp: string | null; exp: number } = {
    versionstamp: null,
    exp: 0,
  };
  /** A heartbeat renewal (or the first write) runs alone: no batch is started meanwhile. */
  private renewing: Promise<void> | null = null;
  private closed = false;
  readonly pricing: Pricing;

  constructor(
    private readonly kv: Deno.Kv,
    private readonly config: Config,
    private readonly options: {
      clock?: () => number;
      log?: Logger;
      /**
       * After a settlement that charged a user with a monthly budget has landed (budget alerts,
       * lib/reports/budget_alerts.ts). Runs off the request's path; its errors are logged.
       */
      onBudgetCharged?: (userId: string, budgetUsd: number) => Promise<void>;
    } = {},
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

  /**
   * The check a commit writing this process's leases outside the ledger makes (upstream slots),
   * or null while no current heartbeat is known (the next renewal writes one).
   */
  heartbeatCheck(): Deno.AtomicCheck | null {
    if (!this.heartbeat.versionstamp || this.heartbeat.exp === 0) return null;
    return { key: keys.leaseProc(this.procId), versionstamp: this.heartbeat.versionstamp };
  }

  /** Admits one request (throws the refusal as an AppError). */
  admit(req: AdmitRequest): Promise<Lease> {
    return new Promise((resolve, reject) =>
      this.push({ kind: "admit", userId: req.userId, req, resolve, reject })
    );
  }

  /**
   * Lease.settle's commit. The lease stays among this process's live leases until it has
   * landed: if a reaper took this process for dead meanwhile, the lease must be found lost.
   */
  settle(lease: Lease, charge: Charge): Promise<Charge> {
    lease.closing = true;
    const attempt = (guard?: Deno.KvEntryMaybe<LeaseRecord>) =>
      new Promise<Charge>((resolve, reject) =>
        this.push({ kind: "settle", userId: lease.user.id, lease, charge, guard, resolve, reject })
      );
    /** A retry: only while the lease entry is there (a failed commit may have landed after all). */
    const again = async () => {
      const guard = await this.kv.get<LeaseRecord>(keys.lease(this.procId, lease.id));
      if (guard.versionstamp === null) return charge;
      return await attempt(guard);
    };
    // Unsure what the lease's entry holds, or whether it was ever written: only a guarded
    // settlement, if it is there.
    const first = lease.uncertain ? again() : attempt();
    // A settlement that failed (KV unreachable) is tried again in the background: while this
    // process lives no reaper would free the lease's slot. The caller learns of the failure.
    const retry = (n: number) => {
      if (n > SETTLE_RETRIES) {
        this.live.delete(lease.id);
        // Its entry is still in KV: the heartbeat must outlive this process so a reaper frees it.
        this.unsettled.add(lease.id);
        this.options.log?.error("lease not settled; its slot stays held until this process ends", {
          userId: lease.user.id,
          lease: lease.id,
        });
        return;
      }
      const timer = setTimeout(() => {
        again().then(() => this.live.delete(lease.id), () => retry(n + 1));
      }, 1000 * n);
      Deno.unrefTimer(timer);
    };
    first.then(() => this.live.delete(lease.id), () => retry(1));
    return first;
  }

  /**
   * A lease whose admission commit threw: it may have landed. Kept live (the heartbeat with it)
   * until a guarded settlement gives it back, request allowance included, or finds no entry.
   */
  private giveBackIfLanded(lease: Lease) {
    this.live.set(lease.id, lease);
    lease.uncertain = true;
    lease.settle(null, "not_served", 0).catch(() => {});
  }

  /** Marks lost those of `leases` whose entries a reaper has deleted. */
  private async markReaped(leases: Lease[]) {
    for (let i = 0; i < leases.length; i += 10) {
      const part = leases.slice(i, i + 10);
      const entries = await this.kv.getMany(part.map((l) => keys.lease(this.procId, l.id)));
      part.forEach((lease, n) => {
        if (entries[n].versionstamp === null) lease.lost = true;
      });
    }
  }

  /**
   * Stops the timer and waits for queued commits; with no lease left in flight the heartbeat is
   * deleted, so no reaper has anything to look at (shutdown, tests).
   */
  async close(): Promise<void> {
    this.closed = true;
    clearInterval(this.timer);
    this.timer = undefined;
    while (this.inFlight.size || this.queue.length || this.renewing) {
      await new Promise<void>((r) => this.idle.push(r));
    }
    if (this.live.size === 0 && this.unsettled.size === 0 && this.heartbeat.versionstamp) {
      await this.kv.atomic()
        .check({ key: keys.leaseProc(this.procId), versionstamp: this.heartbeat.versionstamp })
        .delete(keys.leaseProc(this.procId))
        .commit()
        .catch(() => {});
    }
  }

  private push(op: Op) {
    this.queue.push(op);
    this.pump();
  }

  /**
   * Starts batches while fewer than MAX_BATCHES are in flight. Batches in flight never share a
   * user, so each user's operations still commit one after another, in order, on the state the
   * previous commit left; different users' commits overlap (the KV works on one while this
   * thread prepares the next). The heartbeat is written first and renewed alone.
   */
  private pump() {
    if (this.renewing) return;
    const now = this.now();
    const due = this.heartbeat.exp - now < LEASE_TTL_MS - TICK_MS;
    if (due && !this.closed && (this.queue.length || this.live.size)) {
      if (this.inFlight.size) return; // renewed once these have landed
      this.renewNow();
      return;
    }
    while (this.queue.length && this.inFlight.size < MAX_BATCHES) {
      const batch = this.takeBatch();
      if (!batch.length) break;
      const users = new Set(batch.map((op) => op.userId));
      for (const id of users) this.busy.add(id);
      const running = this.commitBatch(batch, BATCH_ATTEMPTS).catch((err) => {
        for (const op of batch) op.reject(err);
      }).finally(() => {
        for (const id of users) this.busy.delete(id);
        this.inFlight.delete(running);
        this.pump();
        if (!this.inFlight.size && !this.queue.length) {
          for (const r of this.idle.splice(0)) r();
        }
      });
      this.inFlight.add(running);
    }
    if (!this.inFlight.size && !this.queue.length) {
      for (const r of this.idle.splice(0)) r();
    }
  }

  /**
   * The next operations that fit one commit, in queue order: ≤ 10 checks (the heartbeat, the
   * cache epoch and one per admitting user), bounded mutations; users that a batch in flight
   * holds are left out, and once one of a user's operations is left out so are the ones after it.
   */
  private takeBatch(): Op[] {
    const admitting = new Set<string>();
    const blocked = new Set(this.busy);
    const taken: Op[] = [];
    const left: Op[] = [];
    let checks = 1;
    let mutations = 0;
    for (const op of this.queue) {
      if (blocked.has(op.userId) || taken.length >= MAX_OPS) {
        left.push(op);
        continue;
      }
      const admits = op.kind === "admit";
      const addChecks = admits && !admitting.has(op.userId)
        ? (admitting.size === 0 ? 2 : 1) // the epoch with the first admission
        : op.kind === "settle" && op.guard
        ? 1
        : 0;
      const addMutations = admits ? 5 : 12;
      if (checks + addChecks > KV_MAX_CHECKS || mutations + addMutations > BATCH_MUTATIONS) {
        blocked.add(op.userId);
        left.push(op);
        continue;
      }
      checks += addChecks;
      mutations += addMutations;
      if (admits) admitting.add(op.userId);
      taken.push(op);
    }
    this.queue = left;
    return taken;
  }

  private async commitBatch(batch: Op[], attempts: number): Promise<void> {
    const userIds = [...new Set(batch.map((op) => op.userId))];
    const fresh = new Set<string>();
    let conflicts = 0;
    while (true) {
      // A heartbeat a reaper has touched (exp 0) is written again first: no lease may be
      // committed under the reaper's fence, where its next round would reap it unseen.
      if (this.heartbeat.exp === 0) await this.renewNow();
      const now = this.now();
      const { snaps, epoch } = await this.snapshots(batch, now, fresh);
      const plan = this.plan(batch, snaps, epoch, now);
      const heartbeatPlanned = this.heartbeat.versionstamp;
      if (plan.stale.size) {
        for (const id of plan.stale) fresh.add(id);
        continue;
      }
      if (!plan.writes) {
        for (const d of plan.deliver) d();
        return;
      }
      for (const req of plan.admitted) req.onAdmitted?.();
      let res: Deno.KvCommitResult | Deno.KvCommitError;
      try {
        res = await commitOrConflict(plan.op);
      } catch (err) {
        for (const id of userIds) this.known.delete(id);
        // The commit may have landed all the same (KV Connect's answer lost): its leases would
        // then hold slots and reservations that no request will settle. Each is given back if
        // its entry is there, through the guarded settle path.
        for (const lease of plan.leases) this.giveBackIfLanded(lease);
        throw err;
      }
      if (res.ok) {
        // The commit checked `epoch`: what it read and wrote is known valid under it.
        const under = epoch?.versionstamp ?? null;
        this.rememberAfter(plan.rates, plan.held, plan.refunds, snaps, res.versionstamp, under);
        // A reaper took this process for dead while the commit was in flight (the heartbeat was
        // read again meanwhile): the new leases are not yet among the live ones it marked lost,
        // so look for them now.
        if (this.heartbeat.versionstamp !== heartbeatPlanned) await this.markReaped(plan.leases);
        for (const d of plan.deliver) d();
        return;
      }
      // Something changed under us (another process's admission, a rotation, a disable, our
      // heartbeat reaped…): read everything again.
      for (const id of userIds) {
        fresh.add(id);
        this.known.delete(id);
        if (this.contended.size >= 10_000) this.contended.clear();
        this.contended.set(id, now + CONTENDED_MS);
      }
      this.epochSeen = null;
      await this.checkHeartbeat();
      // No lease may be written under a heartbeat that is not there: write it again first.
      if (this.heartbeat.exp === 0) await this.renewNow();
      conflicts++;
      if (conflicts >= attempts) break;
      await backoff(conflicts + 1);
    }
    if (userIds.length === 1) {
      // Several processes busy with this one user (a loaded machine makes their commits
      // overlap more): keep trying, with the jittered back-off, before giving up.
      if (attempts < MAX_ATTEMPTS) return await this.commitBatch(batch, MAX_ATTEMPTS);
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

  /**
   * What this process knows after its commit: the rate entries it wrote, the user records and
   * held sums it read, updated with its own changes (a refusal decided on them is re-read).
   */
  private rememberAfter(
    rates: Map<string, RateState>,
    held: Map<string, Held>,
    refunds: Map<string, number>,
    snaps: Map<string, Snapshot>,
    versionstamp: string,
    epoch: string | null,
  ) {
    for (const [userId, snap] of snaps) {
      const next = rates.get(userId);
      if (this.known.size >= 100_000 && !this.known.has(userId)) this.known.clear();
      this.known.set(userId, {
        epoch,
        userEntry: snap.userEntry,
        rateEntry: next ? { key: keys.rate(userId), value: next, versionstamp } : snap.rateEntry,
        refunds: snap.refunds,
        held: snap.held,
      });
    }
    for (const [userId, d] of held) {
      const k = snaps.has(userId) ? undefined : this.known.get(userId);
      if (k) { for (const f of HELD_FIELDS) k.held[f] += d[f]; }
    }
    // Requests given back here are known at once (other processes see them on their next read).
    for (const [userId, n] of refunds) {
      const k = this.known.get(userId);
      if (k) k.refunds += n;
    }
  }

  /** The cache epoch entry as last read (its versionstamp proves user records unchanged). */
  private epochSeen: Deno.KvEntryMaybe<unknown> | null = null;

  /** Reads what the admissions of a batch need that this process does not remember. */
  private async snapshots(
    batch: Op[],
    now: number,
    fresh: Set<string>,
  ): Promise<{ snaps: Map<string, Snapshot>; epoch: Deno.KvEntryMaybe<unknown> | null }> {
    const admitting = [...new Set(batch.filter((op) => op.kind === "admit").map((o) => o.userId))];
    const snaps = new Map<string, Snapshot>();
    if (!admitting.length) return { snaps, epoch: null };
    const groups: Deno.KvKey[][] = [];
    const reads: Array<{ id: string; k: Known | undefined; entries: boolean; used: boolean }> = [];
    for (const id of admitting) {
      // Remembered entries count only under the epoch they were known under (a disable or limit
      // change since then moved it), and that epoch is checked again: read with the counters, or
      // by the commit.
      const seen = this.epochSeen;
      const known = fresh.has(id) || !seen ? undefined : this.known.get(id);
      const k = known?.epoch === seen?.versionstamp ? known : undefined;
      const r = { id, k, entries: !k, used: this.defaultQuota || this.quotaUsers.has(id) };
      const group: Deno.KvKey[] = [];
      if (r.entries) {
        group.push(
          keys.user(id),
          keys.rate(id),
          keys.rateRefunds(id),
          ...HELD_FIELDS.map((f) => keys.leaseHeld(id, f)),
        );
      }
      if (r.used) group.push(...usedKeys(id, now));
      if (group.length) groups.push(group);
      reads.push(r);
    }
    let epoch = this.epochSeen;
    let entries: Deno.KvEntryMaybe<unknown>[] = [];
    if (groups.length) {
      const got = await readGroups(this.kv, groups);
      entries = got.entries;
      // Every group was read with the epoch: they agree unless a change landed in between.
      if (!got.consistent || (epoch && epoch.versionstamp !== got.epoch.versionstamp)) {
        for (const id of admitting) fresh.add(id);
        this.epochSeen = null;
        return await this.snapshots(batch, now, fresh);
      }
      epoch = got.epoch;
    }
    this.epochSeen = epoch;
    const missing: string[] = [];
    let i = 0;
    for (const r of reads) {
      const k = r.k;
      let snap: Snapshot;
      if (r.entries) {
        const userEntry = entries[i++] as Deno.KvEntryMaybe<UserRecord>;
        const rateEntry = entries[i++] as Deno.KvEntryMaybe<RateState>;
        const refunds = u64(entries[i++].value);
        const held = {
          count: heldSum(entries[i++].value),
          tokens: heldSum(entries[i++].value),
          nano: heldSum(entries[i++].value),
        };
        const under = epoch?.versionstamp ?? null;
        snap = { epoch: under, userEntry, rateEntry, refunds, held, used: null, remembered: false };
      } else snap = { ...k!, held: { ...k!.held }, used: null, remembered: true };
      if (r.used) snap.used = { tokens: u64(entries[i++].value), nano: u64(entries[i++].value) };
      else if (hasQuota(effectiveLimits(this.config, snap.userEntry.value ?? { limits: {} }))) {
        missing.push(r.id);
      }
      snaps.set(r.id, snap);
    }
    if (missing.length) {
      // The quota hint missed these users: read their counters too (a second round trip; safe,
      // the counters only matter as a bound, see the top of the file).
      const more = await this.kv.getMany(missing.flatMap((id) => usedKeys(id, now)));
      missing.forEach((id, n) => {
        snaps.get(id)!.used = { tokens: u64(more[2 * n].value), nano: u64(more[2 * n + 1].value) };
        if (this.quotaUsers.size >= 100_000) this.quotaUsers.clear();
        this.quotaUsers.add(id);
      });
    }
    return { snaps, epoch };
  }

  /** Decides every operation of the batch and builds its one commit (writes nothing itself). */
  private plan(
    batch: Op[],
    snaps: Map<string, Snapshot>,
    epoch: Deno.KvEntryMaybe<unknown> | null,
    now: number,
  ) {
    const op = this.kv.atomic();
    const plan = {
      op,
      writes: false,
      /** Users whose refusals rest on remembered entries: read them and plan again. */
      stale: new Set<string>(),
      /** Runs after the commit went through (or when nothing had to be written). */
      deliver: [] as Array<() => void>,
      /** New rate states of the users admitted. */
      rates: new Map<string, RateState>(),
      /** The requests this plan admits surely enough to start their upstream calls now. */
      admitted: [] as AdmitRequest[],
      /** Changes to the held sums, per user. */
      held: new Map<string, Held>(),
      /** Requests given back, per user. */
      refunds: new Map<string, number>(),
      /** The leases this plan writes. */
      leases: [] as Lease[],
    };
    op.check({ key: keys.leaseProc(this.procId), versionstamp: this.heartbeat.versionstamp });
    if (epoch) op.check(epoch);
    const sums: UsageSums = new Map();
    const rates = plan.rates;
    /** Adds to a user's held sums, as written and as later admissions in this batch see them. */
    const addHeld = (userId: string, d: Held) => {
      const h = plan.held.get(userId) ?? { count: 0, tokens: 0, nano: 0 };
      const snap = snaps.get(userId);
      for (const f of HELD_FIELDS) {
        h[f] += d[f];
        if (snap) snap.held[f] += d[f];
      }
      plan.held.set(userId, h);
    };
    for (const o of batch) {
      if (o.kind === "settle") {
        if (o.guard) op.check(o.guard);
        this.planSettle(op, o.lease, o.charge, now, sums, addHeld, o.guard?.value?.slot);
        if (o.charge.spared && !o.lease.lost && refundable(o.lease.record, now)) {
          plan.refunds.set(o.userId, (plan.refunds.get(o.userId) ?? 0) + 1);
        }
        plan.writes = true;
        plan.deliver.push(() => {
          o.resolve(o.charge);
          this.charged(o.lease, o.charge);
        });
        continue;
      }
      const snap = snaps.get(o.userId)!;
      const result = this.decide(o.req, snap, rates.get(o.userId) ?? null, now);
      if (result instanceof AppError) {
        if (snap.remembered) plan.stale.add(o.userId);
        plan.deliver.push(() => o.reject(result));
        continue;
      }
      const { lease, next, sure } = result;
      plan.leases.push(lease);
      rates.set(o.userId, next);
      op.set(keys.lease(this.procId, lease.id), lease.record);
      addHeld(o.userId, { count: 1, tokens: lease.record.tokens, nano: lease.record.nano });
      if (sure) plan.admitted.push(o.req);
      plan.writes = true;
      plan.deliver.push(() => {
        this.live.set(lease.id, lease);
        o.resolve(lease);
      });
    }
    for (const [userId, next] of rates) {
      op.check(snaps.get(userId)!.rateEntry);
      op.set(keys.rate(userId), next, { expireIn: RATE_EXPIRE_MS });
    }
    for (const [userId, d] of plan.held) {
      for (const f of HELD_FIELDS) if (d[f]) op.sum(keys.leaseHeld(userId, f), signed(d[f]));
    }
    for (const { key, n } of sums.values()) op.sum(key, signed(n));
    return plan;
  }

  /** A settlement's mutations: the lease gone, its reservation given back, its usage charged. */
  private planSettle(
    op: Deno.AtomicOperation,
    lease: Lease,
    c: Charge,
    now: number,
    sums: UsageSums,
    addHeld: (userId: string, d: Held) => void,
    /** The upstream slot the lease's entry in KV records, when it was read (a guarded retry). */
    slotInKv?: string,
  ) {
    const r = lease.record;
    const slot = slotInKv ?? r.slot;
    const base = { userId: r.userId, model: r.model, at: now };
    if (lease.lost) {
      // Reaped already (charged its estimate as of its last renewal, its upstream slot freed):
      // only the rest.
      if (c.spared) return;
      const prompt = Math.max(0, c.promptTokens - r.prompt);
      addUsageSums(sums, this.pricing, {
        ...base,
        promptTokens: prompt,
        completionTokens: Math.max(0, c.completionTokens - lease.committedCompletion),
        cachedTokens: Math.min(prompt, c.cachedTokens ?? 0),
        requests: 0,
      });
      return;
    }
    op.delete(keys.lease(this.procId, lease.id));
    addHeld(r.userId, { count: -1, tokens: -r.tokens, nano: -r.nano });
    if (slot) addSum(sums, keys.upstreamHeld(slot), -1);
    if (c.spared) {
      // Not the user's doing: the request is given back to its limits, and nothing is recorded.
      if (refundable(r, now)) addSum(sums, keys.rateRefunds(r.userId), 1);
      return;
    }
    addUsageSums(sums, this.pricing, {
      ...base,
      promptTokens: c.promptTokens,
      completionTokens: c.completionTokens,
      cachedTokens: c.cachedTokens,
      requests: 1,
    });
  }

  /** One admission on the user's state as it stands in this batch (pure but for the lease id). */
  private decide(
    req: AdmitRequest,
    snap: Snapshot,
    rate: RateState | null,
    now: number,
  ): { lease: Lease; next: RateState; sure: boolean } | AppError {
    const user = snap.userEntry.value;
    const limits = effectiveLimits(this.config, user ?? { limits: {} });
    const state = withRefunds(rate ?? snap.rateEntry.value, snap.refunds, limits);
    const decision = decideRate(state, limits, now);
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
    if (snap.held.count >= this.config.concurrencyLimit) {
      return new AppError(
        "concurrency_limit_exceeded",
        `${this.config.concurrencyLimit} requests of this account are in flight already; ` +
          "retry when one of them has finished.",
        { ...current, "retry-after": "1" },
      );
    }
    // Without a quota nothing needs reserving (and the held sums are left alone).
    const reserveTokens = limits.tokensPerDay === null && limits.budgetUsdMonthly === null
      ? 0
      : req.reserve.prompt + req.reserve.output;
    const reserveNano = limits.budgetUsdMonthly === null ? 0 : Number(
      costNanoUsd(this.pricing, req.model, req.reserve.prompt, req.reserve.output),
    );
    const used = snap.used ?? { tokens: 0, nano: 0 };
    const refusal = quotaRefusal(limits, now, current, {
      usedTokens: used.tokens,
      usedNano: used.nano,
      heldTokens: snap.held.tokens,
      heldNano: snap.held.nano,
      reserveTokens,
      reserveNano,
      reserveOutput: req.reserve.output,
    });
    if (refusal) return refusal;
    const record: LeaseRecord = {
      userId: req.userId,
      model: req.model,
      tokens: reserveTokens,
      nano: reserveNano,
      prompt: req.reserve.prompt,
      completion: 0,
      at: now,
    };
    if (req.waitsForSlot) record.waitsForSlot = true;
    const lease = new Lease(
      (this.seq++).toString(36),
      checked,
      limits,
      rateHeaders(limits, decision.after, now),
      remainingOf(
        limits,
        decision.after,
        used.tokens + snap.held.tokens + reserveTokens,
        used.nano + snap.held.nano + reserveNano,
      ),
      record,
      this,
    );
    // Sure enough to start the upstream call before the commit lands: this process wrote the
    // user's entries last (decided on what it remembers, not on a read after a conflict or a
    // first contact), no other process has been busy with the user lately, and one more request
    // taking its share first would not change the answer. Near a limit, on first contact or under
    // contention, the call waits for the commit.
    const sure = snap.remembered && decision.after.remainingMinute >= 1 &&
      decision.after.remainingDay >= 1 &&
      snap.held.count + 2 <= this.config.concurrencyLimit &&
      (this.contended.get(req.userId) ?? 0) < now &&
      quotaRefusal(limits, now, current, {
          usedTokens: used.tokens,
          usedNano: used.nano,
          heldTokens: snap.held.tokens + reserveTokens,
          heldNano: snap.held.nano + reserveNano,
          reserveTokens,
          reserveNano,
          reserveOutput: req.reserve.output,
        }) === null;
    return { lease, next: decision.next, sure };
  }

  /** Tells the budget watcher about a settlement that cost something against a budget. */
  private charged(lease: Lease, c: Charge) {
    const budget = lease.limits.budgetUsdMonthly;
    const hook = this.options.onBudgetCharged;
    if (!hook || budget === null || budget <= 0 || c.spared) return;
    if (c.promptTokens + c.completionTokens === 0) return;
    hook(lease.user.id, budget).catch((err) =>
      this.options.log?.warn("budget alert check failed", {
        userId: lease.user.id,
        error: String(err),
      })
    );
  }

  /** Renews the heartbeat now (once, whoever asks). */
  private renewNow(): Promise<void> {
    return this.renewing ??= this.renew(this.now())
      .catch((err) => this.options.log?.warn("lease heartbeat failed", { error: String(err) }))
      .finally(() => {
        this.renewing = null;
        this.pump();
      });
  }

  /**
   * Writes the heartbeat (first, or renewed), with the completion estimates of leases that have
   * run for a while. Runs alone: every other commit checks the heartbeat's versionstamp.
   */
  private async renew(now: number): Promise<void> {
    const op = this.kv.atomic()
      .check({ key: keys.leaseProc(this.procId), versionstamp: this.heartbeat.versionstamp });
    const exp = now + LEASE_TTL_MS;
    op.set(keys.leaseProc(this.procId), { exp } satisfies Heartbeat);
    const renewed: Array<[Lease, number]> = [];
    for (const lease of this.live.values()) {
      if (renewed.length >= BATCH_MUTATIONS - 1) break;
      if (now - lease.record.at < RENEW_AFTER_MS || lease.lost || lease.closing) continue;
      if (lease.relayedTokens === lease.committedCompletion) continue;
      op.set(keys.lease(this.procId, lease.id), {
        ...lease.record,
        completion: lease.relayedTokens,
      });
      renewed.push([lease, lease.relayedTokens]);
    }
    const res = await commitOrConflict(op);
    if (res.ok) {
      this.heartbeat = { versionstamp: res.versionstamp, exp };
      for (const [lease, completion] of renewed) lease.committedCompletion = completion;
      return;
    }
    await this.checkHeartbeat();
  }

  /**
   * After a failed check on the heartbeat: if a reaper took this process for dead, find which of
   * its leases it settled (they are gone from KV) and mark them lost; the next renewal writes a
   * fresh heartbeat.
   */
  private async checkHeartbeat(): Promise<void> {
    const entry = await this.kv.get<Heartbeat>(keys.leaseProc(this.procId));
    if (entry.versionstamp === this.heartbeat.versionstamp) return;
    const present = new Set<string>();
    for await (const e of this.kv.list({ prefix: keys.leasesOf(this.procId) })) {
      present.add(String(e.key[2]));
    }
    let lost = 0;
    for (const lease of this.live.values()) {
      if (!present.has(lease.id) && !lease.lost) {
        lease.lost = true;
        lost++;
      }
    }
    if (lost) {
      this.options.log?.warn("this process was taken for dead; its reaped leases are settled", {
        proc: this.procId,
        leases: lost,
      });
    }
    this.heartbeat = { versionstamp: entry.versionstamp, exp: 0 };
  }

  /** Timer: renews the heartbeat when due, and reaps dead processes' leases every other tick. */
  private tick() {
    this.pump();
    if (this.ticks++ % 2 === 0) {
      this.reap().catch((err) =>
        this.options.log?.warn("lease reaper failed", { error: String(err) })
      );
    }
  }

  private reaping = false;

  /** Settles the leases of processes whose heartbeat expired, with their estimates. */
  async reap(): Promise<void> {
    if (this.reaping) return;
    this.reaping = true;
    try {
      const now = this.now();
      for await (const proc of this.kv.list<Heartbeat>({ prefix: keys.leaseProcs() })) {
        if (proc.key[1] === this.procId || !(proc.value?.exp < now)) continue;
        await this.reapProcess(proc as Deno.KvEntry<Heartbeat>, now);
      }
    } finally {
      this.reaping = false;
    }
  }

  private async reapProcess(proc: Deno.KvEntry<Heartbeat>, now: number) {
    const procId = String(proc.key[1]);
    // Fence first: rewriting the heartbeat makes every commit the process might still make (it
    // checks its heartbeat) fail from now on, so nothing it settles or takes after this point can
    // be counted again by the leases listed below. A process that comes back re-reads and finds
    // which of its leases were reaped.
    const fence = await commitOrConflict(
      this.kv.atomic().check(proc).set(keys.leaseProc(procId), { exp: proc.value.exp }),
    );
    if (!fence.ok) return; // another reaper, or the process came back
    let heartbeat: Deno.KvEntryMaybe<Heartbeat> = {
      key: keys.leaseProc(procId),
      value: proc.value,
      versionstamp: fence.versionstamp,
    };
    for (let round = 0; round < 1000; round++) {
      const leases: Deno.KvEntry<LeaseRecord>[] = [];
      for await (
        const e of this.kv.list<LeaseRecord>({ prefix: keys.leasesOf(procId) }, {
          limit: REAP_PER_COMMIT,
        })
      ) leases.push(e);
      const op = this.kv.atomic().check(heartbeat);
      if (!leases.length) {
        await op.delete(keys.leaseProc(procId)).commit();
        return;
      }
      const sums: UsageSums = new Map();
      const held = new Map<string, Held>();
      let spared = 0;
      for (const { key, value: r } of leases) {
        op.delete(key);
        const h = held.get(r.userId) ?? { count: 0, tokens: 0, nano: 0 };
        h.count -= 1;
        h.tokens -= r.tokens;
        h.nano -= r.nano;
        held.set(r.userId, h);
        if (r.slot) addSum(sums, keys.upstreamHeld(r.slot), -1);
        if (r.waitsForSlot && !r.slot) {
          // Died waiting in line: the upstream never saw it, so it was not the user's request.
          if (refundable(r, now)) addSum(sums, keys.rateRefunds(r.userId), 1);
          spared++;
          continue;
        }
        addUsageSums(sums, this.pricing, {
          userId: r.userId,
          model: r.model,
          promptTokens: r.prompt,
          completionTokens: r.completion,
          requests: 1,
          at: now,
        });
      }
      for (const [userId, d] of held) {
        for (const f of HELD_FIELDS) if (d[f]) op.sum(keys.leaseHeld(userId, f), signed(d[f]));
      }
      for (const { key, n } of sums.values()) op.sum(key, signed(n));
      // Marks progress, so a second reaper's commit (checking the same heartbeat) fails.
      op.set(keys.leaseProc(procId), { exp: proc.value.exp });
      const res = await commitOrConflict(op);
      if (!res.ok) return; // another reaper, or the process came back: look again next time
      this.options.log?.info("leases of a dead process charged their estimate", {
        proc: procId,
        leases: leases.length,
        // Of those, waiting for an upstream slot: not counted, given back to the user's limits.
        notServed: spared,
      });
      heartbeat = {
        key: keys.leaseProc(procId),
        value: proc.value,
        versionstamp: res.versionstamp,
      };
    }
  }
}

/** A signed amount as a KvU64 sum operand (KV sums wrap around at 2^64). */
function signed(n: number | bigint): bigint {
  const v = BigInt(n);
  return v >= 0n ? v : WRAP + v;
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

const usedKeys = (userId: string, now: number): Deno.KvKey[] => [
  keys.tokensByDay(userId, utcDay(now)),
  keys.spendByMonth(userId, utcMonth(now)),
];

/**
 * Reads groups of keys in as few getMany calls as KV allows (10 keys each, all in parallel),
 * never splitting a group, each call also reading the cache epoch: the calls saw one state of
 * the user records when their epochs agree.
 */
async function readGroups(
  kv: Deno.Kv,
  groups: Deno.KvKey[][],
): Promise<
  { entries: Deno.KvEntryMaybe<unknown>[]; epoch: Deno.KvEntryMaybe<unknown>; consistent: boolean }
> {
  const calls: Deno.KvKey[][] = [];
  let call: Deno.KvKey[] = [keys.cacheEpoch()];
  for (const group of groups) {
    if (call.length + group.length > GET_MANY_MAX) {
      calls.push(call);
      call = [keys.cacheEpoch()];
    }
    call.push(...group);
  }
  calls.push(call);
  const results = await Promise.all(calls.map((c) => kv.getMany(c)));
  const epoch = results[0][0];
  return {
    entries: results.flatMap((r) => r.slice(1)),
    epoch,
    consistent: results.every((r) => r[0].versionstamp === epoch.versionstamp),
  };
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
): Promise<
  { limits: EffectiveLimits; remaining: Remaining; view: RateView; user: UserRecord | null }
> {
  const [userEntry, rateEntry, refunds, _count, heldTokens, heldNano, tokens, spend] = await kv
    .getMany([
      keys.user(userId),
      keys.rate(userId),
      keys.rateRefunds(userId),
      ...HELD_FIELDS.map((f) => keys.leaseHeld(userId, f)),
      ...usedKeys(userId, now),
    ]);
  const user = userEntry.value as UserRecord | null;
  const limits = effectiveLimits(config, user ?? { limits: {} });
  const state = withRefunds(rateEntry.value as RateState | null, u64(refunds.value), limits);
  const view = rateView(state, limits, now);
  return {
    limits,
    remaining: remainingOf(
      limits,
      view,
      u64(tokens.value) + u64(heldTokens.value),
      u64(spend.value) + u64(heldNano.value),
    ),
    view,
    user,
  };
}
