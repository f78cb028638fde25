/**
 * Background work that must get done, retried with back-off, by whichever process is alive: an
 * outbox in KV. Operator events (lib/alerts/deliver.ts) and the Clerk metadata sync
 * (lib/clerk/sync.ts) run on it.
 *
 * Not kv.enqueue/listenQueue: queues do not exist over KV Connect (a self-hosted denokv,
 * DENO_KV_PATH=https://…; denoland/denokv#55, #57) nor on the new Deno Deploy
 * (denoland/docs#168), and CONTRACT §8 wants the same code on every KV. A job is a plain `set`
 * keyed by when it is due, so it can ride in the same atomic commit as the change it follows: the
 * job exists if and only if that change landed, once. Every process polls the outbox and claims a
 * due job with an atomic check before running it, so several processes never run one attempt
 * twice; a process that dies mid-attempt leaves a lease that falls due later and is picked up
 * again.
 */
import { backoffMs } from "./kv_ops.ts";
import { type Clock, systemClock } from "./clock.ts";
import { isTransientKvError } from "./kv.ts";
import type { Logger } from "./log.ts";

/** A job as stored: the caller's fields plus the outbox's own. */
export type OutboxJob<T> = T & {
  id: string;
  /** Attempts started so far (a claimed attempt counts even if its process died). */
  attempts: number;
  /** When the job was created (ms). */
  createdAt: number;
};

/** Why an attempt did not finish the job; `permanent` when trying again cannot help. */
export interface AttemptFailure {
  error: string;
  permanent?: boolean;
}

/** What an outbox does with its jobs. */
export interface OutboxWorker<T> {
  /** Names the work in log lines: "<name> failed, will retry", "<name> gave up". */
  name: string;
  /** Runs one attempt; null when the job is done. `signal` aborts when the process stops. */
  run(job: OutboxJob<T>, signal: AbortSignal): Promise<AttemptFailure | null>;
  /** The wait before the next attempt, after `job.attempts` attempts; undefined gives up. */
  retryInMs(job: OutboxJob<T>): number | undefined;
  /** The fields that name the job in log lines (never a secret). */
  fields(job: OutboxJob<T>): Record<string, unknown>;
  /** Logs a finished job (the outbox does not: what is worth a line differs). */
  done?(job: OutboxJob<T>): void;
}

/** Jobs one pass runs at once. */
const BATCH = 10;

export class Outbox<T extends object> {
  /** How often each process looks for due jobs. */
  pollMs = 1_000;
  /** How long a claimed attempt is reserved; must exceed the longest attempt (a crash frees it then). */
  leaseMs = 60_000;

  private timer: ReturnType<typeof setTimeout> | undefined;
  private pass: Promise<void> | null = null;
  private again = false;
  private started = false;
  private closed = false;
  private readonly stopping = new AbortController();

  /** `prefix`: the first part of every job's key, [prefix, dueAt, id]. */
  constructor(
    private readonly kv: Deno.Kv,
    private readonly prefix: string,
    private readonly worker: OutboxWorker<T>,
    private readonly log: Logger,
    private readonly clock: Clock = systemClock,
  ) {}

  /**
   * Adds a new job to an atomic operation: it runs if and only if that commit lands (one
   * mutation). `dueAt` defaults to now.
   */
  add(op: Deno.AtomicOperation, job: T & { id: string }, dueAt = this.clock()): OutboxJob<T> {
    const stored = { ...job, attempts: 0, createdAt: this.clock() } as OutboxJob<T>;
    op.set(this.key(dueAt, job.id), stored);
    this.wake();
    return stored;
  }

  /** How many jobs are waiting, due or not (at most `limit`). */
  async pending(limit = 1): Promise<number> {
    let n = 0;
    for await (const _ of this.kv.list({ prefix: [this.prefix] }, { limit })) n++;
    return n;
  }

  /** Resolves when this process's pass in progress, if any, is over (its log lines written). */
  async passDone(): Promise<void> {
    await this.pass;
  }

  /** Starts this process's loop. */
  start(): void {
    if (this.closed || this.started) return;
    this.started = true;
    this.schedule(this.pollMs);
  }

  /**
   * Runs a pass now and waits for it: a cron's nudge on hosts that freeze idle processes (Deno
   * Deploy), where the poll's timer may not fire for a long while.
   */
  async flush(): Promise<void> {
    if (this.closed) return;
    if (!this.pass) {
      clearTimeout(this.timer);
      this.runPass();
    }
    await this.pass;
  }

  /** Stops the loop; attempts in flight are cut and retried later (by any process). */
  async close(): Promise<void> {
    this.closed = true;
    clearTimeout(this.timer);
    this.timer = undefined;
    this.stopping.abort();
    await this.pass;
  }

  private key(dueAt: number, id: string): Deno.KvKey {
    return [this.prefix, dueAt, id];
  }

  private schedule(ms: number) {
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.runPass(), ms);
  }

  /** A new job was committed (or is about to be): look soon rather than at the next poll. */
  wake(): void {
    if (!this.started || this.closed) return;
    if (this.pass) this.again = true;
    else this.schedule(10);
  }

  private runPass() {
    this.timer = undefined;
    if (this.closed) return;
    this.again = false;
    this.pass = this.runDue()
      .catch((err) => this.log.error(`${this.worker.name} pass failed`, { error: errorText(err) }))
      .then((more) => {
        this.pass = null;
        if (this.started && !this.closed) this.schedule(more || this.again ? 0 : this.pollMs);
      });
  }

  /** Runs the due jobs (a batch); true when there may be more due at once. */
  private async runDue(): Promise<boolean> {
    const due: Deno.KvEntry<OutboxJob<T>>[] = [];
    const iter = this.kv.list<OutboxJob<T>>(
      { prefix: [this.prefix], end: this.key(this.clock() + 1, "") },
      { limit: BATCH },
    );
    for await (const entry of iter) due.push(entry);
    await Promise.all(due.map((entry) => this.runOne(entry)));
    return due.length === BATCH;
  }

  private async runOne(entry: Deno.KvEntry<OutboxJob<T>>): Promise<void> {
    // Claim: move the job to a lease that falls due only if this process never finishes.
    const job: OutboxJob<T> = { ...entry.value, attempts: entry.value.attempts + 1 };
    const leaseKey = this.key(this.clock() + this.leaseMs, job.id);
    const claim = await this.commit(
      this.kv.atomic().check(entry).delete(entry.key).set(leaseKey, job),
    );
    if (!claim?.ok) return; // another process took it (or KV is busy: the next pass retries)
    const lease = { key: leaseKey, versionstamp: claim.versionstamp };

    let failure: AttemptFailure | null;
    try {
      failure = await this.worker.run(job, this.stopping.signal);
    } catch (err) {
      failure = { error: this.closed ? "the process is shutting down" : errorText(err) };
    }
    if (failure === null) {
      // Said before the lease goes: whoever sees the outbox empty sees the line too.
      this.worker.done?.(job);
      // Done: the lease must go now, or the job runs again when it falls due.
      await this.commitSoon(() => this.kv.atomic().check(lease).delete(leaseKey));
      return;
    }
    const retryInMs = failure.permanent ? undefined : this.worker.retryInMs(job);
    const res = await this.commitSoon(() => {
      const op = this.kv.atomic().check(lease).delete(leaseKey);
      if (retryInMs !== undefined) op.set(this.key(this.clock() + retryInMs, job.id), job);
      return op;
    });
    const fields = { ...this.worker.fields(job), attempt: job.attempts };
    const name = this.worker.name;
    if (res && !res.ok) {
      // This attempt outlived its lease and another process took the job over.
      this.log.warn(`${name} failed; another process has taken it over`, {
        ...fields,
        error: failure.error,
      });
    } else if (retryInMs === undefined) {
      this.log.error(`${name} gave up`, { ...fields, error: failure.error });
    } else {
      this.log.warn(`${name} failed, will retry`, { ...fields, retryInMs, error: failure.error });
    }
  }

  /**
   * Commits an attempt's outcome, retrying while another process holds the KV file's lock (a
   * busy machine with several processes on one file); null if it never went through.
   */
  private async commitSoon(
    build: () => Deno.AtomicOperation,
  ): Promise<Deno.KvCommitResult | Deno.KvCommitError | null> {
    for (let attempt = 1; attempt <= 20; attempt++) {
      const wait = backoffMs(attempt, { baseMs: 2.5, capMs: 250 });
      if (wait > 0) await new Promise((r) => setTimeout(r, wait));
      const res = await this.commit(build());
      if (res !== null || this.closed) return res;
    }
    return null;
  }

  /** Commits once; a KV lock held by another process is reported as null (the next pass retries). */
  private async commit(
    op: Deno.AtomicOperation,
  ): Promise<Deno.KvCommitResult | Deno.KvCommitError | null> {
    try {
      return await op.commit();
    } catch (err) {
      if (isTransientKvError(err) || this.closed) return null;
      throw err;
    }
  }
}

export function errorText(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}
