/**
 * Cross-process cache invalidation through KV. Every write that can make a cached value wrong
 * (key rotation, revocation, status or limit changes) adds 1 to one KV counter in the same
 * atomic commit, and records which user it changed (`keys.cacheChange`, kept for 10 minutes).
 * Each process re-reads the counter at most every `intervalMs`; when it moved, it reads the
 * changes since its last look and drops those users' cached values only (all of them when the
 * record is gone, or when this process last looked longer ago than the records are kept). The
 * writing process drops its own entry at once, so only *other* processes can serve a value that
 * is at most `intervalMs` old. Deno KV's `watch` does not see other processes' writes on a local
 * file, hence the cheap poll.
 */
import { keys } from "../core/kv.ts";
import { type Clock, systemClock } from "../core/clock.ts";
import { BoundedMap } from "../core/kv_ops.ts";

const CHANGE_KEEP_MS = 10 * 60_000;
/** Users whose last drop is remembered one by one; older drops fold into `everything`. */
const BY_USER_MAX = 100_000;
/** Clock differences between processes that the change log tolerates. */
const SKEW_MS = 5_000;

export class CacheEpoch {
  /** Bumped whenever caches are dropped; per user below. */
  generation = 0;
  /** The generation of the last drop of everything. */
  private everything = 0;
  private readonly byUser = new BoundedMap<string, number>(BY_USER_MAX);
  private seen: bigint | null = null;
  private checkedAt = -Infinity;
  private lookedAt: number;
  private pending: Promise<void> | null = null;
  private readonly listeners = new Set<(userIds: string[] | null) => void>();

  constructor(
    private readonly kv: Deno.Kv,
    private readonly intervalMs = 250,
    /** How long change records are kept (and so how long a process can be away and catch up). */
    private readonly keepMs = CHANGE_KEEP_MS,
    /** Wall-clock time: change records are keyed by it, across processes. */
    private readonly clock: Clock = systemClock,
  ) {
    this.lookedAt = clock();
  }

  /** Adds the counter bump (and the record of whose values changed) to an invalidating write. */
  bump(op: Deno.AtomicOperation, userId: string): Deno.AtomicOperation {
    const at = this.clock();
    return op.sum(keys.cacheEpoch(), 1n)
      .set(keys.cacheChange(at, crypto.randomUUID()), userId, { expireIn: this.keepMs });
  }

  /** `listener(null)` drops every cached value; `listener(ids)` drops those users'. */
  onChange(listener: (userIds: string[] | null) => void) {
    this.listeners.add(listener);
  }

  /** Drops cached values in this process now: some users', or everything. */
  invalidate(userIds: string[] | null = null) {
    this.generation++;
    if (userIds === null) {
      this.everything = this.generation;
      this.byUser.clear();
    } else {
      for (const id of userIds) this.dropped(id);
    }
    for (const listener of this.listeners) listener(userIds);
  }

  private dropped(userId: string) {
    if (!this.byUser.has(userId) && this.byUser.size >= BY_USER_MAX) {
      // The set below evicts the least recently used entry, the first in iteration order: its
      // drop moves into `everything`, so a fill that raced it is still not kept.
      const [, oldest] = this.byUser.entries().next().value!;
      this.everything = Math.max(this.everything, oldest);
    }
    this.byUser.set(userId, this.generation);
  }

  /** The generation a fill for this user must still see to be kept (fills racing a drop are not). */
  generationOf(userId: string): number {
    return Math.max(this.everything, this.byUser.get(userId) ?? 0);
  }

  /** Resolves once the caches reflect every write older than `intervalMs`. */
  fresh(): Promise<void> | void {
    if (performance.now() - this.checkedAt < this.intervalMs) return;
    return this.pending ??= this.poll().finally(() => (this.pending = null));
  }

  private async poll() {
    const started = performance.now();
    const entry = await this.kv.get<Deno.KvU64>(keys.cacheEpoch());
    const value = entry.value?.value ?? 0n;
    const since = this.lookedAt - SKEW_MS;
    // Away longer than the records are kept (no /api/key call here for a while): the log may
    // have lost changes made meanwhile, so it cannot say whose values are still right.
    const margin = Math.min(2 * SKEW_MS, this.keepMs / 2);
    const away = this.clock() - this.lookedAt > this.keepMs - margin;
    this.lookedAt = this.clock();
    if (this.seen !== null && value !== this.seen && away) {
      this.invalidate(null);
    } else if (this.seen !== null && value !== this.seen) {
      const changed = new Set<string>();
      let complete = true;
      const iter = this.kv.list<string>(
        { start: keys.cacheChange(since, ""), end: keys.cacheChanges(Number.MAX_SAFE_INTEGER) },
        { limit: 1000 },
      );
      let n = 0;
      for await (const change of iter) {
        n++;
        if (typeof change.value === "string") changed.add(change.value);
      }
      // No record (older writers, or more than the log holds): drop everything to be safe.
      if (changed.size === 0 || n >= 1000) complete = false;
      this.invalidate(complete ? [...changed] : null);
    }
    this.seen = value;
    // Only now: a caller that finds the check recent must also find its drops done.
    this.checkedAt = started;
  }
}
