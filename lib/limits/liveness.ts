/**
 * A process's liveness: its heartbeat, the fence a reaper puts on it, and the reaper.
 *
 * - **Heartbeat**: `keys.leaseProc(proc)`, renewed every few seconds with the completion
 *   estimates of its longer leases. Every commit of the process checks it, so a process a reaper
 *   has fenced can write nothing more; it learns which of its leases were reaped (marked lost) and
 *   writes a fresh heartbeat before its next commit.
 * - **Reaper**: every process looks for heartbeats expired for LEASE_TTL_MS. It fences the
 *   heartbeat first (rewrites it: every commit of that process fails from then on), then settles
 *   the process's leases with their estimates (prompt estimate + completion relayed by their last
 *   renewal) in commits that check the fence, so two reapers never charge one lease twice. A lease
 *   still waiting for an upstream slot is charged nothing and its request given back (the
 *   upstream never saw it).
 */
import { commitOrConflict, keys } from "../core/kv.ts";
import type { Clock } from "../core/clock.ts";
import type { Logger } from "../core/log.ts";
import { addSum, addUsageSums, applySums, type UsageSums } from "../usage/record.ts";
import type { Pricing } from "../usage/pricing.ts";
import {
  type Heartbeat,
  type Held,
  type LeaseRecord,
  refundable,
  slotCounters,
  sumHeld,
} from "./lease_record.ts";

/** A process whose heartbeat is this old is dead: its slots are freed, its estimates charged. */
export const LEASE_TTL_MS = 20_000;
/** How often the heartbeat is renewed and the reaper runs. */
export const TICK_MS = 2_500;
/** Leases a reaper settles per commit (up to 15 mutations each: settlement.ts). */
const REAP_PER_COMMIT = 55;
/** Lease estimates one renewal writes at most. */
const RENEW_MAX = 899;

/** What liveness needs of the process's leases (the Ledger keeps them). */
export interface LiveLeases {
  /** Whether any lease is live or unsettled (the heartbeat must then outlive this process). */
  holding(): boolean;
  /** Leases whose completion estimate in KV is behind: their records to write, and a callback. */
  renewals(now: number, max: number): Array<{ id: string; record: LeaseRecord; written(): void }>;
  /** Marks lost the live leases whose ids are not in `present`; returns how many. */
  markLost(present: Set<string>): number;
}

/** How liveness keeps batches out while it writes the heartbeat (the GroupCommitter). */
interface Exclusion {
  exclusive<T>(fn: () => Promise<T>): Promise<T>;
  hold<T>(work: Promise<T>): Promise<T>;
}

export class Liveness {
  /** This process's id: its leases live under it. */
  readonly procId = crypto.randomUUID();
  /** The heartbeat as this process last wrote it (exp 0: fenced, or never written). */
  private heartbeat: { versionstamp: string | null; exp: number } = { versionstamp: null, exp: 0 };
  /** A renewal being written, and one waiting for the batches in flight. */
  private renewing: Promise<void> | null = null;
  private queued = false;
  private reaping = false;
  private ticks = 0;
  private timer: ReturnType<typeof setInterval> | undefined;

  constructor(
    private readonly kv: Deno.Kv,
    private readonly leases: LiveLeases,
    private readonly exclusion: Exclusion,
    private readonly options: { clock: Clock; pricing: Pricing; log?: Logger },
  ) {}

  /** Starts the timer: renewals when due, the reaper every other tick. */
  start(onTick: () => void) {
    const timer = setInterval(() => {
      onTick();
      if (this.ticks++ % 2 === 0) {
        this.reap().catch((err) =>
          this.options.log?.warn("lease reaper failed", { error: String(err) })
        );
      }
    }, TICK_MS);
    Deno.unrefTimer(timer);
    this.timer = timer;
  }

  stop() {
    clearInterval(this.timer);
    this.timer = undefined;
  }

  /** The check every commit of this process makes: its heartbeat as last written. */
  check(): Deno.AtomicCheck {
    return { key: keys.leaseProc(this.procId), versionstamp: this.heartbeat.versionstamp };
  }

  /** The heartbeat check, or null while no current heartbeat is known (the next renewal). */
  currentCheck(): Deno.AtomicCheck | null {
    return this.fenced ? null : this.check();
  }

  get versionstamp(): string | null {
    return this.heartbeat.versionstamp;
  }

  /** No current heartbeat: never written, or fenced by a reaper. Write one before committing. */
  get fenced(): boolean {
    return !this.heartbeat.versionstamp || this.heartbeat.exp === 0;
  }

  /** Renews the heartbeat alone, before the next batch, when a tick's worth of it has passed. */
  renewIfDue() {
    if (this.queued || this.renewing || !this.timer || !this.due()) return;
    this.queued = true;
    // Waits for the batches in flight; one of them may have renewed meanwhile (renewNow).
    this.exclusion.exclusive(() => {
      this.queued = false;
      return this.due() ? this.renewOnce() : Promise.resolve();
    });
  }

  private due(): boolean {
    return this.heartbeat.exp - this.options.clock() < LEASE_TTL_MS - TICK_MS;
  }

  /**
   * Renews the heartbeat now, from inside a batch (no new batch starts meanwhile). Never waits
   * for a queued exclusive renewal: that one waits for the batch.
   */
  renewNow(): Promise<void> {
    return this.exclusion.hold(this.renewOnce());
  }

  /** One renewal at a time, whoever asks. */
  private renewOnce(): Promise<void> {
    return this.renewing ??= this.renew().finally(() => {
      this.renewing = null;
    });
  }

  /**
   * Writes the heartbeat (first, or renewed), with the completion estimates of leases that have
   * run for a while. Runs alone: every other commit checks the heartbeat's versionstamp.
   */
  private async renew(): Promise<void> {
    try {
      const now = this.options.clock();
      const op = this.kv.atomic().check(this.check());
      const exp = now + LEASE_TTL_MS;
      op.set(keys.leaseProc(this.procId), { exp } satisfies Heartbeat);
      const renewed = this.leases.renewals(now, RENEW_MAX);
      for (const r of renewed) op.set(keys.lease(this.procId, r.id), r.record);
      const res = await commitOrConflict(op);
      if (res.ok) {
        this.heartbeat = { versionstamp: res.versionstamp, exp };
        for (const r of renewed) r.written();
        return;
      }
      await this.checkHeartbeat();
    } catch (err) {
      this.options.log?.warn("lease heartbeat failed", { error: String(err) });
    }
  }

  /**
   * After a failed check on the heartbeat: if a reaper took this process for dead, find which of
   * its leases it settled (they are gone from KV) and mark them lost; the next renewal writes a
   * fresh heartbeat.
   */
  async checkHeartbeat(): Promise<void> {
    const entry = await this.kv.get<Heartbeat>(keys.leaseProc(this.procId));
    if (entry.versionstamp === this.heartbeat.versionstamp) return;
    const present = new Set<string>();
    for await (const e of this.kv.list({ prefix: keys.leasesOf(this.procId) })) {
      present.add(String(e.key[2]));
    }
    const lost = this.leases.markLost(present);
    if (lost) {
      this.options.log?.warn("this process was taken for dead; its reaped leases are settled", {
        proc: this.procId,
        leases: lost,
      });
    }
    this.heartbeat = { versionstamp: entry.versionstamp, exp: 0 };
  }

  /** Deletes the heartbeat when nothing is held any more (shutdown, tests). */
  async release(): Promise<void> {
    if (this.leases.holding() || !this.heartbeat.versionstamp) return;
    await this.kv.atomic()
      .check(this.check())
      .delete(keys.leaseProc(this.procId))
      .commit()
      .catch(() => {});
  }

  /** Settles the leases of processes whose heartbeat expired, with their estimates. */
  async reap(): Promise<void> {
    if (this.reaping) return;
    this.reaping = true;
    try {
      const now = this.options.clock();
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
        if (r.slot) {
          for (const k of slotCounters(r.slot, r.userId, r.slotKey)) addSum(sums, k, -1);
        }
        if (r.waitsForSlot && !r.slot) {
          // Died waiting in line: the upstream never saw it, so it was not the user's request.
          if (refundable(r, now)) addSum(sums, keys.rateRefunds(r.userId), 1);
          spared++;
          continue;
        }
        addUsageSums(sums, this.options.pricing, {
          userId: r.userId,
          keyId: r.keyId,
          model: r.model,
          promptTokens: r.prompt,
          completionTokens: r.completion,
          requests: 1,
          at: now,
        });
      }
      sumHeld(op, held);
      applySums(op, sums);
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
