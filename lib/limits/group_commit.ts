/**
 * Group commit: operations that arrive while commits are in flight go together into the next
 * one, in arrival order, one key's operations seeing the state the ones before them left.
 *
 * It knows nothing of what an operation does. An operation names its key (operations of one key
 * commit one after another: batches in flight never share a key), the checks it needs in its
 * commit (named, so a check several operations share counts once) and an upper bound of the
 * mutations it adds. A batch takes at most `maxChecks` checks (KV Connect's 10, the owner's own
 * included) and `maxMutations`. The owner's `attempt(batch)` reads, decides and commits one try;
 * a conflict is tried again with the one back-off policy, and a batch that keeps conflicting is
 * split by key. At most `maxBatches` batches are in flight at once.
 *
 * `exclusive(fn)` runs fn alone (no batch in flight, none started until it ends): the owner's
 * heartbeat renewal, which every commit checks. `hold(promise)` only keeps new batches from
 * starting until it settles (a renewal started from inside a batch).
 */
import { backoffMs, KV_MAX_CHECKS, KV_MAX_MUTATIONS } from "../core/kv_ops.ts";

export interface GroupOp {
  /** Operations of one key commit in order, never in two batches in flight at once. */
  readonly key: string;
  /** Named checks the operation needs in its batch's commit; a name counts once per batch. */
  readonly checks: readonly string[];
  /** Mutations it adds to its batch's commit (an upper bound). */
  readonly mutations: number;
}

export interface GroupCommitOptions<Op extends GroupOp> {
  /**
   * One try at a batch: read, decide, commit. Resolves true when the batch is done (committed,
   * or nothing had to be written) and false when the commit conflicted (it is tried again).
   * A throw fails the batch.
   */
  attempt(batch: Op[]): Promise<boolean>;
  /** The batch gave up (its attempt threw, or it kept conflicting): its operations learn why. */
  fail(batch: Op[], err: unknown): void;
  /** Checks every commit makes besides its operations' own (e.g. a heartbeat). */
  baseChecks?: number;
  maxChecks?: number;
  maxMutations?: number;
  maxOps?: number;
  maxBatches?: number;
  /** Tries of a batch before a conflicting batch of several keys goes one key at a time. */
  batchAttempts?: number;
  /** Tries of one key's operations before giving up. */
  maxAttempts?: number;
  /** Waits between tries (tests pass a fake). */
  sleep?: (ms: number) => Promise<void>;
}

const defaultSleep = (ms: number) =>
  ms <= 0 ? Promise.resolve() : new Promise<void>((r) => setTimeout(r, ms));

export class GroupCommitter<Op extends GroupOp> {
  private queue: Op[] = [];
  private readonly inFlight = new Set<Promise<void>>();
  /** Keys that a batch in flight holds. */
  private readonly busy = new Set<string>();
  private holds = 0;
  private readonly exclusives: Array<() => void> = [];
  private idle: Array<() => void> = [];
  private readonly o: Required<Omit<GroupCommitOptions<Op>, "attempt" | "fail">>;

  constructor(private readonly owner: GroupCommitOptions<Op>) {
    this.o = {
      baseChecks: owner.baseChecks ?? 0,
      maxChecks: owner.maxChecks ?? KV_MAX_CHECKS,
      maxMutations: owner.maxMutations ?? KV_MAX_MUTATIONS - 100,
      maxOps: owner.maxOps ?? 128,
      maxBatches: owner.maxBatches ?? 2,
      batchAttempts: owner.batchAttempts ?? 3,
      maxAttempts: owner.maxAttempts ?? 100,
      sleep: owner.sleep ?? defaultSleep,
    };
  }

  /** Operations queued or in a batch in flight. */
  get pending(): number {
    return this.queue.length + this.inFlight.size;
  }

  submit(op: Op): void {
    this.queue.push(op);
    this.pump();
  }

  /** Runs fn once no batch is in flight; no batch starts until it has ended. */
  exclusive<T>(fn: () => Promise<T>): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      this.exclusives.push(() => {
        this.hold(fn()).then(resolve, reject);
      });
      this.pump();
    });
  }

  /** Keeps new batches from starting until `work` settles (batches in flight go on). */
  hold<T>(work: Promise<T>): Promise<T> {
    this.holds++;
    const release = () => {
      this.holds--;
      this.pump();
    };
    work.then(release, release);
    return work;
  }

  /** Resolves once nothing is queued, in flight or held. */
  drain(): Promise<void> {
    if (this.isIdle()) return Promise.resolve();
    return new Promise((r) => this.idle.push(r));
  }

  private isIdle(): boolean {
    return !this.inFlight.size && !this.queue.length && !this.holds && !this.exclusives.length;
  }

  /** Starts what may start: an exclusive run once nothing is in flight, else batches. */
  private pump() {
    if (this.holds) return;
    if (this.exclusives.length) {
      if (!this.inFlight.size) this.exclusives.shift()!();
      return;
    }
    while (this.queue.length && this.inFlight.size < this.o.maxBatches) {
      const batch = this.takeBatch();
      if (!batch.length) break;
      const keys = new Set(batch.map((op) => op.key));
      for (const k of keys) this.busy.add(k);
      const running = this.run(batch, this.o.batchAttempts)
        .catch((err) => this.owner.fail(batch, err))
        .finally(() => {
          for (const k of keys) this.busy.delete(k);
          this.inFlight.delete(running);
          this.pump();
        });
      this.inFlight.add(running);
    }
    if (this.isIdle()) { for (const r of this.idle.splice(0)) r(); }
  }

  /**
   * The next operations that fit one commit, in queue order. Keys a batch in flight holds are
   * left out, and once one of a key's operations is left out so are the ones after it.
   */
  private takeBatch(): Op[] {
    const blocked = new Set(this.busy);
    const names = new Set<string>();
    const taken: Op[] = [];
    const left: Op[] = [];
    let mutations = 0;
    for (const op of this.queue) {
      if (blocked.has(op.key) || taken.length >= this.o.maxOps) {
        left.push(op);
        continue;
      }
      const added = op.checks.filter((c) => !names.has(c));
      const checks = this.o.baseChecks + names.size + new Set(added).size;
      if (
        (taken.length && checks > this.o.maxChecks) ||
        (taken.length && mutations + op.mutations > this.o.maxMutations)
      ) {
        blocked.add(op.key);
        left.push(op);
        continue;
      }
      for (const c of added) names.add(c);
      mutations += op.mutations;
      taken.push(op);
    }
    this.queue = left;
    return taken;
  }

  /** Tries a batch; one that keeps conflicting goes on one key at a time. */
  private async run(batch: Op[], attempts: number): Promise<void> {
    for (let n = 1;; n++) {
      if (await this.owner.attempt(batch)) return;
      if (n >= attempts) break;
      await this.o.sleep(backoffMs(n + 1));
    }
    const keys = [...new Set(batch.map((op) => op.key))];
    if (keys.length === 1) {
      // Several processes busy with this one key (a loaded machine makes their commits overlap
      // more): keep trying, with the back-off, before giving up.
      if (attempts < this.o.maxAttempts) return await this.run(batch, this.o.maxAttempts);
      throw new Error(`group commit: kept conflicting after ${attempts} attempts`);
    }
    await Promise.all(keys.map(async (k) => {
      const ops = batch.filter((op) => op.key === k);
      try {
        await this.run(ops, this.o.maxAttempts);
      } catch (err) {
        this.owner.fail(ops, err);
      }
    }));
  }
}
