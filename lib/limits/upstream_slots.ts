/**
 * Upstream slots (CONTRACT §2 `UPSTREAM_CONCURRENCY`, §5 "Limits are exact…"): at most N requests
 * per model in flight to GLM across all processes, so the operator's GLM account never answers
 * `1302` (too many concurrent requests). The others wait in arrival order for up to
 * `UPSTREAM_QUEUE_MS`, then get 503 `upstream_busy`.
 *
 * ## State in KV
 * - `keys.upstreamHeld(model)`: a KvU64 count of the slots held. Taking slots is a commit that
 *   checks it (so the cap is exact across processes); giving one back is a sum in the Lease's
 *   settlement (lib/limits/admission.ts), which frees it at the answer's last byte or when the
 *   client leaves. A slot is recorded on its lease (`LeaseRecord.slot`), so a dead process's
 *   slots are freed by the reaper with its leases (within LEASE_TTL_MS and a reaper cycle).
 * - `keys.upstreamTicket(model, ticket)`: a request waiting. Tickets sort by arrival time, so
 *   the process that holds the oldest waiting request is the one that takes the next free slot;
 *   a ticket whose owner died stops counting at its deadline.
 * - `keys.upstreamWait(window, bucket)`: a histogram of waits per five minutes (/admin).
 *
 * A process with waiters watches the count (`kv.watch`) and also looks every POLL_MS, so a slot
 * freed anywhere is taken within a round trip.
 */
import type { Config } from "../core/config.ts";
import { AppError } from "../core/errors.ts";
import { commitOrConflict, keys, u64 } from "../core/kv.ts";
import type { Logger } from "../core/log.ts";
import type { Lease, Ledger } from "./admission.ts";

/** Safety net besides kv.watch (and the pace at which expired tickets of dead owners go). */
const POLL_MS = 250;
/** Waiters taken per commit (2 mutations each, with the histogram's sums). */
const TAKE_PER_COMMIT = 100;
/** Histogram windows (ms) and wait bucket bounds (ms); the last bucket is open-ended. */
const WINDOW_MS = 5 * 60_000;
export const WAIT_BOUNDS_MS = [
  0,
  1,
  2,
  5,
  10,
  20,
  50,
  100,
  200,
  500,
  1000,
  2000,
  5000,
  10_000,
  20_000,
  60_000,
];

/** The client left while its request waited for a slot. */
export class ClientLeft extends Error {
  constructor() {
    super("the client left while waiting for an upstream slot");
    this.name = "ClientLeft";
  }
}

interface Waiter {
  lease: Lease;
  model: string;
  ticket: string;
  arrived: number;
  /** Its ticket is in KV (other processes see it in line). */
  ticketed: boolean;
  /** Taken in a commit in flight: its timer and the client's hang-up wait for the outcome. */
  claiming: boolean;
  /** A time-out or hang-up that came while claiming: applied if the commit fails. */
  pending: (() => void) | null;
  done: boolean;
  resolve: (waitedMs: number) => void;
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
  /** Waits for a slot over the last hour, all processes (bucket upper bounds, ms). */
  waits: { count: number; p50Ms: number | null; p99Ms: number | null };
}

export class UpstreamSlots {
  private readonly queues = new Map<string, ModelQueue>();
  private seq = 0;
  private closed = false;

  constructor(
    private readonly kv: Deno.Kv,
    private readonly config: Config,
    private readonly ledger: Ledger,
    private readonly log?: Logger,
  ) {}

  /** The cap for a model (0 = none). */
  capOf(model: string): number {
    const caps = this.config.glm.concurrency;
    return caps[model.toLowerCase()] ?? caps["*"] ?? 0;
  }

  /**
   * Takes an upstream slot for the lease's model, waiting in arrival order. Resolves to the ms
   * waited; rejects with 503 upstream_busy after UPSTREAM_QUEUE_MS, or ClientLeft.
   */
  acquire(lease: Lease, signal: AbortSignal): Promise<number> {
    const model = lease.model.toLowerCase();
    const arrived = Date.now();
    if (signal.aborted) return Promise.reject(new ClientLeft());
    return new Promise<number>((resolve, reject) => {
      const w: Waiter = {
        lease,
        model,
        ticket: `${String(arrived).padStart(15, "0")}-${this.ledger.procId}-${
          (this.seq++).toString(36).padStart(8, "0")
        }`,
        arrived,
        ticketed: false,
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
          this.recordWaits([Date.now() - arrived]);
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
    const s = Math.max(1, Math.ceil(this.config.glm.queueMs / 4000));
    return new AppError(
      "upstream_busy",
      `Every upstream slot for this model has been in use for ${this.config.glm.queueMs} ms; ` +
        `retry in ${s}s. Nothing was counted against your limits.`,
      { "retry-after": String(Math.min(s, 30)) },
    );
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
    this.kv.delete(keys.upstreamTicket(w.model, w.ticket)).catch(() => {});
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
    // First in line here and nobody waiting anywhere: no ticket needed (one commit fewer).
    if (fresh && q.waiters.length === 1 && await this.tryTake(model, q, cap, false)) return;
    while (q.waiters.length) {
      // Every waiter has a ticket, so other processes see it in line.
      if (q.waiters.some((w) => !w.ticketed)) await this.writeTickets(model, q);
      q.kicked = false;
      const progressed = await this.tryTake(model, q, cap, true);
      if (!progressed && !q.kicked && q.waiters.length) await this.nap(model, q);
    }
  }

  private async writeTickets(model: string, q: ModelQueue) {
    const fresh = q.waiters.filter((w) => !w.ticketed);
    for (let i = 0; i < fresh.length; i += TAKE_PER_COMMIT) {
      const part = fresh.slice(i, i + TAKE_PER_COMMIT);
      const op = this.kv.atomic();
      for (const w of part) {
        op.set(keys.upstreamTicket(model, w.ticket), {
          deadline: w.arrived + this.config.glm.queueMs,
        }, { expireIn: this.config.glm.queueMs + 60_000 });
      }
      await op.commit();
      for (const w of part) w.ticketed = true;
    }
  }

  /**
   * One attempt: reads the count and the line; takes the slots that are free for this process's
   * waiters at the front of the line, in one commit. Returns whether anything changed.
   */
  private async tryTake(
    model: string,
    q: ModelQueue,
    cap: number,
    ticketed: boolean,
  ): Promise<boolean> {
    const now = Date.now();
    const held = await this.kv.get(keys.upstreamHeld(model));
    let inFlight = u64(held.value);
    if (inFlight > 2 ** 53) {
      // A KvU64 that wrapped below zero (a bug's trace): take it as none rather than never again.
      this.log?.error("upstream slots: the in-flight count wrapped below zero", { model });
      inFlight = 0;
    }
    const free = cap - inFlight;
    if (free <= 0) return false;
    const line: string[] = [];
    // Tickets of requests that arrived more than UPSTREAM_QUEUE_MS ago are past their deadline
    // (their owner gave up or died): the line starts after them.
    const oldest = String(Math.max(0, now - this.config.glm.queueMs + 1)).padStart(15, "0");
    for await (
      const e of this.kv.list<{ deadline: number }>(
        { prefix: keys.upstreamTickets(model), start: keys.upstreamTicket(model, oldest) },
        { limit: free + 50 },
      )
    ) {
      if (e.value.deadline > now) line.push(String(e.key[2]));
      if (line.length >= free) break;
    }
    const mine = new Map(q.waiters.map((w) => [w.ticket, w]));
    let chosen: Waiter[];
    if (!ticketed) {
      if (line.length) return false; // others are in line first
      chosen = q.waiters.slice(0, Math.min(free, TAKE_PER_COMMIT));
    } else {
      chosen = line.map((t) => mine.get(t)).filter((w): w is Waiter => w !== undefined)
        .slice(0, TAKE_PER_COMMIT);
    }
    if (!chosen.length) return false;
    for (const w of chosen) {
      if (w.lease.lost) {
        // Its process was taken for dead meanwhile: the lease is gone, nothing to hold a slot.
        w.done = true;
        this.forget(w);
        w.reject(this.busy());
      }
    }
    chosen = chosen.filter((w) => !w.done);
    if (!chosen.length) return true;
    const heartbeat = this.ledger.slotCheck();
    if (!heartbeat) return false;
    const op = this.kv.atomic()
      .check(held)
      .check(heartbeat)
      .sum(keys.upstreamHeld(model), BigInt(chosen.length));
    const waits: number[] = [];
    for (const w of chosen) {
      w.claiming = true;
      this.ledger.attachSlot(op, w.lease, model);
      if (w.ticketed) op.delete(keys.upstreamTicket(model, w.ticket));
      waits.push(now - w.arrived);
    }
    this.addWaits(op, waits, now);
    let res: Deno.KvCommitResult | Deno.KvCommitError;
    try {
      res = await commitOrConflict(op);
    } catch (err) {
      // The commit may have landed (a remote KV that failed to answer): the lease entries say.
      res = await this.landed(chosen, model).catch(() => {
        // Not even the read-back answered: their settlements read their entries to free a slot
        // only if this commit gave them one.
        for (const w of chosen) this.ledger.slotUnsure(w.lease);
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
      this.ledger.slotAttached(w.lease, model);
      w.done = true;
      w.cleanup?.();
      q.waiters = q.waiters.filter((x) => x !== w);
      w.resolve(Date.now() - w.arrived);
    }
    return true;
  }

  /**
   * After a commit that threw: whether it landed, read back from one of its lease entries (the
   * commit wrote them all or none).
   */
  private async landed(
    chosen: Waiter[],
    model: string,
  ): Promise<Deno.KvCommitResult | Deno.KvCommitError> {
    const entry = await this.ledger.slotInKv(chosen[0].lease);
    return entry.slot === model && entry.versionstamp
      ? { ok: true, versionstamp: entry.versionstamp }
      : { ok: false };
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

  private addWaits(op: Deno.AtomicOperation, waits: number[], now: number) {
    const window = Math.floor(now / WINDOW_MS);
    const counts = new Map<number, number>();
    for (const ms of waits) {
      const b = bucketOf(ms);
      counts.set(b, (counts.get(b) ?? 0) + 1);
    }
    for (const [b, n] of counts) op.sum(keys.upstreamWait(window, b), BigInt(n));
  }

  /** Waits that ended without a slot (the commit that takes slots records the others). */
  private recordWaits(waits: number[]) {
    const op = this.kv.atomic();
    this.addWaits(op, waits, Date.now());
    op.commit().catch(() => {});
  }

  /** In flight and waiting per model, and the queue-wait percentiles of the last hour. */
  async health(now = Date.now()): Promise<UpstreamHealth> {
    const models: UpstreamHealth["models"] = [];
    for await (const e of this.kv.list({ prefix: keys.upstreamHelds() })) {
      const model = String(e.key[1]);
      let waiting = 0;
      for await (
        const t of this.kv.list<{ deadline: number }>({ prefix: keys.upstreamTickets(model) })
      ) {
        if (t.value.deadline > now) waiting++;
      }
      models.push({ model, cap: this.capOf(model), inFlight: u64(e.value), waiting });
    }
    const last = Math.floor(now / WINDOW_MS);
    await this.sweepWaits(last - 12 * 24);
    const counts = new Array(WAIT_BOUNDS_MS.length + 1).fill(0);
    for await (
      const e of this.kv.list({
        start: keys.upstreamWaits(last - 11),
        end: keys.upstreamWaits(last + 1),
      })
    ) counts[Number(e.key[2])] += u64(e.value);
    const count = counts.reduce((a, b) => a + b, 0);
    const pct = (p: number) => {
      if (!count) return null;
      let seen = 0;
      for (let b = 0; b < counts.length; b++) {
        seen += counts[b];
        if (seen >= p * count) return WAIT_BOUNDS_MS[b] ?? this.config.glm.queueMs;
      }
      return null;
    };
    return { models, waits: { count, p50Ms: pct(0.5), p99Ms: pct(0.99) } };
  }

  /** Drops histogram windows older than `before` (a day is kept), a bounded number per call. */
  private async sweepWaits(before: number) {
    const op = this.kv.atomic();
    let n = 0;
    for await (
      const e of this.kv.list({ start: ["upstream_waits"], end: keys.upstreamWaits(before) }, {
        limit: 500,
      })
    ) {
      op.delete(e.key);
      n++;
    }
    if (n) await op.commit().catch(() => {});
  }

  close() {
    this.closed = true;
    for (const q of this.queues.values()) this.unwatch(q);
  }
}

/** The histogram bucket of a wait: the first bound it does not exceed. */
export function bucketOf(ms: number): number {
  const i = WAIT_BOUNDS_MS.findIndex((b) => ms <= b);
  return i === -1 ? WAIT_BOUNDS_MS.length : i;
}
