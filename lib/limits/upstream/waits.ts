/**
 * How long requests waited for an upstream slot, across all processes: a histogram per five
 * minutes (`keys.upstreamWait(window, bucket)`, KvU64 sums added in the commits that take slots),
 * read as the last hour's p50 and p99 (/admin), a day kept.
 */
import { keys, u64 } from "../../core/kv.ts";

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

/** The waits' percentiles over the last hour (bucket upper bounds, ms). */
export interface WaitPercentiles {
  count: number;
  p50Ms: number | null;
  p99Ms: number | null;
}

/** Adds waits (ms) to the histogram, in a commit of the caller's. */
export function addWaits(op: Deno.AtomicOperation, waits: number[], now: number) {
  const window = Math.floor(now / WINDOW_MS);
  const counts = new Map<number, number>();
  for (const ms of waits) {
    const b = bucketOf(ms);
    counts.set(b, (counts.get(b) ?? 0) + 1);
  }
  for (const [b, n] of counts) op.sum(keys.upstreamWait(window, b), BigInt(n));
}

/** The last hour's waits; drops windows older than a day on the way. */
export async function waitPercentiles(
  kv: Deno.Kv,
  now: number,
  /** What the open-ended last bucket reads as: the longest wait allowed. */
  queueMs: number,
): Promise<WaitPercentiles> {
  const last = Math.floor(now / WINDOW_MS);
  await sweepWaits(kv, last - 12 * 24);
  const counts = new Array(WAIT_BOUNDS_MS.length + 1).fill(0);
  for await (
    const e of kv.list({
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
      if (seen >= p * count) return WAIT_BOUNDS_MS[b] ?? queueMs;
    }
    return null;
  };
  return { count, p50Ms: pct(0.5), p99Ms: pct(0.99) };
}

/** Drops histogram windows older than `before`, a bounded number per call. */
async function sweepWaits(kv: Deno.Kv, before: number) {
  const op = kv.atomic();
  let n = 0;
  for await (
    const e of kv.list({ start: keys.upstreamWaits(0), end: keys.upstreamWaits(before) }, {
      limit: 500,
    })
  ) {
    op.delete(e.key);
    n++;
  }
  if (n) await op.commit().catch(() => {});
}

/** The histogram bucket of a wait: the first bound it does not exceed. */
export function bucketOf(ms: number): number {
  const i = WAIT_BOUNDS_MS.findIndex((b) => ms <= b);
  return i === -1 ? WAIT_BOUNDS_MS.length : i;
}
