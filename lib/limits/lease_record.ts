/**
 * What a lease and a process's heartbeat hold in KV, and the arithmetic on the held sums: shared
 * by the Ledger (admission.ts), its liveness (liveness.ts) and the read model (status.ts).
 */
import { keys, u64 } from "../core/kv.ts";
import { utcDay, utcMonth } from "../core/utc.ts";

/** What a lease key holds: enough to charge the request if its process dies. */
export interface LeaseRecord {
  userId: string;
  model: string;
  /** Reserved against the daily token quota and the monthly budget. */
  tokens: number;
  nano: number;
  /** The prompt estimate, and the completion relayed by the last renewal. */
  prompt: number;
  completion: number;
  /** Admitted at (ms since the epoch). */
  at: number;
  /** The connected app's key it came with; absent for the default key. */
  keyId?: string;
  /** The model whose upstream slot it holds (UPSTREAM_CONCURRENCY), once it has one. */
  slot?: string;
  /** The pool key (its id) that slot is on. */
  slotKey?: string;
  /**
   * Admitted to wait for an upstream slot: until `slot` is set the upstream has not seen it, so a
   * reaper charges it nothing and gives the request back to the user's limits.
   */
  waitsForSlot?: true;
}

/** A process's heartbeat: it is presumed dead after `exp` (ms since the epoch). */
export interface Heartbeat {
  exp: number;
}

/** What a user's requests in flight hold: slots, reserved tokens, reserved nano-USD. */
export interface Held {
  count: number;
  tokens: number;
  nano: number;
}

export const HELD_FIELDS = ["count", "tokens", "nano"] as const;

/** 2^64: adding 2^64 − n to a KvU64 sum subtracts n (KV sums wrap around). */
const WRAP = 1n << 64n;

/** A signed amount as a KvU64 sum operand (KV sums wrap around at 2^64). */
export function signed(n: number | bigint): bigint {
  const v = BigInt(n);
  return v >= 0n ? v : WRAP + v;
}

/**
 * A held sum as read. Held sums go up and down; one that went below zero (a bug, or a lease
 * given back twice) wraps around in KvU64, and would then refuse the user for good: it counts
 * as nothing held instead.
 */
export function heldSum(value: unknown): number {
  if (value instanceof Deno.KvU64 && value.value >= 1n << 63n) return 0;
  return u64(value);
}

/** Adds the held-sum changes per user to a commit. */
export function sumHeld(op: Deno.AtomicOperation, held: Map<string, Held>) {
  for (const [userId, d] of held) {
    for (const f of HELD_FIELDS) if (d[f]) op.sum(keys.leaseHeld(userId, f), signed(d[f]));
  }
}

/**
 * Whether a request not served is given back to the request limits: only on the UTC day it was
 * admitted. Given back after midnight it would come off the new day's count, which it was never
 * part of (and the minute it took is long over).
 */
export function refundable(r: LeaseRecord, now: number): boolean {
  return utcDay(r.at) === utcDay(now);
}

/** The counters of what a user was charged this UTC day (tokens) and month (nano-USD). */
export const usedKeys = (userId: string, now: number): Deno.KvKey[] => [
  keys.tokensByDay(userId, utcDay(now)),
  keys.spendByMonth(userId, utcMonth(now)),
];

/**
 * The counters a slot is counted in, to give it back: the model's, its user's, and its pool
 * key's (when it records one).
 */
export function slotCounters(model: string, userId: string, keyId?: string): Deno.KvKey[] {
  const counters: Deno.KvKey[] = [keys.upstreamHeld(model), keys.upstreamUserHeld(model, userId)];
  if (keyId) counters.push(keys.upstreamKeyHeld(model, keyId));
  return counters;
}
