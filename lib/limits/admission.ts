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
 * - **Renewal and reaping**: lib/limits/liveness.ts (heartbeat, fence, reaper). Every commit of
 *   a live process checks its own heartbeat: if it was reaped (the process stalled for longer
 *   than LEASE_TTL_MS), the process learns which of its leases are gone, and settling those later
 *   charges only what goes beyond the estimate.
 *
 * ## Group commit
 * Admissions and settlements go through a GroupCommitter (lib/limits/group_commit.ts), keyed by
 * user: a commit takes at most 10 checks (KV Connect's limit: the heartbeat, the cache epoch and
 * one per admitting user) and stays far below 1000 mutations and 800 KiB. Entries this process
 * wrote last are not read again (user_states.ts): an admission decided on them is only written if
 * the commit's checks prove them current, and a refusal decided on them is decided again on a
 * fresh read. Each admission is decided by decide.ts; what a settlement charges, by charge.ts;
 * what it writes, by settlement.ts.
 */
import type { Config } from "../core/config.ts";
import { AppError } from "../core/errors.ts";
import { commitOrConflict, keys } from "../core/kv.ts";
import { KV_GET_MANY_MAX } from "../core/kv_ops.ts";
import { type Clock, systemClock } from "../core/clock.ts";
import type { Logger } from "../core/log.ts";
import { type Pricing } from "../usage/pricing.ts";
import { applySums, type TokenUsage, type UsageSums } from "../usage/record.ts";
import { type RateState } from "./gcra.ts";
import { type Charge, chargeFor, type Outcome } from "./charge.ts";
import { HeldLease, type Lease, type LeaseSettler } from "./lease.ts";
import { LeaseSlots } from "./lease_slots.ts";
import { type AdmitRequest, decideAdmission } from "./decide.ts";
import { GroupCommitter, type GroupOp } from "./group_commit.ts";
import { type Snapshot, UserStates } from "./user_states.ts";
import { type Held, HELD_FIELDS, type LeaseRecord, refundable, sumHeld } from "./lease_record.ts";
import { LEASE_TTL_MS, Liveness } from "./liveness.ts";
import { planSettlement } from "./settlement.ts";
import { DAY_MS } from "../core/utc.ts";
import {
  addEntry,
  admittedEntry,
  type LoggedEntry,
  logTtlMs,
  type RequestFacts,
} from "../observe/request_log.ts";

export { LEASE_TTL_MS };
export type { AdmitRequest, Charge, Lease, LeaseRecord, Outcome };
export { chargeFor };

/** A lease's completion estimate is written at renewals once it is this old. */
const RENEW_AFTER_MS = 5_000;
/** The rate entry is worthless after a day without requests; KV drops idle users' entries. */
const RATE_EXPIRE_MS = 2 * DAY_MS;
/** Background attempts (1 s, 2 s, … apart) for a settlement whose commit failed. */
const SETTLE_RETRIES = 10;

interface Deferred<T> {
  resolve: (v: T) => void;
  reject: (err: unknown) => void;
}

type Op =
  & GroupOp
  & (
    | ({ kind: "admit"; userId: string; req: AdmitRequest } & Deferred<Lease>)
    | (
      & {
        kind: "settle";
        userId: string;
        lease: HeldLease;
        charge: Charge;
        /** The request log's entry, written in this commit (lib/observe/request_log.ts). */
        entry?: LoggedEntry;
        /** A retried settlement checks its lease entry: an earlier attempt may have landed. */
        guard?: Deno.KvEntryMaybe<LeaseRecord>;
      }
      & Deferred<Charge>
    )
  );

/**
 * The one admission path (gateway and shared mode's POST /api/usage): admits requests as Leases
 * and settles them, group-committed (group_commit.ts); its process's liveness (heartbeat,
 * reaper) is liveness.ts.
 */
export class Ledger implements LeaseSettler {
  private readonly committer: GroupCommitter<Op>;
  private readonly liveness: Liveness;
  /** What this process remembers of the users it admits. */
  private readonly users: UserStates;
  /** This process's leases not yet settled. */
  private readonly live = new Map<string, HeldLease>();
  /** Leases whose settlement never landed: left for a reaper once this process has ended. */
  private readonly unsettled = new Set<string>();
  private seq = 0;
  readonly pricing: Pricing;
  private readonly clock: Clock;
  /** How long request log entries are kept (ms); 0: none are written. */
  private readonly logTtl: number;

  constructor(
    private readonly kv: Deno.Kv,
    private readonly config: Config,
    private readonly options: {
      clock?: Clock;
      log?: Logger;
      /**
       * After a settlement that charged a user with a monthly budget has landed (budget alerts,
       * lib/reports/budget_alerts.ts). Runs off the request's path; its errors are logged.
       */
      onBudgetCharged?: (userId: string, budgetUsd: number) => Promise<void>;
      /** Each commit's duration (ms), for the metrics. */
      onCommit?: (ms: number) => void;
    } = {},
  ) {
    this.pricing = config.pricing;
    this.clock = options.clock ?? systemClock;
    this.logTtl = logTtlMs(config);
    this.users = new UserStates(kv, config);
    this.committer = new GroupCommitter<Op>({
      attempt: (batch) => this.attempt(batch),
      fail: (batch, err) => {
        for (const op of batch) op.reject(err);
      },
      baseChecks: 1, // the heartbeat
    });
    this.liveness = new Liveness(
      kv,
      {
        holding: () => this.live.size > 0 || this.unsettled.size > 0,
        renewals: (now, max) => this.renewals(now, max),
        markLost: (present) => {
          let lost = 0;
          for (const lease of this.live.values()) {
            if (!present.has(lease.id) && !lease.lost) {
              lease.lost = true;
              lost++;
            }
          }
          return lost;
        },
      },
      this.committer,
      { clock: this.clock, pricing: this.pricing, log: options.log },
    );
    this.slots = new LeaseSlots(kv, this.liveness, (lease) => {
      const held = this.live.get(lease.id);
      if (!held || held !== lease) throw new Error("ledger: not a live lease of this process");
      return held;
    });
    this.liveness.start(() => {
      if (this.live.size) this.liveness.renewIfDue();
    });
  }

  /** This process's leases in flight. */
  get activeLeases(): number {
    return this.live.size;
  }

  /** This process's id: its leases live under it. */
  get procId(): string {
    return this.liveness.procId;
  }

  /** Settles dead processes' leases now (the timer does it every other tick). */
  reap(): Promise<void> {
    return this.liveness.reap();
  }

  /** Admits one request (throws the refusal as an AppError). */
  admit(req: AdmitRequest): Promise<Lease> {
    return new Promise((resolve, reject) =>
      this.submit({
        kind: "admit",
        key: req.userId,
        checks: ["epoch", `rate:${req.userId}`],
        mutations: 5,
        userId: req.userId,
        req,
        resolve,
        reject,
      })
    );
  }

  private submit(op: Op) {
    this.liveness.renewIfDue();
    this.committer.submit(op);
  }

  /** How upstream slots (lib/limits/upstream/) attach to this process's leases. */
  readonly slots: LeaseSlots;

  /**
   * Settles a lease: once; later calls get the first call's promise. The lease stays among this
   * process's live leases until it has landed: if a reaper took this process for dead
   * meanwhile, the lease must be found lost.
   */
  settle(
    lease: HeldLease,
    usage: TokenUsage | null,
    outcome: Outcome,
    /** What the request log keeps of the request: its entry rides in this settlement's commit. */
    facts?: RequestFacts,
  ): Promise<Charge> {
    if (lease.settling) return lease.settling;
    const charge = chargeFor(usage, outcome, lease.record.prompt, lease.relayedTokens);
    if (charge.spared) lease.giveBack();
    const entry = facts && this.logTtl
      ? admittedEntry(facts, {
        userId: lease.user.id,
        keyId: lease.keyId,
        model: lease.record.model,
        now: this.clock(),
        pricing: this.pricing,
      }, charge)
      : undefined;
    return lease.settling = this.commitSettlement(lease, charge, entry);
  }

  private commitSettlement(
    lease: HeldLease,
    charge: Charge,
    entry?: LoggedEntry,
  ): Promise<Charge> {
    lease.closing = true;
    const attempt = (guard?: Deno.KvEntryMaybe<LeaseRecord>) =>
      new Promise<Charge>((resolve, reject) =>
        this.submit({
          kind: "settle",
          key: lease.user.id,
          checks: guard ? [`lease:${lease.id}`] : [],
          mutations: entry ? 17 : 15, // lease 1, held 3, slot 3, usage 8 (record.ts); the log 2
          userId: lease.user.id,
          lease,
          charge,
          entry,
          guard,
          resolve,
          reject,
        })
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
  private giveBackIfLanded(lease: HeldLease) {
    this.live.set(lease.id, lease);
    lease.uncertain = true;
    lease.relayedTokens = 0;
    this.settle(lease, null, "not_served").catch(() => {});
  }

  /** Marks lost those of `leases` whose entries a reaper has deleted. */
  private async markReaped(leases: HeldLease[]) {
    for (let i = 0; i < leases.length; i += KV_GET_MANY_MAX) {
      const part = leases.slice(i, i + KV_GET_MANY_MAX);
      const entries = await this.kv.getMany(part.map((l) => keys.lease(this.procId, l.id)));
      part.forEach((lease, n) => {
        if (entries[n].versionstamp === null) lease.lost = true;
      });
    }
  }

  /** The completion estimates a heartbeat renewal writes: leases running for a while. */
  private renewals(now: number, max: number) {
    const out: Array<{ id: string; record: LeaseRecord; written(): void }> = [];
    for (const lease of this.live.values()) {
      if (out.length >= max) break;
      if (now - lease.record.at < RENEW_AFTER_MS || lease.lost || lease.closing) continue;
      const completion = lease.relayedTokens;
      if (completion === lease.committedCompletion) continue;
      out.push({
        id: lease.id,
        record: { ...lease.record, completion },
        written: () => lease.committedCompletion = completion,
      });
    }
    return out;
  }

  /**
   * Stops the timer and waits for queued commits; with no lease left in flight the heartbeat is
   * deleted, so no reaper has anything to look at (shutdown, tests).
   */
  async close(): Promise<void> {
    this.liveness.stop();
    await this.committer.drain();
    await this.liveness.release();
  }

  /**
   * One try at a batch (GroupCommitter): reads what is not remembered, decides every operation,
   * commits once. True when done; false on a conflict, with what this process remembered of the
   * batch's users forgotten.
   */
  private async attempt(batch: Op[]): Promise<boolean> {
    const userIds = [...new Set(batch.map((op) => op.userId))];
    const fresh = new Set<string>();
    while (true) {
      // A heartbeat a reaper has touched is written again first: no lease may be committed under
      // the reaper's fence, where its next round would reap it unseen.
      if (this.liveness.fenced) await this.liveness.renewNow();
      const now = this.clock();
      const admitting = [...new Set(batch.filter((o) => o.kind === "admit").map((o) => o.userId))];
      const { snaps, epoch } = await this.users.snapshots(admitting, now, fresh);
      const plan = this.plan(batch, snaps, epoch, now);
      const heartbeatPlanned = this.liveness.versionstamp;
      if (plan.stale.size) {
        for (const id of plan.stale) fresh.add(id);
        continue;
      }
      if (!plan.writes) {
        for (const d of plan.deliver) d();
        return true;
      }
      for (const req of plan.admitted) req.onAdmitted?.();
      let res: Deno.KvCommitResult | Deno.KvCommitError;
      const sent = performance.now();
      try {
        res = await commitOrConflict(plan.op);
        this.options.onCommit?.(performance.now() - sent);
      } catch (err) {
        this.users.forget(userIds);
        // The commit may have landed all the same (KV Connect's answer lost): its leases would
        // then hold slots and reservations that no request will settle. Each is given back if
        // its entry is there, through the guarded settle path.
        for (const lease of plan.leases) this.giveBackIfLanded(lease);
        throw err;
      }
      if (res.ok) {
        // The commit checked `epoch`: what it read and wrote is known valid under it.
        const under = epoch?.versionstamp ?? null;
        this.users.remember(plan.rates, plan.held, plan.refunds, snaps, res.versionstamp, under);
        // A reaper took this process for dead while the commit was in flight (the heartbeat was
        // read again meanwhile): the new leases are not yet among the live ones it marked lost,
        // so look for them now.
        if (this.liveness.versionstamp !== heartbeatPlanned) await this.markReaped(plan.leases);
        for (const d of plan.deliver) d();
        return true;
      }
      // Something changed under us (another process's admission, a rotation, a disable, our
      // heartbeat reaped…): read everything again.
      this.users.conflicted(userIds, now);
      await this.liveness.checkHeartbeat();
      // No lease may be written under a heartbeat that is not there: write it again first.
      if (this.liveness.fenced) await this.liveness.renewNow();
      return false;
    }
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
      leases: [] as HeldLease[],
    };
    op.check(this.liveness.check());
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
        if (o.entry) addEntry(op, o.entry, this.logTtl);
        planSettlement(op, o.lease, o.charge, {
          now,
          sums,
          addHeld,
          pricing: this.pricing,
          procId: this.procId,
          inKv: o.guard?.value,
        });
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
      const result = decideAdmission(
        this.config,
        this.pricing,
        o.req,
        snap,
        rates.get(o.userId) ?? null,
        now,
        this.users.contendedAt(o.userId, now),
      );
      if (result instanceof AppError) {
        if (snap.remembered) plan.stale.add(o.userId);
        plan.deliver.push(() => o.reject(result));
        continue;
      }
      const { admitted: a, next, sure } = result;
      const id = (this.seq++).toString(36);
      const lease = new HeldLease(id, a.user, a.limits, a.headers, a.remaining, a.record, this);
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
    sumHeld(op, plan.held);
    applySums(op, sums);
    return plan;
  }

  /** Tells the budget watcher about a settlement that cost something against a budget. */
  private charged(lease: HeldLease, c: Charge) {
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
}
