/**
 * Usage per key (CONTRACT §5 Keys, Usage `byKey`): the day counters carry the key they were used
 * with (`keys.usageDaily`), and each key's last use is `keys.keyLastUsed`, a KV `max` of the
 * settle time — so the hot path writes no extra entry or commit for either.
 */
import { keys, u64 } from "../core/kv.ts";
import { systemClock } from "../core/clock.ts";
import { addDays, type Day, utcDay } from "../core/utc.ts";
import { costNanoUsd, type Pricing, roundUsd } from "./pricing.ts";
import { type KeyModelCounters, readUserDays } from "./read.ts";
import { DEFAULT_KEY_ID, type UserRecord } from "../identity/user_record.ts";

/** What one key used over some days. */
export interface KeyUsage {
  requests: number;
  totalTokens: number;
  costUsd: number;
}

/** One key as GET /api/keys lists it (never its secret). */
export interface KeyListing {
  id: string;
  name: string;
  /** The client's name as it gave it (null for the default key). */
  client: string | null;
  keyPrefix: string;
  default: boolean;
  createdAt: string;
  lastUsedAt: string | null;
  usage30d: KeyUsage;
}

/** One row of GET /api/usage `byKey`. */
export interface KeyUsageRow extends KeyUsage {
  keyId: string;
  name: string;
}

/** The default key's name where keys are listed. */
export const DEFAULT_KEY_NAME = "Default key";

const empty = (): KeyUsage & { nano: number } => ({
  requests: 0,
  totalTokens: 0,
  costUsd: 0,
  nano: 0,
});

/**
 * Usage per key id over the `days` UTC days up to and including today: the day counters per key
 * (read.ts), priced as the totals are, so the keys' rows add up to them; plus what was counted
 * per key before the day counters had a key part (`keys.usageByKey`, as charged).
 */
export async function usageByKey(
  kv: Deno.Kv,
  pricing: Pricing,
  userId: string,
  days: number,
  now: number = systemClock(),
  /** The span's counters, when the caller read them already (read.ts readUserDays). */
  counters?: Map<Day, KeyModelCounters[]>,
): Promise<Map<string, KeyUsage>> {
  const today = utcDay(now);
  const from: Day = addDays(today, -(days - 1));
  const sums = new Map<string, KeyUsage & { nano: number }>();
  const sumOf = (keyId: string) => {
    let sum = sums.get(keyId);
    if (!sum) sums.set(keyId, sum = empty());
    return sum;
  };
  for (const rows of (counters ?? await readUserDays(kv, userId, from, today)).values()) {
    for (const row of rows) {
      if (row.keyId === null) continue; // counted in `keys.usageByKey`, read below
      const sum = sumOf(row.keyId);
      sum.requests += row.requests;
      sum.totalTokens += row.promptTokens + row.completionTokens;
      sum.nano += Number(
        costNanoUsd(pricing, row.model, row.promptTokens, row.completionTokens, row.cachedTokens),
      );
    }
  }
  const iter = kv.list({
    start: keys.usageByKeyDay(userId, from),
    end: keys.usageByKeyDay(userId, addDays(today, 1)),
  }, { batchSize: 1000 });
  for await (const entry of iter) {
    const [, , , keyId, field] = entry.key;
    if (typeof keyId !== "string") continue;
    const sum = sumOf(keyId);
    const n = u64(entry.value);
    if (field === "requests") sum.requests += n;
    else if (field === "tokens") sum.totalTokens += n;
    else if (field === "nano") sum.nano += n;
  }
  const out = new Map<string, KeyUsage>();
  for (const [id, { nano, ...sum }] of sums) out.set(id, { ...sum, costUsd: roundUsd(nano / 1e9) });
  return out;
}

/** When each of the user's keys last settled a request (ms), by key id. */
export async function lastUsedByKey(kv: Deno.Kv, userId: string): Promise<Map<string, number>> {
  const out = new Map<string, number>();
  for await (const entry of kv.list({ prefix: keys.keyLastUseds(userId) }, { batchSize: 1000 })) {
    const keyId = entry.key[2];
    if (typeof keyId === "string") out.set(keyId, u64(entry.value));
  }
  return out;
}

/**
 * A request in flight while its app key was revoked settles after the revocation and writes the
 * key's last use again (a `max` cannot be told not to): such entries of keys known to be revoked
 * are dropped when the keys are next listed.
 */
async function dropRevokedLastUses(kv: Deno.Kv, user: UserRecord, lastUsed: Map<string, number>) {
  const held = new Set([DEFAULT_KEY_ID, ...(user.apps ?? []).map((a) => a.id)]);
  const unknown = [...lastUsed.keys()].filter((id) => !held.has(id));
  if (!unknown.length) return;
  const revoked = await revokedKeyNames(kv, user.id);
  for (const id of unknown.filter((id) => revoked.has(id))) {
    lastUsed.delete(id);
    await kv.delete(keys.keyLastUsed(user.id, id)).catch(() => {}); // tried again next listing
  }
}

/** The user's keys, default first, then connected apps oldest first, with their usage. */
export async function listKeys(
  kv: Deno.Kv,
  pricing: Pricing,
  user: UserRecord,
  now: number = systemClock(),
): Promise<KeyListing[]> {
  const [usage, lastUsed] = await Promise.all([
    usageByKey(kv, pricing, user.id, 30, now),
    lastUsedByKey(kv, user.id),
  ]);
  await dropRevokedLastUses(kv, user, lastUsed);
  const of = (id: string) => ({
    lastUsedAt: lastUsed.has(id) ? new Date(lastUsed.get(id)!).toISOString() : null,
    usage30d: usage.get(id) ?? { requests: 0, totalTokens: 0, costUsd: 0 },
  });
  const list: KeyListing[] = [];
  if (user.key) {
    list.push({
      id: DEFAULT_KEY_ID,
      name: DEFAULT_KEY_NAME,
      client: null,
      keyPrefix: user.key.prefix,
      default: true,
      createdAt: user.key.createdAt,
      ...of(DEFAULT_KEY_ID),
    });
  }
  for (const app of user.apps ?? []) {
    list.push({
      id: app.id,
      name: app.name,
      client: app.client ?? app.name,
      keyPrefix: app.prefix,
      default: false,
      createdAt: app.createdAt,
      ...of(app.id),
    });
  }
  return list;
}

/**
 * GET /api/usage `byKey`: every key the user holds (used or not), then revoked keys that were
 * used in the span, named by what is kept of them; the rows add up to the user's totals.
 */
export async function byKeyRows(
  kv: Deno.Kv,
  pricing: Pricing,
  user: UserRecord | null,
  userId: string,
  days: number,
  now: number = systemClock(),
  counters?: Map<Day, KeyModelCounters[]>,
): Promise<KeyUsageRow[]> {
  const usage = await usageByKey(kv, pricing, userId, days, now, counters);
  const zero = { requests: 0, totalTokens: 0, costUsd: 0 };
  const rows: KeyUsageRow[] = [];
  const seen = new Set<string>();
  const add = (keyId: string, name: string) => {
    seen.add(keyId);
    rows.push({ keyId, name, ...(usage.get(keyId) ?? zero) });
  };
  if (user?.key || usage.has(DEFAULT_KEY_ID)) add(DEFAULT_KEY_ID, DEFAULT_KEY_NAME);
  for (const app of user?.apps ?? []) add(app.id, app.name);
  const rest = [...usage.keys()].filter((id) => !seen.has(id));
  if (rest.length) {
    const names = await revokedKeyNames(kv, userId);
    for (const id of rest) add(id, `${names.get(id) ?? "A key"} (revoked)`);
  }
  return rows;
}

/** Names of the user's revoked app keys by id, kept so their past usage keeps a name. */
async function revokedKeyNames(kv: Deno.Kv, userId: string): Promise<Map<string, string>> {
  const out = new Map<string, string>();
  const iter = kv.list<{ name: string }>({ prefix: keys.revokedKeys(userId) }, { limit: 1000 });
  for await (const e of iter) if (typeof e.key[2] === "string") out.set(e.key[2], e.value.name);
  return out;
}
