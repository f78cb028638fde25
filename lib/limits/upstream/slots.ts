/**
 * Upstream slots (CONTRACT §2 `UPSTREAM_CONCURRENCY`, `UPSTREAM_USER_SHARE`, `UPSTREAM_QUEUE_MAX`,
 * `UPSTREAM_QUEUE_MS`; §5 "Upstream capacity is shared fairly"): at most N requests per model in
 * flight to GLM across all processes, so the operator's GLM account never answers `1302` (too
 * many concurrent requests); no user holds more than ceil(share × N) of them (at least 1); the
 * others wait, served round-robin by user, for up to `UPSTREAM_QUEUE_MS`, then get 503
 * `upstream_busy`; at most `UPSTREAM_QUEUE_MAX` wait at once, and beyond that 503 at once.
 *
 * ## State in KV
 * - `keys.upstreamKeyHeld(model, key)`: a KvU64 count of the slots held on one pool key (the cap
 *   is per key, pool.ts); `keys.upstreamHeld(model)`: all keys together (/admin, `kv.watch`); and
 *   `keys.upstreamUserHeld(model, user)`: the user's part. Taking slots is one commit on the key
 *   with the most free slots that checks that key's count and the count of every user it gives a
 *   slot to (so the cap and the share are exact across processes): the key's count, the process
 *   heartbeat and at most 8 users — KV Connect's 10 checks. Giving a slot back is a sum on all
 *   three in the Lease's settlement (lib/limits/admission.ts), which frees it at the answer's last
 *   byte or when the client leaves. A slot is recorded on its lease (`LeaseRecord.slot`: the model,
 *   `slotKey`: the pool key; the user key follows from the lease's user), so a dead process's
 *   slots are freed by the reaper with its leases. A call without a lease (count_tokens) holds its
 *   slot by a record of its own (slot_hold.ts).
 * - `keys.upstreamTicket(model, ticket)`: a request waiting, `{deadline, user, round}`. Ticket
 *   ids sort by arrival; the line is served **round-robin by user**, by round and then arrival
 *   (serveOrder()). A ticket's round is given when it is written (Rounds): right after the
 *   user's own waiting tickets, never before the lowest round waiting — so a user's second
 *   waiting request comes after every other user's first, and a user who had many served does
 *   not get ahead of one who just arrived. The commit that writes tickets checks the queue count
 *   every other enqueue moves, so rounds are given on a line no concurrent enqueue changed.
 *   Every process reads the same line, so the process holding the first ticket that may take a
 *   free slot is the one that takes it; a user at their share is passed over (the tickets behind
 *   go first). A ticket whose owner died stops counting at its deadline.
 * - `keys.upstreamQueueCount("in" | "out")`: tickets written and taken away (KvU64 sums, all
 *   models); in − out is how many wait. A ticket is written in a commit that checks "in", so
 *   UPSTREAM_QUEUE_MAX is exact (a concurrent departure only makes the count look higher for a
 *   moment). Tickets of dead owners are deleted, with their "out", by the commit of a sweep that
 *   checks them (when the queue looks full, and every minute while requests wait).
 * - `keys.upstreamWait(window, bucket)`: a histogram of waits per five minutes (/admin).
 *
 * A process with waiters watches the count (`kv.watch`) and also looks every POLL_MS, so a slot
 * freed anywhere is taken within a round trip. A waiting request holds its bytes and its place in
 * line: no upstream connection, no timer beyond its deadline.
 */
import { type Clock, systemClock } from "../../core/clock.ts";
import type { Config } from "../../core/config.ts";
import { AppError } from "../../core/errors.ts";
import { formatCount, formatInt } from "../../core/format.ts";
import { commitOrConflict, keys, u64 } from "../../core/kv.ts";
import { backoffMs, getManyChunked, KV_GET_MANY_MAX, KV_MAX_CHECKS } from "../../core/kv_ops.ts";
import type { Logger } from "../../core/log.ts";
import type { Lease, Ledger } from "../admission.ts";
import { heldSum } from "../lease_record.ts";
import { type HoldRecord, SlotHold, sweepHolds } from "./slot_hold.ts";
import { addWaits, type WaitPercentiles, waitPercentiles } from "./waits.ts";
import { type Place, readLine, Rounds, serveOrder, sweepDeadTickets, type Ticket } from "./line.ts";
export { Rounds, serveOrder };
import { KeyPool, type PoolKey, type PoolKeyStatus } from "./pool.ts";

export { SlotHold };

/** Safety net besides kv.watch (and the pace at which expired tickets of dead owners go). */
const POLL_MS = 250;
/** Waiters taken per commit (2 mutations each, with the histogram's sums). */
const TAKE_PER_COMMIT = 100;
/** Users given slots in one commit: the model count and the heartbeat take 2 of the 10 checks. */
const USERS_PER_COMMIT = KV_MAX_CHECKS - 2;
/** How often a process sweeps dead owners' tickets while requests wait (and holds, when full). */
const SWEEP_TICKETS_MS = 60_000;
const SWEEP_HOLDS_MS = 2_000;
/** Enqueue commits tried before giving up (each conflict is another enqueue that landed). */
const ENQUEUE_ATTEMPTS = 100;
/** A slot taken: how long its request waited, and the pool key it is on. */
export interface Taken {
  waitedMs: number;
  key: PoolKey;
}

/** The client left while its request waited for a slot. */
export class ClientLeft extends Error {
  constructor() {
    super("the client left while waiting for an upstream slot");
    this.name = "ClientLeft";
  }
}

/** What holds a slot once taken: a lease (the Ledger records it) or a hold of its own. */
type Holder = { lease: Lease; hold?: undefined } | { hold: SlotHold; lease?: undefined };

interface Waiter {
  holder: Holder;
  userId: string;
  model: string;
  ticket: string;
  arrived: number;
  /** Its ticket is in KV (other processes see it in line), written at `stamp`. */
  ticketed: boolean;
  stamp: string | null;
  /** Taken in a commit in flight: its timer and the client's hang-up wait for the outcome. */
  claiming: boolean;
  /** A time-out or hang-up that came while claiming: applied if the commit fails. */
  pending: (() => void) | null;
  done: boolean;
  resolve: (taken: Taken) => void;
  reject: (err: unknown) => void;
  timer?: ReturnType<typeof setTimeout>;
  cleanup?: () => void;
}

interface ModelQueue {
  waiters: Waiter[];
  running: boolean;
  kicked: boolean;
  wake: (() => void) | null;
  watching: ReadableStreamDefaultReader<unknown> | null;
}

export interface UpstreamHealth {
  models: Array<{ model: string; cap: number; inFlight: number; waiting: number }>;
  /** Each pool key (its last 4 characters only): in service or cooling down, in flight per model. */
  keys: Array<PoolKeyStatus & { inFlight: Array<{ model: string; n: number }> }>;
  /** Waits for a slot over the last hour, all processes (bucket upper bounds, ms). */
  waits: WaitPercentiles;
}

/** The most slots of a model one user may hold: ceil(share × cap), at least 1. */
export function userShareOf(cap: number, share: number): number {
  // 0.7 × 10 is 7.000000000000001 in floating point: not a reason for an eighth slot.
  return Math.max(1, Math.ceil(share * cap - 1e-9));
}

export class UpstreamSlots {
  private readonly queues = new Map<string, ModelQueue>();
  private seq = 0;
  private closed = false;
  private lastTicketSweep = 0;
  private readonly lastHoldSweep = new Map<string, number>();

  constructor(
    private readonly kv: Deno.Kv,
    private readonly config: Config,
    private readonly ledger: Ledger,
    private readonly log?: Logger,
    /** The GLM keys whose slots these are (UPSTREAM_CONCURRENCY is per key). */
    readonly pool: KeyPool = new KeyPool(kv, config),
    private readonly clock: Clock = systemClock,
  ) {}

  /** The cap for a model (0 = none). */
  capOf(model: string): number {
    const caps = this.config.glm.concurrency;
    return caps[model.toLowerCase()] ?? caps["*"] ?? 0;
  }

  /**
   * Takes an upstream slot for the lease's model, waiting in line: on the pool key with the most
   * free slots. Resolves to the ms waited and the key; rejects with 503 upstream_busy after
   * UPSTREAM_QUEUE_MS (or at once when UPSTREAM_QUEUE_MAX requests wait already), or ClientLeft.
   */
  acquire(lease: Lease, signal: AbortSignal): Promise<Taken> {
    return this.wait({ lease }, lease.user.id, lease.model, signal);
  }

  /**
   * Takes an upstream slot for a call without a lease (count_tokens), on the same terms; the
   * hold's release() gives it back.
   */
  async acquireHold(userId: string, model: string, signal: AbortSignal): Promise<SlotHold> {
    const hold = new SlotHold(this.kv, model.toLowerCase(), userId, this.log);
    await this.wait({ hold }, userId, model, signal);
    return hold;
  }

  /** Every pool key's slots for this model: cap per key × keys (the user share's base). */
  private slotsOf(model: string): number {
    return this.capOf(model) * Math.max(1, this.pool.size);
  }

  private wait(
    holder: Holder,
    userId: string,
    modelName: string,
    signal: AbortSignal,
  ): Promise<Taken> {
    const model = modelName.toLowerCase();
    const arrived = this.clock();
    if (signal.aborted) return Promise.reject(new ClientLeft());
    return new Promise<Taken>((resolve, reject) => {
      const w: Waiter = {
        holder,
        userId,
        model,
        ticket: `${String(arrived).padStart(15, "0")}-${this.ledger.procId}-${
          (this.seq++).toString(36).padStart(8, "0")
        }`,
        arrived,
        ticketed: false,
        stamp: null,
        claiming: false,
        pending: null,
        done: false,
        resolve,
        reject,
      };
      const give = (err: unknown) => {
        if (w.done) return;
        w.done = true;
        this.forget(w);
        reject(err);
      };
      const onAbort = () => {
        if (w.claiming) w.pending = () => give(new ClientLeft());
        else give(new ClientLeft());
      };
      signal.addEventListener("abort", onAbort, { once: true });
      w.timer = setTimeout(() => {
        const expire = () => {
          this.recordWaits([this.clock() - arrived]);
          give(this.busy());
        };
        if (w.claiming) w.pending = expire;
        else expire();
      }, this.config.glm.queueMs);
      w.cleanup = () => {
        clearTimeout(w.timer);
        signal.removeEventListener("abort", onAbort);
      };
      const q = this.queue(model);
      q.waiters.push(w);
      this.pump(model, q, true);
    });
  }

  /** The refusal after a full wait. */
  private busy(): AppError {
    const s = this.retryAfterS();
    return new AppError(
      "upstream_busy",
      `Every upstream slot for this model has been in use for ${
        formatInt(this.config.glm.queueMs)
      } ms; ` +
        `retry in ${s}s. Nothing was counted against your limits.`,
      { "retry-after": String(s) },
    );
  }

  /** The refusal when UPSTREAM_QUEUE_MAX requests wait already. */
  private queueFull(): AppError {
    const s = this.retryAfterS();
    return new AppError(
      "upstream_busy",
      `${formatCount(this.config.glm.queueMax, "request")} ${
        this.config.glm.queueMax === 1 ? "is" : "are"
      } waiting for an upstream slot already; ` +
        `retry in ${s}s. Nothing was counted against your limits.`,
      { "retry-after": String(s) },
    );
  }

  private retryAfterS(): number {
    return Math.min(30, Math.max(1, Math.ceil(this.config.glm.queueMs / 4000)));
  }

  private queue(model: string): ModelQueue {
    let q = this.queues.get(model);
    if (!q) {
      q = { waiters: [], running: false, kicked: false, wake: null, watching: null };
      this.queues.set(model, q);
    }
    return q;
  }

  /** A waiter that gave up: out of the queue, its ticket deleted. */
  private forget(w: Waiter) {
    w.cleanup?.();
    const q = this.queues.get(w.model);
    if (q) q.waiters = q.waiters.filter((x) => x !== w);
    if (w.ticketed) this.dropTicket(w);
  }

  /**
   * Deletes a ticket this process wrote, counting it out — unless a sweep took it first (the
   * commit checks the ticket as written, so it is counted out once).
   */
  private dropTicket(w: Waiter) {
    const key = keys.upstreamTicket(w.model, w.ticket);
    w.ticketed = false;
    this.kv.atomic().check({ key, versionstamp: w.stamp }).delete(key)
      .sum(keys.upstreamQueueCount("out"), 1n)
      .commit().catch(() => {});
  }

  private kick(q: ModelQueue) {
    q.kicked = true;
    q.wake?.();
  }

  /** Runs the model's queue until it is empty (one loop per model and process). */
  private pump(model: string, q: ModelQueue, fresh = false) {
    if (q.running) return this.kick(q);
    q.running = true;
    this.drain(model, q, fresh)
      .catch((err) => {
        this.log?.error("upstream slots: queue failed", { model, error: String(err) });
        for (const w of q.waiters.splice(0)) {
          if (w.done) continue;
          w.done = true;
          w.cleanup?.();
          if (w.ticketed) this.dropTicket(w);
          w.reject(err);
        }
      })
      .finally(() => {
        q.running = false;
        this.unwatch(q);
        if (q.waiters.length && !this.closed) this.pump(model, q);
      });
  }

  private async drain(model: string, q: ModelQueue, fresh: boolean) {
    const cap = this.capOf(model);
    // First in line here: a slot free for it at once needs no ticket (one commit fewer).
    if (fresh && q.waiters.length === 1 && await this.tryTake(model, q, cap, false)) return;
    while (q.waiters.length) {
      // Every waiter has a ticket, so other processes see it in line.
      if (q.waiters.some((w) => !w.ticketed)) await this.writeTickets(model, q);
      if (!q.waiters.length) break;
      q.kicked = false;
      const progressed = await this.tryTake(model, q, cap, true);
      if (!progressed && !q.kicked && q.waiters.length) await this.nap(model, q);
    }
  }

  /**
   * Puts this process's new waiters in line: their tickets, in commits that check the count of
   * requests waiting (UPSTREAM_QUEUE_MAX). Those beyond it are refused at once.
   */
  private async writeTickets(model: string, q: ModelQueue) {
    const inKey = keys.upstreamQueueCount("in");
    const outKey = keys.upstreamQueueCount("out");
    let swept = false;
    for (let attempt = 1;; attempt++) {
      const fresh = q.waiters.filter((w) => !w.ticketed && !w.done);
      if (!fresh.length) return;
      const [counted, left] = await this.kv.getMany([inKey, outKey]);
      const room = this.config.glm.queueMax - Math.max(0, u64(counted.value) - u64(left.value));
      if (room < fresh.length) {
        // Full, or so it looks: tickets of owners that died may still be counted.
        if (!swept && await this.sweepTickets(this.clock(), 1_000)) {
          swept = true;
          continue;
        }
        for (const w of fresh.slice(Math.max(0, room))) {
          w.done = true;
          this.forget(w);
          w.reject(this.queueFull());
        }
        if (room <= 0) return;
      } else if (this.clock() - this.lastTicketSweep > SWEEP_TICKETS_MS) {
        this.sweepTickets(this.clock(), SWEEP_TICKETS_MS).catch(() => {});
      }
      const part = fresh.filter((w) => !w.done).slice(0, Math.min(room, TAKE_PER_COMMIT));
      if (!part.length) continue;
      // Read after the count: a ticket written since then fails this commit's check.
      const rounds = new Rounds(
        await readLine(this.kv, model, this.clock(), this.config.glm.queueMs),
      );
      const op = this.kv.atomic().check(counted).sum(inKey, BigInt(part.length));
      for (const w of part) {
        const ticket: Ticket = {
          deadline: w.arrived + this.config.glm.queueMs,
          user: w.userId,
          round: rounds.next(w.userId),
          counted: true,
        };
        op.set(keys.upstreamTicket(model, w.ticket), ticket);
      }
      const res = await commitOrConflict(op);
      if (!res.ok) {
        // Another request entered the queue meanwhile: count again.
        if (attempt >= ENQUEUE_ATTEMPTS) {
          throw new Error("upstream queue: enqueue kept conflicting");
        }
        await new Promise((r) => setTimeout(r, backoffMs(attempt)));
        continue;
      }
      for (const w of part) {
        w.ticketed = true;
        w.stamp = res.versionstamp;
        // Gave up while its ticket was being written: out of line again.
        if (w.done) this.dropTicket(w);
      }
      attempt = 0;
    }
  }

  /**
   * Deletes tickets of owners that died (line.ts), at most once per `everyMs` per process;
   * resolves to whether any was deleted.
   */
  private async sweepTickets(now: number, everyMs: number): Promise<boolean> {
    if (now - this.lastTicketSweep < everyMs) return false;
    this.lastTicketSweep = now;
    const deleted = await sweepDeadTickets(this.kv, now);
    if (deleted) this.log?.info("upstream queue: tickets of dead processes removed", { deleted });
    return deleted > 0;
  }

  /**
   * One attempt: reads the count and the line; takes the slots that are free for this process's
   * waiters among the first places of the round-robin line that may take one (users at their
   * share passed over), in one commit. Returns whether anything changed.
   */
  private async tryTake(
    model: string,
    q: ModelQueue,
    cap: number,
    ticketed: boolean,
  ): Promise<boolean> {
    const now = this.clock();
    // The keys in service, and the one with the most free slots for this model.
    const pool = await this.pool.inService();
    if (!pool.length) return false; // every key cooling down: the gateway says so at the door
    // The first try (no ticket) reads the line and its user's count with the keys' counts.
    const local = ticketed ? [] : q.waiters.filter((w) => !w.ticketed && !w.done);
    const ahead = [...new Set(local.map((w) => w.userId))].slice(0, KV_GET_MANY_MAX);
    const [read, listed] = await Promise.all([
      getManyChunked(this.kv, [
        ...pool.map((k) => keys.upstreamKeyHeld(model, k.id)),
        ...ahead.map((u) => keys.upstreamUserHeld(model, u)),
      ]),
      ticketed ? null : readLine(this.kv, model, now, this.config.glm.queueMs),
    ]);
    const userHeld = new Map<string, Deno.KvEntryMaybe<unknown>>();
    ahead.forEach((u, i) => userHeld.set(u, read[pool.length + i]));
    let best = 0;
    let free = -Infinity;
    pool.forEach((_key, i) => {
      // heldSum: a count that wrapped below zero (a bug's trace) counts as none, not forever.
      const keyFree = cap - heldSum(read[i].value);
      if (keyFree > free) [best, free] = [i, keyFree];
    });
    const key = pool[best];
    const held = read[best];
    if (free <= 0) {
      this.maybeSweepHolds(model, now);
      return false;
    }
    const mine = new Map(q.waiters.map((w) => [w.ticket, w]));
    const line = listed ?? await readLine(this.kv, model, now, this.config.glm.queueMs);
    const places: Place<Waiter>[] = [];
    for (const t of line) {
      const own = mine.get(t.ticket);
      if (own?.done) continue; // gave up: its ticket is on its way out
      places.push({ user: t.user, round: t.round, own });
    }
    // Not in line yet: where its ticket would go.
    const rounds = new Rounds(line);
    for (const w of local) places.push({ user: w.userId, round: rounds.next(w.userId), own: w });
    let chosen = await this.pick(model, serveOrder(places), free, this.slotsOf(model), userHeld);
    if (!chosen.length) return false;
    for (const w of chosen) {
      if (w.holder.lease?.lost) {
        // Its process was taken for dead meanwhile: the lease is gone, nothing to hold a slot.
        w.done = true;
        this.forget(w);
        w.reject(this.busy());
      }
    }
    chosen = chosen.filter((w) => !w.done);
    if (!chosen.length) return true;
    let heartbeat: Deno.AtomicCheck | null = null;
    if (chosen.some((w) => w.holder.lease)) {
      heartbeat = this.ledger.slots.check();
      if (!heartbeat) return false;
    }
    // The key's count is checked (the cap is per key, exact across processes); the model's total
    // only counts (health, kv.watch).
    const n = BigInt(chosen.length);
    const op = this.kv.atomic()
      .check(held)
      .sum(keys.upstreamKeyHeld(model, key.id), n)
      .sum(keys.upstreamHeld(model), n);
    if (heartbeat) op.check(heartbeat);
    const perUser = new Map<string, number>();
    for (const w of chosen) perUser.set(w.userId, (perUser.get(w.userId) ?? 0) + 1);
    for (const [user, n] of perUser) {
      op.check(userHeld.get(user)!).sum(keys.upstreamUserHeld(model, user), BigInt(n));
    }
    const waits: number[] = [];
    let out = 0;
    for (const w of chosen) {
      w.claiming = true;
      if (w.holder.lease) this.ledger.slots.attach(op, w.holder.lease, model, key.id);
      else op.set(w.holder.hold.key, w.holder.hold.record(now, key.id) satisfies HoldRecord);
      if (w.ticketed) {
        op.delete(keys.upstreamTicket(model, w.ticket));
        out++;
      }
      waits.push(now - w.arrived);
    }
    if (out) op.sum(keys.upstreamQueueCount("out"), BigInt(out));
    addWaits(op, waits, now);
    let res: Deno.KvCommitResult | Deno.KvCommitError;
    try {
      res = await commitOrConflict(op);
    } catch (err) {
      // The commit may have landed (a remote KV that failed to answer): the records say.
      res = await this.landed(chosen[0], model, key.id).catch(() => {
        // Not even the read-back answered: their releases read their records to free a slot
        // only if this commit gave them one.
        for (const w of chosen) {
          if (w.holder.lease) this.ledger.slots.unsure(w.holder.lease);
          else w.holder.hold.unsure = true;
        }
        throw err;
      });
    } finally {
      for (const w of chosen) w.claiming = false;
    }
    if (!res.ok) {
      for (const w of chosen) w.pending?.();
      return false;
    }
    for (const w of chosen) {
      if (w.holder.lease) this.ledger.slots.attached(w.holder.lease, model, key.id);
      else w.holder.hold.attached(res.versionstamp, key);
      w.ticketed = false; // deleted by the commit
      w.done = true;
      w.cleanup?.();
      q.waiters = q.waiters.filter((x) => x !== w);
      w.resolve({ waitedMs: this.clock() - w.arrived, key });
    }
    return true;
  }

  /**
   * Walks the line in the order it is served in and gives the `free` slots to the first places whose
   * users are below their share; returns this process's waiters among them (at most
   * USERS_PER_COMMIT users: the others' turn comes in the next commit). Reads the users' counts
   * as it goes, ten at a time, into `userHeld`.
   */
  private async pick(
    model: string,
    order: Place<Waiter>[],
    free: number,
    cap: number,
    userHeld: Map<string, Deno.KvEntryMaybe<unknown>>,
  ): Promise<Waiter[]> {
    const share = userShareOf(cap, this.config.glm.userShare);
    const given = new Map<string, number>();
    const users = new Set<string>();
    const chosen: Waiter[] = [];
    let taken = 0;
    for (let i = 0; i < order.length && taken < free; i++) {
      const { user, own } = order[i];
      if (!userHeld.has(user)) {
        const next: string[] = [];
        for (let j = i; j < order.length && next.length < KV_GET_MANY_MAX; j++) {
          const u = order[j].user;
          if (!userHeld.has(u) && !next.includes(u)) next.push(u);
        }
        const got = await this.kv.getMany(next.map((u) => keys.upstreamUserHeld(model, u)));
        next.forEach((u, n) => userHeld.set(u, got[n]));
      }
      const holds = heldSum(userHeld.get(user)!.value) + (given.get(user) ?? 0);
      if (holds >= share) continue; // at their share: the places behind go first
      given.set(user, (given.get(user) ?? 0) + 1);
      taken++;
      if (!own || chosen.length >= TAKE_PER_COMMIT) continue; // another process's turn
      if (!users.has(user) && users.size >= USERS_PER_COMMIT) continue;
      users.add(user);
      chosen.push(own);
    }
    return chosen;
  }

  /**
   * After a commit that threw: whether it landed, read back from one of its records (the commit
   * wrote them all or none).
   */
  private async landed(
    w: Waiter,
    model: string,
    keyId: string,
  ): Promise<Deno.KvCommitResult | Deno.KvCommitError> {
    if (w.holder.hold) {
      const entry = await this.kv.get(w.holder.hold.key);
      return entry.versionstamp ? { ok: true, versionstamp: entry.versionstamp } : { ok: false };
    }
    const entry = await this.ledger.slots.inKv(w.holder.lease);
    return entry.slot === model && entry.keyId === keyId && entry.versionstamp
      ? { ok: true, versionstamp: entry.versionstamp }
      : { ok: false };
  }

  /** Every slot is taken: frees those of holds whose process died (at most every 2 s). */
  private maybeSweepHolds(model: string, now: number) {
    if (now - (this.lastHoldSweep.get(model) ?? 0) < SWEEP_HOLDS_MS) return;
    this.lastHoldSweep.set(model, now);
    sweepHolds(this.kv, model, now).catch(() => {});
  }

  /** Waits for a change of the count (kv.watch), a new waiter, or POLL_MS. */
  private async nap(model: string, q: ModelQueue) {
    this.watch(model, q);
    await new Promise<void>((resolve) => {
      const timer = setTimeout(done, POLL_MS);
      function done() {
        clearTimeout(timer);
        q.wake = null;
        resolve();
      }
      q.wake = done;
    });
  }

  private watch(model: string, q: ModelQueue) {
    if (q.watching || this.closed) return;
    let reader: ReadableStreamDefaultReader<unknown>;
    try {
      reader = this.kv.watch([keys.upstreamHeld(model)]).getReader();
    } catch {
      return; // polling alone
    }
    q.watching = reader;
    (async () => {
      let first = true;
      while (true) {
        const { done } = await reader.read();
        if (done) break;
        if (first) first = false; // the current value
        else this.kick(q);
      }
    })().catch(() => {}).finally(() => {
      if (q.watching === reader) q.watching = null;
    });
  }

  private unwatch(q: ModelQueue) {
    const r = q.watching;
    q.watching = null;
    r?.cancel().catch(() => {});
  }

  /** In flight and waiting per model, and the queue-wait percentiles of the last hour. */
  async health(now = this.clock()): Promise<UpstreamHealth> {
    const models: UpstreamHealth["models"] = [];
    await this.sweepTickets(now, SWEEP_TICKETS_MS);
    for await (const e of this.kv.list({ prefix: keys.upstreamHelds() })) {
      const model = String(e.key[1]);
      let waiting = 0;
      for await (
        const t of this.kv.list<{ deadline: number }>({ prefix: keys.upstreamTickets(model) })
      ) {
        if (t.value.deadline > now) waiting++;
      }
      models.push({ model, cap: this.slotsOf(model), inFlight: u64(e.value), waiting });
    }
    const waits = await waitPercentiles(this.kv, now, this.config.glm.queueMs);
    const inFlight = new Map<string, Array<{ model: string; n: number }>>();
    for await (const e of this.kv.list({ prefix: keys.upstreamKeyHelds() })) {
      const n = heldSum(e.value);
      if (!n) continue;
      const id = String(e.key[2]);
      inFlight.set(id, [...(inFlight.get(id) ?? []), { model: String(e.key[1]), n }]);
    }
    const status = await this.pool.status();
    const pool = this.pool.keys.map((k, i) => ({
      ...status[i],
      inFlight: inFlight.get(k.id) ?? [],
    }));
    return { models, keys: pool, waits };
  }

  /** Waits that ended without a slot (the commit that takes slots records the others). */
  private recordWaits(waits: number[]) {
    const op = this.kv.atomic();
    addWaits(op, waits, this.clock());
    op.commit().catch(() => {});
  }

  close() {
    this.closed = true;
    for (const q of this.queues.values()) this.unwatch(q);
  }
}
