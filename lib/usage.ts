/** Usage metering: KV sum counters per user, UTC day and model (never conflict, never lose). */
import { keys, u64, USAGE_FIELDS, utcDay, utcMonth } from "./kv.ts";
import { costNanoUsd, type Pricing } from "./pricing.ts";

export interface UsageEvent {
  userId: string;
  model: string;
  promptTokens: number;
  completionTokens: number;
  /** When the request happened (ms since epoch); default now. */
  at?: number;
  /** Count a request (default 1; 0 adds tokens to a request already counted). */
  requests?: number;
}

export interface UsageTotals {
  requests: number;
  promptTokens: number;
  completionTokens: number;
  totalTokens: number;
  costUsd: number;
}

const big = (n: number) => new Deno.KvU64(BigInt(Math.max(0, Math.floor(n))));

/** Records one request's usage in a single atomic commit of sum mutations. */
export async function recordUsage(kv: Deno.Kv, pricing: Pricing, e: UsageEvent): Promise<void> {
  const at = e.at ?? Date.now();
  const day = utcDay(at);
  const values = {
    requests: e.requests ?? 1,
    prompt: e.promptTokens,
    completion: e.completionTokens,
  };
  const op = kv.atomic();
  for (const field of USAGE_FIELDS) {
    op.sum(keys.usageDaily(day, e.userId, e.model, field), big(values[field]).value);
    op.sum(keys.usageByUser(e.userId, day, e.model, field), big(values[field]).value);
  }
  op.sum(keys.tokensByDay(e.userId, day), big(e.promptTokens + e.completionTokens).value);
  op.sum(
    keys.spendByMonth(e.userId, utcMonth(at)),
    costNanoUsd(pricing, e.model, e.promptTokens, e.completionTokens),
  );
  op.sum(keys.usageDayVersion(day), 1n);
  const res = await op.commit();
  if (!res.ok) throw new Error("usage commit failed");
}

export { u64 };
