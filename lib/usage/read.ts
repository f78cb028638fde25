/**
 * Reading the usage counters back: the one decoder of the day-major counters
 * (`keys.usageDaily(day, user, model, field)`, KvU64 sums written by record.ts), as rows of one
 * user and model each.
 */
import { keys, u64 } from "../core/kv.ts";
import { addDays, type Day } from "../core/utc.ts";

/** A list page: KV Connect's largest. */
const KV_BATCH = 1000;

/** One user's usage of one model over some span (a day's counters, or a sum of them). */
export interface UsageRow {
  userId: string;
  model: string;
  requests: number;
  promptTokens: number;
  completionTokens: number;
  /** Of the prompt tokens, those served from the upstream's cache (priced as cached input). */
  cachedTokens?: number;
}

/** Reads a day's live day-major counters (or one user's), one row per user and model. */
export async function readDayCounters(
  kv: Deno.Kv,
  day: Day,
  userId?: string,
): Promise<UsageRow[]> {
  const prefix = userId === undefined ? keys.usageDailyDay(day) : [
    ...keys.usageDailyDay(day),
    userId,
  ];
  const rows: UsageRow[] = [];
  let row: UsageRow | undefined;
  // Keys sort by user, then model, then field: a row's three counters arrive together.
  for await (const entry of kv.list({ prefix }, { batchSize: KV_BATCH })) {
    const [, , user, model, field] = entry.key;
    if (typeof user !== "string" || typeof model !== "string") continue;
    if (!row || row.userId !== user || row.model !== model) {
      row = { userId: user, model, requests: 0, promptTokens: 0, completionTokens: 0 };
      rows.push(row);
    }
    addCounter(row, field, u64(entry.value));
  }
  return rows;
}

/** Adds one counter's value to a row, by its key's field part. */
function addCounter(row: Omit<UsageRow, "userId" | "model">, field: unknown, n: number) {
  if (field === "requests") row.requests += n;
  else if (field === "prompt") row.promptTokens += n;
  else if (field === "completion") row.completionTokens += n;
  else if (field === "cached") row.cachedTokens = (row.cachedTokens ?? 0) + n;
}

/** One user's counters of one model and key on one day. */
export interface KeyModelCounters {
  /** null: counted before the counters had a key part (`keys.usageByKey` has their keys). */
  keyId: string | null;
  model: string;
  requests: number;
  promptTokens: number;
  completionTokens: number;
  cachedTokens: number;
}

/** One user's counters of a day, one row per model and key. */
export async function readUserDay(
  kv: Deno.Kv,
  day: Day,
  userId: string,
): Promise<KeyModelCounters[]> {
  const rows = new Map<string, KeyModelCounters>();
  const prefix = [...keys.usageDailyDay(day), userId];
  for await (const entry of kv.list({ prefix }, { batchSize: KV_BATCH })) {
    const [, , , model, field, key] = entry.key;
    if (typeof model !== "string") continue;
    const keyId = typeof key === "string" ? key : null;
    const id = `${keyId}\u0000${model}`;
    let row = rows.get(id);
    if (!row) {
      row = { keyId, model, requests: 0, promptTokens: 0, completionTokens: 0, cachedTokens: 0 };
      rows.set(id, row);
    }
    addCounter(row, field, u64(entry.value));
  }
  return [...rows.values()];
}

/**
 * One user's counters per day from `from` to `to` (inclusive; days without any are left out):
 * one short range list per day over the day-major keys, never a scan of other users.
 */
export async function readUserDays(
  kv: Deno.Kv,
  userId: string,
  from: Day,
  to: Day,
): Promise<Map<Day, KeyModelCounters[]>> {
  const days: Day[] = [];
  for (let day = from; day <= to; day = addDays(day, 1)) days.push(day);
  const out = new Map<Day, KeyModelCounters[]>();
  const readDay = async (day: Day) => {
    const rows = await readUserDay(kv, day, userId);
    if (rows.length) out.set(day, rows);
  };
  // A few days in flight at once: the reads overlap (a remote KV's round trips most of all).
  for (let i = 0; i < days.length; i += 10) await Promise.all(days.slice(i, i + 10).map(readDay));
  return out;
}
