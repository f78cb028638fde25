/**
 * Daily cost summaries (CONTRACT §7): the job the cron runs condenses a day's day-major usage
 * counters into a few chunked KV entries, so reports over many users and days stay fast.
 *
 * A summary belongs to the day version it saw (`["usage_day_versions", day]` grows with every
 * usage write). Chunks are keyed by that version and the meta entry switches to a new version in
 * one atomic commit, so a reader sees either the old complete summary or the new one, never half.
 * A summary is only trusted while its version equals the day's version; otherwise readers fall
 * back to the live counters, and the next run summarizes the day again.
 */
import type { Config } from "../core/config.ts";
import { systemClock } from "../core/clock.ts";
import { CONFLICT, isTransientKvError, keys, retryAtomic, u64 } from "../core/kv.ts";
import { getManyChunked, retry } from "../core/kv_ops.ts";
import type { Logger } from "../core/log.ts";
import { costUsd, type Pricing, roundUsd } from "../usage/pricing.ts";
import type { UserRecord } from "../identity/users.ts";
import type { Events } from "../alerts/deliver.ts";
import { readDayCounters, type UsageRow } from "../usage/read.ts";
export { readDayCounters, type UsageRow };
import { BUDGET_THRESHOLDS, checkBudget } from "./budget_alerts.ts";
import type { Day, Month } from "../core/utc.ts";

/** One user's use of one model on one day. */

/** The meta entry of a day's summary: which version it covers and how many chunks hold it. */
export interface SummaryMeta {
  day: Day;
  version: number;
  chunks: number;
  users: number;
  rows: number;
  requests: number;
  promptTokens: number;
  completionTokens: number;
  /** From the pricing table in force when summarized; reports price tokens with today's table. */
  costUsd: number;
  summarizedAt: string;
}

/**
 * [userId, model, requests, promptTokens, completionTokens, costUsd, cachedTokens?] — compact to
 * fit 64 KiB (summaries written before cached prices have no seventh element).
 */
export type SummaryRow = [string, string, number, number, number, number, number?];

export interface SummaryChunk {
  rows: SummaryRow[];
}

/** A chunk holds at most this many users… */
export const CHUNK_MAX_USERS = 300;
/** …and stays under the 64 KiB KV value limit even with long ids and model names. */
const CHUNK_MAX_BYTES = 56_000;
export { BUDGET_THRESHOLDS };

const KV_BATCH = 1000;

/**
 * A day's usage from its summary when the summary is complete and covers `version` exactly;
 * null when the caller must read the live counters instead.
 */
export async function readDaySummary(
  kv: Deno.Kv,
  day: Day,
  version: number,
  meta?: SummaryMeta | null,
): Promise<UsageRow[] | null> {
  const m = meta === undefined
    ? (await kv.get<SummaryMeta>(keys.costSummaryMeta(day))).value
    : meta;
  if (!m || m.version !== version) return null;
  const chunkKeys = Array.from({ length: m.chunks }, (_, i) => keys.costSummary(day, version, i));
  const rows: UsageRow[] = [];
  for (const entry of await getManyChunked<SummaryChunk>(kv, chunkKeys)) {
    // A concurrent newer summary may have cleaned this one up: the live counters still answer.
    if (!entry.value || !Array.isArray(entry.value.rows)) return null;
    for (const row of entry.value.rows) {
      const [userId, model, requests, promptTokens, completionTokens, , cachedTokens] = row;
      rows.push({ userId, model, requests, promptTokens, completionTokens, cachedTokens });
    }
  }
  return rows;
}

/** Splits rows into chunks of at most CHUNK_MAX_USERS users and CHUNK_MAX_BYTES (estimated). */
export function chunkRows(rows: SummaryRow[]): SummaryChunk[] {
  const chunks: SummaryChunk[] = [];
  let current: SummaryRow[] = [];
  let users = 0;
  let bytes = 0;
  let lastUser: string | undefined;
  for (const row of rows) {
    // V8 serializes a string in at most 2 bytes per UTF-16 unit; six numbers and tags fit in 48.
    const size = 2 * (row[0].length + row[1].length) + 48;
    const newUser = row[0] !== lastUser;
    if (
      current.length && ((newUser && users >= CHUNK_MAX_USERS) || bytes + size > CHUNK_MAX_BYTES)
    ) {
      chunks.push({ rows: current });
      current = [];
      users = 0;
      bytes = 0;
      lastUser = undefined;
    }
    if (row[0] !== lastUser) users++;
    lastUser = row[0];
    current.push(row);
    bytes += size;
  }
  if (current.length) chunks.push({ rows: current });
  return chunks;
}

export interface SummarizedDay {
  day: Day;
  version: number;
  users: number;
  requests: number;
  totalTokens: number;
  costUsd: number;
  chunks: number;
  /** False when a concurrent run switched the meta first (its summary is the same or newer). */
  written: boolean;
}

export interface BudgetAlert {
  userId: string;
  month: Month;
  threshold: number;
  spendUsd: number;
  budgetUsd: number;
}

export interface SummarizeResult {
  days: SummarizedDay[];
  /** Days whose summary was already current. */
  upToDate: number;
  alerts: BudgetAlert[];
  ms: number;
}

/** What the job needs from Config (a Config will do). */
export interface SummaryConfig {
  pricing: Pricing;
  limits: Pick<Config["limits"], "budgetUsdMonthly">;
}

export interface SummarizeOptions {
  now?: number;
  log?: Logger;
  /**
   * Sends budget.threshold events (the app's services pass theirs). Without it the alerts are
   * only logged; either way each is claimed once per user, month and threshold.
   */
  events?: Events;
  /** Called per day, for CLI progress. */
  onProgress?: (p: { day: Day; index: number; total: number }) => void;
}

/**
 * The cost-summary job: summarizes every day whose usage version is newer than its summary and
 * logs budget alerts (80 % and 100 %, once per user and month). Idempotent and safe to run
 * concurrently in several processes.
 */
export async function summarizeCosts(
  kv: Deno.Kv,
  config: SummaryConfig,
  options: SummarizeOptions = {},
): Promise<SummarizeResult> {
  const started = performance.now();
  const now = options.now ?? systemClock();
  const versions: { day: Day; version: number }[] = [];
  for await (const entry of kv.list({ prefix: keys.usageDayVersions() }, { batchSize: KV_BATCH })) {
    const day = entry.key[1];
    if (typeof day === "string") versions.push({ day, version: u64(entry.value) });
  }
  const metas = await getManyChunked<SummaryMeta>(
    kv,
    versions.map((v) => keys.costSummaryMeta(v.day)),
  );
  const stale = versions.filter((v, j) => (metas[j].value?.version ?? -1) < v.version);
  const days: SummarizedDay[] = [];
  const alerts: BudgetAlert[] = [];
  const checked = new Set<string>();
  for (const [index, { day, version }] of stale.entries()) {
    options.onProgress?.({ day, index, total: stale.length });
    const rows = await readDayCounters(kv, day);
    // Alerts before the meta switch: a crash in between means the next run checks again.
    const month = day.slice(0, 7);
    const toCheck = [...new Set(rows.map((r) => r.userId))].filter((u) =>
      !checked.has(`${u}\u0000${month}`)
    );
    toCheck.forEach((u) => checked.add(`${u}\u0000${month}`));
    alerts.push(
      ...await checkBudgets(kv, config, toCheck, month, now, options.log, options.events),
    );
    days.push(await writeDaySummary(kv, config.pricing, day, version, rows, now));
  }
  return {
    days,
    upToDate: versions.length - stale.length,
    alerts,
    ms: performance.now() - started,
  };
}

/** Writes a day's summary for `version` and switches the meta to it unless a newer one won. */
async function writeDaySummary(
  kv: Deno.Kv,
  pricing: Pricing,
  day: Day,
  version: number,
  rows: UsageRow[],
  now: number,
): Promise<SummarizedDay> {
  const summaryRows: SummaryRow[] = rows.map((r) => {
    const row: SummaryRow = [
      r.userId,
      r.model,
      r.requests,
      r.promptTokens,
      r.completionTokens,
      roundUsd(costUsd(pricing, r.model, r.promptTokens, r.completionTokens, r.cachedTokens)),
    ];
    if (r.cachedTokens) row.push(r.cachedTokens);
    return row;
  });
  const chunks = chunkRows(summaryRows);
  // Chunks of one version hold the same rows whoever writes them (unless the day changed
  // meanwhile, and then the version moved on and this summary is never trusted).
  for (let i = 0; i < chunks.length; i += 8) {
    const op = kv.atomic();
    chunks.slice(i, i + 8).forEach((chunk, j) =>
      op.set(keys.costSummary(day, version, i + j), chunk)
    );
    if (!(await commit(op)).ok) throw new Error(`cost summary ${day}: chunk write failed`);
  }
  const meta: SummaryMeta = {
    day,
    version,
    chunks: chunks.length,
    users: new Set(rows.map((r) => r.userId)).size,
    rows: rows.length,
    requests: sum(rows, (r) => r.requests),
    promptTokens: sum(rows, (r) => r.promptTokens),
    completionTokens: sum(rows, (r) => r.completionTokens),
    costUsd: roundUsd(sum(summaryRows, (r) => r[5])),
    summarizedAt: new Date(now).toISOString(),
  };
  const written = await retryAtomic(async () => {
    const current = await kv.get<SummaryMeta>(keys.costSummaryMeta(day));
    if (current.value && current.value.version >= version) return false;
    const res = await commit(kv.atomic().check(current).set(keys.costSummaryMeta(day), meta));
    return res.ok ? true : CONFLICT;
  }, `cost summary ${day}`);
  await dropOlderChunks(kv, day);
  return {
    day,
    version,
    users: meta.users,
    requests: meta.requests,
    totalTokens: meta.promptTokens + meta.completionTokens,
    costUsd: meta.costUsd,
    chunks: meta.chunks,
    written,
  };
}

/**
 * Deletes chunks of versions older than the day's current meta. Newer versions are left alone:
 * a concurrent run may be writing them before it switches the meta.
 */
async function dropOlderChunks(kv: Deno.Kv, day: Day): Promise<void> {
  const meta = (await kv.get<SummaryMeta>(keys.costSummaryMeta(day))).value;
  if (!meta) return;
  const old: Deno.KvKey[] = [];
  for await (const entry of kv.list({ prefix: keys.costSummaryDay(day) }, { batchSize: 100 })) {
    const version = entry.key[2];
    if (typeof version === "number" && version < meta.version) old.push(entry.key);
  }
  for (let i = 0; i < old.length; i += 500) {
    const op = kv.atomic();
    old.slice(i, i + 500).forEach((key) => op.delete(key));
    await commit(op);
  }
}

/**
 * Logs, once per user, month and threshold, a user whose month's spend passed 80 % / 100 % of
 * their budget. The alert key's null-check makes it once across processes too.
 */
async function checkBudgets(
  kv: Deno.Kv,
  config: Pick<SummaryConfig, "limits">,
  userIds: string[],
  month: Month,
  now: number,
  log?: Logger,
  events?: Events,
): Promise<BudgetAlert[]> {
  const alerts: BudgetAlert[] = [];
  const spends = await getManyChunked<Deno.KvU64>(
    kv,
    userIds.map((u) => keys.spendByMonth(u, month)),
  );
  const spenders = userIds
    .map((userId, j) => ({ userId, spendUsd: u64(spends[j].value) / 1e9 }))
    .filter((s) => s.spendUsd > 0);
  const records = await getManyChunked<UserRecord>(kv, spenders.map((s) => keys.user(s.userId)));
  for (const [j, { userId, spendUsd }] of spenders.entries()) {
    const user = records[j].value;
    if (user?.status === "deleted") continue;
    const budgetUsd = user?.limits?.budgetUsdMonthly ?? config.limits.budgetUsdMonthly;
    if (!(budgetUsd > 0)) continue;
    if (events) {
      // The same claim the gateway's settlements make: whichever sees the spend first sends.
      for (
        const threshold of await checkBudget(events, { id: userId }, spendUsd, budgetUsd, month)
      ) {
        alerts.push({ userId, month, threshold, spendUsd: roundUsd(spendUsd), budgetUsd });
      }
      continue;
    }
    for (const threshold of BUDGET_THRESHOLDS) {
      if (spendUsd < (budgetUsd * threshold) / 100) continue;
      const key = keys.budgetAlert(userId, month, threshold);
      const alert: BudgetAlert = {
        userId,
        month,
        threshold,
        spendUsd: roundUsd(spendUsd),
        budgetUsd,
      };
      const res = await commit(
        kv.atomic()
          .check({ key, versionstamp: null })
          .set(key, { ...alert, at: new Date(now).toISOString() }),
      );
      if (!res.ok) continue; // already alerted (here or in another process)
      alerts.push(alert);
      log?.warn(`budget ${threshold}% reached`, { ...alert });
    }
  }
  return alerts;
}

/** The Deno.cron handler: runs the job and logs what it did (errors are logged, then rethrown). */
export function costSummaryJob(
  deps: { kv: Deno.Kv; config: SummaryConfig; log: Logger; events?: Events },
): () => Promise<void> {
  return async () => {
    try {
      const result = await summarizeCosts(deps.kv, deps.config, {
        log: deps.log,
        events: deps.events,
      });
      deps.log.info("cost summaries", {
        days: result.days.map((d) => d.day),
        upToDate: result.upToDate,
        alerts: result.alerts.length,
        ms: Math.round(result.ms),
      });
    } catch (err) {
      deps.log.error("cost summary job failed", { error: String(err) });
      throw err;
    }
  };
}

/**
 * Commits, retrying while a local SQLite KV file is locked by another process or handle. Unlike
 * commitOrConflict, a lock is never reported as a failed check: here a failed null-check must
 * mean "another run got there first", or an alert would be lost.
 */
function commit(op: Deno.AtomicOperation): Promise<Deno.KvCommitResult | Deno.KvCommitError> {
  return retry(() => op.commit(), {
    attempts: 50,
    baseMs: 2.5,
    capMs: 100,
    shouldRetry: isTransientKvError,
  });
}

function sum<T>(items: T[], pick: (item: T) => number): number {
  let total = 0;
  for (const item of items) total += pick(item);
  return total;
}
