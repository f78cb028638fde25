/**
 * What a request used and the KV sums it adds: a leaf, so the Ledger (lib/limits) and the
 * readers (lib/usage/usage.ts) both import it without importing each other.
 */
import { systemClock } from "../core/clock.ts";
import { keys, USAGE_FIELDS } from "../core/kv.ts";
import { costNanoUsd, type Pricing } from "./pricing.ts";
import { utcDay, utcMonth } from "../core/utc.ts";

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
}

const big = (n: number) => new Deno.KvU64(BigInt(Math.max(0, Math.floor(n))));

/** Sum mutations by key (events of one user, day and model share keys). */
export type UsageSums = Map<string, { key: Deno.KvKey; n: bigint }>;

/** Adds `n` (may be negative) to one key's sum in `into`; zero amounts are left out. */
export function addSum(into: UsageSums, key: Deno.KvKey, n: bigint | number) {
  const v = BigInt(n);
  if (v === 0n) return;
  const id = key.join("\u0000");
  const found = into.get(id);
  if (found) found.n += v;
  else into.set(id, { key, n: v });
}

/** Adds one event's sums to `into` (7 keys per event at most; zero amounts are left out). */
export function addUsageSums(into: UsageSums, pricing: Pricing, e: UsageEvent) {
  const at = e.at ?? systemClock();
  const day = utcDay(at);
  const add = (key: Deno.KvKey, n: bigint) => addSum(into, key, n);
  const cached = Math.min(e.cachedTokens ?? 0, e.promptTokens);
  const values = {
    requests: big(e.requests ?? 1).value,
    prompt: big(e.promptTokens).value,
    completion: big(e.completionTokens).value,
    cached: big(cached).value,
  };
  for (const field of USAGE_FIELDS) {
    add(keys.usageDaily(day, e.userId, e.model, field), values[field]);
  }
  add(keys.tokensByDay(e.userId, day), values.prompt + values.completion);
  add(
    keys.spendByMonth(e.userId, utcMonth(at)),
    costNanoUsd(pricing, e.model, e.promptTokens, e.completionTokens, cached),
  );
  add(keys.usageDayVersion(day), 1n);
}
