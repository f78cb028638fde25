/** Operator views over all users. */
import { keys, u64, type UsageField } from "./kv.ts";
import { costUsd, type Pricing } from "./pricing.ts";

export interface UserTotals {
  requests: number;
  totalTokens: number;
  costUsd: number;
}

/** Per-user totals over UTC days [from, to], from the day-major counters (one range list). */
export async function userTotalsBetween(
  kv: Deno.Kv,
  pricing: Pricing,
  from: string,
  to: string,
): Promise<Map<string, UserTotals>> {
  const cells = new Map<string, { model: string; userId: string } & Record<UsageField, number>>();
  const iter = kv.list<Deno.KvU64>({
    start: keys.usageDailyDay(from),
    // Every key of day `to` sorts before `to + "\0"`, and every later day after it.
    end: keys.usageDailyDay(to + "\u0000"),
  });
  for await (const { key, value } of iter) {
    const [, day, userId, model, field] = key as [string, string, string, string, UsageField];
    const id = `${day}\u0000${userId}\u0000${model}`;
    let cell = cells.get(id);
    if (!cell) cells.set(id, cell = { userId, model, requests: 0, prompt: 0, completion: 0 });
    cell[field] += u64(value);
  }
  const totals = new Map<string, UserTotals>();
  for (const cell of cells.values()) {
    const t = totals.get(cell.userId) ?? { requests: 0, totalTokens: 0, costUsd: 0 };
    t.requests += cell.requests;
    t.totalTokens += cell.prompt + cell.completion;
    t.costUsd += costUsd(pricing, cell.model, cell.prompt, cell.completion);
    totals.set(cell.userId, t);
  }
  return totals;
}
