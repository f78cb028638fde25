/** Deno KV: opening the store and every key builder (one place for the key design). */
import type { Day, Month } from "./utc.ts";
import { retry } from "./kv_ops.ts";
import { withDeadline } from "./kv_deadline.ts";

/** Counters per user, day and model; "cached" is the part of "prompt" served from cache. */
export type UsageField = "requests" | "prompt" | "completion" | "cached";
export const USAGE_FIELDS: readonly UsageField[] = ["requests", "prompt", "completion", "cached"];
/** Counters per user, day and key: requests, tokens (prompt + completion), nano-USD. */
export type KeyUsageField = "requests" | "tokens" | "nano";

export const keys = {
  user: (userId: string) => ["users", userId] as const,
  users: () => ["users"] as const,
  keyByHash: (hash: string) => ["keys_by_hash", hash] as const,
  webhookEvent: (svixId: string) => ["webhook_events", svixId] as const,
  rate: (userId: string) => ["rate_limits", userId] as const,
  /** What a user's requests in flight hold (KvU64 sums): "count", "tokens", "nano" (USD 1e-9). */
  leaseHeld: (userId: string, field: "count" | "tokens" | "nano") =>
    ["lease_held", userId, field] as const,
  /** One request in flight, under the process (ledger) that admitted it. */
  lease: (procId: string, leaseId: string) => ["leases", procId, leaseId] as const,
  leasesOf: (procId: string) => ["leases", procId] as const,
  /** A ledger's heartbeat: its leases are reaped once it expires. */
  leaseProc: (procId: string) => ["lease_procs", procId] as const,
  leaseProcs: () => ["lease_procs"] as const,
  /**
   * Requests the user was given back (KvU64 sum): refusals that were not the user's doing. The
   * rate entry remembers how many it has applied (lib/limits/gcra.ts).
   */
  rateRefunds: (userId: string) => ["rate_refunds", userId] as const,
  /** Requests in flight to GLM for a model (KvU64 sum), across processes (UPSTREAM_CONCURRENCY). */
  upstreamHeld: (model: string) => ["upstream_held", model] as const,
  upstreamHelds: () => ["upstream_held"] as const,
  /** Slots of a model one pool key has in flight (KvU64 sum): UPSTREAM_CONCURRENCY is per key. */
  upstreamKeyHeld: (model: string, keyId: string) => ["upstream_key_held", model, keyId] as const,
  upstreamKeyHelds: () => ["upstream_key_held"] as const,
  /** A pool key GLM refused, left out until the entry expires (UPSTREAM_KEY_COOLDOWN_MS). */
  upstreamKeyCooldown: (keyId: string) => ["upstream_key_cooldown", keyId] as const,
  /** Requests refused because no pool key was in service, per UTC minute (KvU64 sum). */
  upstreamRefusals: (minute?: number) =>
    minute === undefined ? ["upstream_refusals"] as const : ["upstream_refusals", minute] as const,
  /** Slots of a model one user holds (KvU64 sum), for UPSTREAM_USER_SHARE. */
  upstreamUserHeld: (model: string, userId: string) =>
    ["upstream_user_held", model, userId] as const,
  /** A request waiting for an upstream slot; tickets sort by arrival. */
  upstreamTicket: (model: string, ticket: string) => ["upstream_queue", model, ticket] as const,
  upstreamTickets: (model: string) => ["upstream_queue", model] as const,
  upstreamQueue: () => ["upstream_queue"] as const,
  /**
   * Tickets ever written ("in") and taken away ("out"), all models (KvU64 sums): the difference
   * is how many requests wait, for UPSTREAM_QUEUE_MAX.
   */
  upstreamQueueCount: (end: "in" | "out") => ["upstream_queue_counts", end] as const,
  /** An upstream slot held by a call without a lease (count_tokens), renewed while it lasts. */
  upstreamHold: (model: string, holdId: string) => ["upstream_holds", model, holdId] as const,
  upstreamHolds: (model: string) => ["upstream_holds", model] as const,
  /** A user's count_tokens limits: the GCRA `tat` and the calls in flight (COUNT_TOKENS_RPM). */
  countTokens: (userId: string) => ["count_tokens", userId] as const,
  /** Upstream-slot waits per 5-minute window and bucket (KvU64 sums): queue-wait percentiles. */
  upstreamWait: (window: number, bucket: number) => ["upstream_waits", window, bucket] as const,
  upstreamWaits: (window: number) => ["upstream_waits", window] as const,
  /**
   * Usage counters (KvU64) per UTC day, user, model, field and key ("default" or a connected
   * app's `k_…`): reports, dashboards, quotas, and usage per key (priced when read, as the
   * totals are). The key comes last, so readers by model sum over keys without knowing of them;
   * counters written before there was a key part end at the field (their keys are counted in
   * `usageByKey`).
   */
  usageDaily: (day: Day, userId: string, model: string, field: UsageField, keyId: string) =>
    ["usage_daily", day, userId, model, field, keyId] as const,
  usageDailyDay: (day: Day) => ["usage_daily", day] as const,
  /**
   * Usage per user, UTC day and key (KvU64: requests, tokens, nano-USD as charged), as the settle
   * commit wrote it before `usageDaily` had a key part; only read now (for days still in a
   * listing's span), never written.
   */
  usageByKey: (userId: string, day: Day, keyId: string, field: KeyUsageField) =>
    ["usage_by_key", userId, day, keyId, field] as const,
  usageByKeyDay: (userId: string, day: Day) => ["usage_by_key", userId, day] as const,
  /** When a key last settled a request (KvU64 ms): a `max` mutation in the settle commit. */
  keyLastUsed: (userId: string, keyId: string) => ["key_last_used", userId, keyId] as const,
  keyLastUseds: (userId: string) => ["key_last_used", userId] as const,
  /** A revoked app key's name and prefix, so its past usage keeps a name (expireIn 100 days). */
  revokedKey: (userId: string, keyId: string) => ["revoked_keys", userId, keyId] as const,
  revokedKeys: (userId: string) => ["revoked_keys", userId] as const,
  /** Tokens a user spent on a UTC day (KvU64), for TOKEN_LIMIT_DAILY. */
  tokensByDay: (userId: string, day: Day) => ["tokens_by_day", userId, day] as const,
  /** Nano-USD a user spent in a UTC month (KvU64), for BUDGET_USD_MONTHLY. */
  spendByMonth: (userId: string, month: Month) => ["spend_by_month", userId, month] as const,
  /** Grows with every usage write of a day; summaries remember the version they saw. */
  usageDayVersion: (day: Day) => ["usage_day_versions", day] as const,
  usageDayVersions: () => ["usage_day_versions"] as const,
  /** Chunks are keyed by the day version they summarize, so the meta entry switches atomically. */
  costSummary: (day: Day, version: number, chunk: number) =>
    ["cost_summaries", day, version, chunk] as const,
  costSummaryDay: (day: Day) => ["cost_summaries", day] as const,
  costSummaryMeta: (day: Day) => ["cost_summary_meta", day] as const,
  /** Claimed once per user, month and percent (80, 100): the budget.threshold alert was sent. */
  budgetAlert: (userId: string, month: Month, threshold: number) =>
    ["budget_alerts", userId, month, threshold] as const,
  /** An event waiting for delivery to EVENTS_WEBHOOK_URL, keyed by when it is due (ms). */
  eventOutbox: (dueAt: number, eventId: string) => ["event_outbox", dueAt, eventId] as const,
  eventOutboxAll: () => ["event_outbox"] as const,
  /** A Clerk metadata sync waiting to run (lib/clerk/sync.ts), keyed by when it is due (ms). */
  clerkSyncOutboxAll: () => ["clerk_sync_outbox"] as const,
  /** Claimed once per alert type, subject and clock hour (expires): the alert was sent. */
  alertSent: (type: string, subject: string, hour: number) =>
    ["alerts_sent", type, subject, hour] as const,
  /** Alerts of the last 24 h by time (ms) and event id, for /admin. */
  alertLog: (at: number, eventId: string) => ["alert_log", at, eventId] as const,
  alertLogAll: () => ["alert_log"] as const,
  localSecret: (name: string) => ["local_secrets", name] as const,
  /** A signed-out local session id, kept (expireIn) until its token would have expired anyway. */
  revokedSession: (sid: string) => ["revoked_sessions", sid] as const,
  /** Grows with every write that invalidates cached users or keys (lib/identity/cache_epoch.ts). */
  cacheEpoch: () => ["cache_epoch"] as const,
  /** Which user an invalidating write changed, by time (ms) and a random id. */
  cacheChange: (at: number, id: string) => ["cache_changes", at, id] as const,
  cacheChanges: (at: number) => ["cache_changes", at] as const,
  /** Key rotations a user made in one clock hour (a number; expires after two). */
  keyRotations: (userId: string, hour: number) => ["key_rotations", userId, hour] as const,
  /** A PKCE authorization code by its SHA-256 (expireIn): the user id and the challenge. */
  connectCode: (codeHash: string) => ["connect_codes", codeHash] as const,
  /** A device authorization by the SHA-256 of its device code (expireIn). */
  deviceCode: (deviceCodeHash: string) => ["device_codes", deviceCodeHash] as const,
  /** Normalised user code (8 letters, no dash) → the device code hash; ids only. */
  deviceUserCode: (userCode: string) => ["device_user_codes", userCode] as const,
  /** Device authorizations started in one clock minute (a number; expires). */
  deviceStarts: (minute: number) => ["device_starts", minute] as const,
  /** Device authorizations one client address started in one clock minute (a number; expires). */
  deviceStartsFrom: (address: string, minute: number) =>
    ["device_starts_from", address, minute] as const,
  /** Wrong user codes a signed-in user entered in one window (a number; expireIn). */
  deviceCodeMisses: (userId: string, window: number) =>
    ["device_code_misses", userId, window] as const,
  /**
   * The per-request log (lib/observe/request_log.ts), by time then user: `rest` is the request id,
   * or a refusal group's `~code` and the process that counted it.
   */
  requestLog: (at: number, userId: string, ...rest: string[]) =>
    ["request_log", at, userId, ...rest] as const,
  requestLogs: () => ["request_log"] as const,
  /** The same entries per user, by time. */
  requestLogOfUser: (userId: string, at: number, ...rest: string[]) =>
    ["request_log_by_user", userId, at, ...rest] as const,
  requestLogsOfUser: (userId: string) => ["request_log_by_user", userId] as const,
  /** Read (never written) to learn whether a KV Connect server answers again (kv_deadline.ts). */
  kvProbe: () => ["kv_probe"] as const,
  /** A counter `deno task bench` commits to, to time one durable commit (a KvU64). */
  benchCommits: () => ["bench_commits"] as const,
};

/**
 * Opens KV at a file path, `:memory:`, or a KV Connect URL. Deno reads a KV Connect URL's token
 * from the process environment only, so a token that came from `.env` is put there first.
 * A KV file holds e-mail addresses, key hashes and usage: it and the folder Keyway creates for it
 * are readable by their owner only, whatever the umask and however the file came to exist.
 */
export async function openKv(
  path: string | undefined,
  accessToken?: string,
  /** `mustExist`: a task that reads the server's data refuses to create an empty KV file. */
  options: { onDeploy?: boolean; mustExist?: boolean } = {},
): Promise<Deno.Kv> {
  // Deno Deploy's own KV: no path, no file of ours (CONTRACT §8).
  if (path === undefined && options.onDeploy) return await Deno.openKv();
  const target = path ?? "./data/keyway.sqlite3";
  if (/^https?:\/\//.test(target)) {
    if (accessToken) Deno.env.set("DENO_KV_ACCESS_TOKEN", accessToken);
    // KV Connect retries an unreachable server for ever: give each call a deadline.
    return withDeadline(await Deno.openKv(target), { probeKey: keys.kvProbe() });
  }
  if (target === ":memory:") return await Deno.openKv(target);
  if (options.mustExist && !(await exists(target))) throw new KvMissingError(target);
  const dir = target.replace(/[^/\\]*$/, "");
  if (dir) await Deno.mkdir(dir, { recursive: true, mode: 0o700 });
  await createOwnerOnly(target);
  const kv = await Deno.openKv(target);
  for (const file of [target, `${target}-wal`, `${target}-shm`, `${target}-journal`]) {
    await chmodIfExists(file, 0o600);
  }
  return kv;
}

/** POSIX file modes do not exist on Windows (Deno.chmod throws there); ACLs govern instead. */
const POSIX = Deno.build.os !== "windows";

/** Creates an empty file as 0600 so SQLite never writes into a world-readable one, even briefly. */
async function createOwnerOnly(file: string) {
  if (!POSIX) return;
  try {
    (await Deno.open(file, { createNew: true, write: true, mode: 0o600 })).close();
  } catch (err) {
    if (!(err instanceof Deno.errors.AlreadyExists)) throw err;
  }
}

async function chmodIfExists(file: string, mode: number) {
  if (!POSIX) return;
  try {
    await Deno.chmod(file, mode);
  } catch (err) {
    if (!(err instanceof Deno.errors.NotFound)) throw err;
  }
}

/** openKv({ mustExist }) found no KV file where DENO_KV_PATH (or the default) points. */
export class KvMissingError extends Error {
  override name = "KvMissingError";
  constructor(readonly path: string) {
    super(
      `no KV file at ${path} (DENO_KV_PATH): point DENO_KV_PATH at the server's KV, or start ` +
        "the server once to create it",
    );
  }
}

async function exists(path: string): Promise<boolean> {
  try {
    await Deno.stat(path);
    return true;
  } catch (err) {
    if (err instanceof Deno.errors.NotFound) return false;
    throw err;
  }
}

/** Reads a KvU64 (or absent) entry value as a number. */
export function u64(value: unknown): number {
  return value instanceof Deno.KvU64 ? Number(value.value) : 0;
}

export const CONFLICT: unique symbol = Symbol("kv conflict");

/**
 * SQLite answers "database is locked" when another process holds the write lock longer than
 * its busy timeout (several processes on one KV file): that is contention, not failure.
 */
export function isTransientKvError(err: unknown): boolean {
  return err instanceof Error && /database is locked|SQLITE_BUSY/i.test(err.message);
}

/** Commits, reporting lock contention as a failed check so the caller's retry loop handles it. */
export async function commitOrConflict(
  op: Deno.AtomicOperation,
): Promise<Deno.KvCommitResult | Deno.KvCommitError> {
  try {
    return await op.commit();
  } catch (err) {
    if (isTransientKvError(err)) return { ok: false };
    throw err;
  }
}

/** A read-modify-write lost to another writer (or the KV file's lock) on every attempt. */
class KvConflictError extends Error {
  override name = "KvConflictError";
}

/** Runs an atomic read-modify-write until it commits (attempt returns CONFLICT to go again). */
export async function retryAtomic<T>(
  attempt: () => Promise<T | typeof CONFLICT>,
  what: string,
  maxAttempts = 100,
): Promise<T> {
  return await retry(async () => {
    let result: T | typeof CONFLICT;
    try {
      result = await attempt();
    } catch (err) {
      if (!isTransientKvError(err)) throw err;
      result = CONFLICT;
    }
    if (result !== CONFLICT) return result;
    throw new KvConflictError(`${what}: KV write kept conflicting after ${maxAttempts} attempts`);
  }, {
    attempts: maxAttempts,
    // Waits below 2^(n−2) ms, at most 50 ms, before attempt n: contenders spread out a little.
    baseMs: 0.5,
    capMs: 50,
    shouldRetry: (err) => err instanceof KvConflictError,
  });
}
