/**
 * What a request used and the KV sums it adds: a leaf, so the Ledger (lib/limits) and the
 * readers (lib/usage/usage.ts) both import it without importing each other.
 */
import { systemClock } from "../core/clock.ts";
import { keys, USAGE_FIELDS } from "../core/kv.ts";
import { costNanoUsd, type Pricing } from "./pricing.ts";
import { utcDay, utcMonth } from "../core/utc.ts";
import { DEFAULT_KEY_ID } from "../identity/user_record.ts";

/** Tokens an answer used, as the upstream metered them. */
export interface TokenUsage {
  promptTokens: number;
  completionTokens: number;
  /** Of the prompt tokens, those the upstream served from its cache (priced as cached input). */
  cachedTokens?: number;
}

export interface UsageEvent {
  userId: string;
  model: string;
  promptTokens: number;
  completionTokens: number;
  /** Of the prompt tokens, those served from the upstream's cache. */
  cachedTokens?: number;
  /** When the request happened (ms since epoch); default now. */
  at?: number;
  /** Count a request (default 1; 0 adds tokens to a request already counted). */
  requests?: number;
  /** The key it came with: "default" (the default) or a connected app's `k_…` id. */
  keyId?: string;
}

const big = (n: number) => new Deno.KvU64(BigInt(Math.max(0, Math.floor(n))));

/**
 * Sum mutations by key (events of one user, day and model share keys); `max` entries are KV
 * `max` mutations instead (a key's last use).
 */
export type UsageSums = Map<string, { key: Deno.KvKey; n: bigint; max?: true }>;

/** 2^64: KvU64 sums wrap around, so adding 2^64 − n subtracts n. */
const WRAP = 1n << 64n;

/** Adds the sums (and maxima) to a commit: mutations only, never a check. */
export function applySums(op: Deno.AtomicOperation, sums: UsageSums) {
  for (const { key, n, max } of sums.values()) {
    if (max) op.max(key, n);
    else op.sum(key, n >= 0n ? n : WRAP + n);
  }
}

/** Keeps the largest `n` for one key (a KV `max` mutation). */
export function addMax(into: UsageSums, key: Deno.KvKey, n: number) {
  const id = key.join("\u0000");
  const v = BigInt(Math.max(0, Math.floor(n)));
  const found = into.get(id);
  if (found) found.n = found.n > v ? found.n : v;
  else into.set(id, { key, n: v, max: true });
}

/** Adds `n` (may be negative) to one key's sum in `into`; zero amounts are left out. */
export function addSum(into: UsageSums, key: Deno.KvKey, n: bigint | number) {
  const v = BigInt(n);
  if (v === 0n) return;
  const id = key.join("\u0000");
  const found = into.get(id);
  if (found) found.n += v;
  else into.set(id, { key, n: v });
}

/**
 * Adds one event's sums to `into` (8 keys per event at most; zero amounts are left out): the
 * counters by model and key, the quota counters and the key's last use.
 */
export function addUsageSums(into: UsageSums, pricing: Pricing, e: UsageEvent) {
  const at = e.at ?? systemClock();
  const day = utcDay(at);
  const keyId = e.keyId ?? DEFAULT_KEY_ID;
  const cached = Math.min(e.cachedTokens ?? 0, e.promptTokens);
  const values = {
    requests: big(e.requests ?? 1).value,
    prompt: big(e.promptTokens).value,
    completion: big(e.completionTokens).value,
    cached: big(cached).value,
  };
  for (const field of USAGE_FIELDS) {
    addSum(into, keys.usageDaily(day, e.userId, e.model, field, keyId), values[field]);
  }
  addSum(into, keys.tokensByDay(e.userId, day), values.prompt + values.completion);
  const nano = costNanoUsd(pricing, e.model, e.promptTokens, e.completionTokens, cached);
  addSum(into, keys.spendByMonth(e.userId, utcMonth(at)), nano);
  addSum(into, keys.usageDayVersion(day), 1n);
  addMax(into, keys.keyLastUsed(e.userId, keyId), at);
}
