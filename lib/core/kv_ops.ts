/**
 * What every KV caller needs and should not write again: KV Connect's limits, getMany beyond
 * ten keys, the one retry/back-off policy, and a bounded cache that evicts one entry at a time.
 */

/** KV Connect's limits (CONTRACT §8). */
export const KV_MAX_CHECKS = 10;
export const KV_MAX_MUTATIONS = 1000;
export const KV_GET_MANY_MAX = 10;

/**
 * getMany for any number of keys: calls of at most 10 keys, all in parallel, results in key
 * order. Each call is its own snapshot: entries of different calls may come from different
 * moments.
 */
export async function getManyChunked<T = unknown>(
  kv: Deno.Kv,
  keys: readonly Deno.KvKey[],
): Promise<Deno.KvEntryMaybe<T>[]> {
  if (keys.length <= KV_GET_MANY_MAX) {
    return keys.length ? await kv.getMany<T[]>(keys as Deno.KvKey[]) : [];
  }
  const calls: Promise<Deno.KvEntryMaybe<T>[]>[] = [];
  for (let i = 0; i < keys.length; i += KV_GET_MANY_MAX) {
    calls.push(kv.getMany<T[]>(keys.slice(i, i + KV_GET_MANY_MAX)));
  }
  return (await Promise.all(calls)).flat();
}

/** Defaults suit KV write contention: a few milliseconds, so contenders spread without stalling. */
const BACKOFF_BASE_MS = 1;
const BACKOFF_CAP_MS = 25;

/**
 * The one retry/backoff policy: jittered exponential delay for attempt n (1-based; attempt 1 →
 * 0 ms), capped. Full jitter — uniform in [0, min(base × 2^(n−1), cap)) — so a burst of
 * contenders does not retry in lock-step.
 */
export function backoffMs(
  attempt: number,
  opts: { baseMs?: number; capMs?: number } = {},
): number {
  if (attempt <= 1) return 0;
  const { baseMs = BACKOFF_BASE_MS, capMs = BACKOFF_CAP_MS } = opts;
  return Math.random() * Math.min(baseMs * 2 ** (attempt - 1), capMs);
}

/**
 * Runs fn until it resolves or attempts run out, sleeping backoffMs between tries;
 * shouldRetry(err) false → rethrow at once. After the last attempt its error is thrown.
 */
export async function retry<T>(
  fn: (attempt: number) => Promise<T>,
  opts: {
    attempts: number;
    baseMs?: number;
    capMs?: number;
    shouldRetry?: (err: unknown) => boolean;
  },
): Promise<T> {
  const { attempts, shouldRetry = () => true } = opts;
  for (let attempt = 1;; attempt++) {
    const wait = backoffMs(attempt, opts);
    if (wait > 0) await new Promise((r) => setTimeout(r, wait));
    try {
      return await fn(attempt);
    } catch (err) {
      if (attempt >= attempts || !shouldRetry(err)) throw err;
    }
  }
}

/**
 * An LRU map bounded to `max` entries: set() on a full map evicts the least recently used entry
 * only (never clears all); get() refreshes recency. Iteration runs from least to most recent.
 */
export class BoundedMap<K, V> {
  // A Map iterates in insertion order: re-inserting on use keeps the oldest first.
  readonly #map = new Map<K, V>();
  readonly #max: number;

  constructor(max: number) {
    if (!Number.isInteger(max) || max < 1) {
      throw new RangeError(`BoundedMap: max must be a positive integer, not ${max}`);
    }
    this.#max = max;
  }

  get(k: K): V | undefined {
    if (!this.#map.has(k)) return undefined;
    const v = this.#map.get(k) as V;
    this.#map.delete(k);
    this.#map.set(k, v);
    return v;
  }

  set(k: K, v: V): this {
    if (this.#map.has(k)) this.#map.delete(k);
    else if (this.#map.size >= this.#max) {
      this.#map.delete(this.#map.keys().next().value as K);
    }
    this.#map.set(k, v);
    return this;
  }

  /** Does not refresh recency. */
  has(k: K): boolean {
    return this.#map.has(k);
  }

  delete(k: K): boolean {
    return this.#map.delete(k);
  }

  clear(): void {
    this.#map.clear();
  }

  get size(): number {
    return this.#map.size;
  }

  keys(): MapIterator<K> {
    return this.#map.keys();
  }

  values(): MapIterator<V> {
    return this.#map.values();
  }

  entries(): MapIterator<[K, V]> {
    return this.#map.entries();
  }

  [Symbol.iterator](): MapIterator<[K, V]> {
    return this.#map[Symbol.iterator]();
  }
}
