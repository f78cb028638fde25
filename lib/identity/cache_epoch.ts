/**
 * Cross-process cache invalidation through KV. Every write that can make a cached value wrong
 * (key rotation, revocation, status or limit changes) adds 1 to one KV counter in the same
 * atomic commit; each process re-reads the counter at most every `intervalMs` and drops its
 * caches when it moved. The writing process drops its own entries at once, so only *other*
 * processes can serve a value that is at most `intervalMs` old. Deno KV's `watch` does not see
 * other processes' writes on a local file, hence the cheap poll.
 */
import { keys } from "../core/kv.ts";

export class CacheEpoch {
  /** Bumped locally whenever the caches are dropped; fills started before it are discarded. */
  generation = 0;
  private seen: bigint | null = null;
  private checkedAt = -Infinity;
  private pending: Promise<void> | null = null;
  private readonly listeners = new Set<() => void>();

  constructor(private readonly kv: Deno.Kv, private readonly intervalMs = 250) {}

  /** Adds the counter bump to a write that invalidates cached values. */
  bump(op: Deno.AtomicOperation): Deno.AtomicOperation {
    return op.sum(keys.cacheEpoch(), 1n);
  }

  onChange(listener: () => void) {
    this.listeners.add(listener);
  }

  /** Drops every cache in this process now. */
  invalidate() {
    this.generation++;
    for (const listener of this.listeners) listener();
  }

  /** Resolves once the caches reflect every write older than `intervalMs`. */
  fresh(): Promise<void> | void {
    if (performance.now() - this.checkedAt < this.intervalMs) return;
    return this.pending ??= this.poll().finally(() => (this.pending = null));
  }

  private async poll() {
    const entry = await this.kv.get<Deno.KvU64>(keys.cacheEpoch());
    this.checkedAt = performance.now();
    const value = entry.value?.value ?? 0n;
    if (this.seen !== null && value !== this.seen) this.invalidate();
    this.seen = value;
  }
}
