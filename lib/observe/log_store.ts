/**
 * How the request log (request_log.ts) is kept in KV and read back:
 * - `keys.requestLogOfUser(user, at, …)`: each entry, once, per user (the user's own listing),
 *   and `keys.requestLog(at, user, …)`: its key by time, holding nothing (the operator's listing
 *   reads the entries it names). Both are listed newest first. Entries written before the index
 *   held keys only are whole in both; a listing reads either.
 * - A listing pages by the last key it read (`next`), and merges the parts of a refusal group
 *   that several processes wrote into one entry.
 */
import { AppError } from "../core/errors.ts";
import { keys } from "../core/kv.ts";
import { getManyChunked } from "../core/kv_ops.ts";

/** One entry, as `GET /api/requests` answers it (CONTRACT §5 "Requests"). */
export interface RequestLogEntry {
  /** The request's x-request-id (a refusal group's: a latest refusal's). */
  id: string;
  at: string;
  userId: string;
  keyId: string;
  endpoint: string;
  /** The model it was served as; null when the request was refused before one was known. */
  model: string | null;
  /** The model the client asked for; null when the body could not be read. */
  requestedModel: string | null;
  stream: boolean;
  status: number;
  code: string | null;
  promptTokens: number;
  completionTokens: number;
  cachedTokens: number;
  costUsd: number;
  /** No upstream `usage` arrived: the tokens are the estimate (CONTRACT §5 Quotas). */
  estimated: boolean;
  durationMs: number;
  /** From the upstream call being sent to its answer's headers; null without an answer. */
  ttfbMs: number | null;
  /** Waited for an upstream slot. */
  queueMs: number;
  /** The User-Agent, cut to 80 printable characters. */
  client: string;
  /** Refusals of this user, code and minute (1 for an admitted request). */
  count: number;
}

/** Entries a listing reads at most per call (filters may skip many): then `next` goes on. */
const SCAN_MAX = 2_000;

/**
 * An entry as KV stores it: its fields in a fixed order, without what its keys hold already
 * (when, whose, and the request id where the key ends with it) — a third of the bytes of the
 * entry as an object, in a commit every request makes.
 */
type StoredEntry = [
  id: string | null,
  keyId: string,
  endpoint: string,
  model: string | null,
  /** null: the model it was served as. */
  requestedModel: string | null,
  /** 1: streamed, 2: estimated. */
  flags: number,
  status: number,
  code: string | null,
  promptTokens: number,
  completionTokens: number,
  cachedTokens: number,
  costUsd: number,
  durationMs: number,
  ttfbMs: number | null,
  queueMs: number,
  client: string,
  count: number,
];

/** Milliseconds as the log keeps them: to a tenth. */
const tenths = (ms: number) => Math.round(ms * 10) / 10;

function pack(e: RequestLogEntry, keyEnd: string): StoredEntry {
  return [
    e.id === keyEnd ? null : e.id,
    e.keyId,
    e.endpoint,
    e.model,
    e.requestedModel === e.model ? null : e.requestedModel,
    (e.stream ? 1 : 0) | (e.estimated ? 2 : 0),
    e.status,
    e.code,
    e.promptTokens,
    e.completionTokens,
    e.cachedTokens,
    e.costUsd,
    tenths(e.durationMs),
    e.ttfbMs === null ? null : tenths(e.ttfbMs),
    tenths(e.queueMs),
    e.client,
    e.count,
  ];
}

/** An entry read back from its key's parts and its stored value (either form). */
function unpack(
  stored: StoredEntry | RequestLogEntry,
  at: number,
  userId: string,
  keyEnd: string,
): RequestLogEntry {
  if (!Array.isArray(stored)) return { ...stored }; // as written before entries were packed
  const [
    id,
    keyId,
    endpoint,
    model,
    requestedModel,
    flags,
    status,
    code,
    promptTokens,
    completionTokens,
    cachedTokens,
    costUsd,
    durationMs,
    ttfbMs,
    queueMs,
    client,
    count,
  ] = stored;
  return {
    id: id ?? keyEnd,
    at: new Date(at).toISOString(),
    userId,
    keyId,
    endpoint,
    model,
    requestedModel: requestedModel ?? model,
    stream: (flags & 1) !== 0,
    status,
    code,
    promptTokens,
    completionTokens,
    cachedTokens,
    costUsd,
    estimated: (flags & 2) !== 0,
    durationMs,
    ttfbMs,
    queueMs,
    client,
    count,
  };
}

/**
 * Adds an entry to a commit (2 mutations): packed under its user, and its key by time. `rest`
 * ends its keys: the request id, or a refusal group's `~code` and process.
 */
export function storeEntry(
  op: Deno.AtomicOperation,
  at: number,
  entry: RequestLogEntry,
  rest: string[],
  ttlMs: number,
) {
  const stored = pack(entry, rest.at(-1)!);
  op.set(keys.requestLogOfUser(entry.userId, at, ...rest), stored, { expireIn: ttlMs });
  op.set(keys.requestLog(at, entry.userId, ...rest), null, { expireIn: ttlMs });
}

/** A page of the log. */
export interface RequestPage {
  requests: RequestLogEntry[];
  next: string | null;
}

/** A listing: one user's entries or everyone's, filtered, newest first. */
export interface RequestQuery {
  userId?: string;
  model?: string;
  status?: number;
  keyId?: string;
  /** ms since the epoch: from (inclusive) and to (exclusive). */
  from?: number;
  to?: number;
  limit: number;
  cursor?: string;
}

/** The group a key belongs to when it is a refusal group's (its key without the process id). */
function groupOf(key: Deno.KvKey): string | null {
  const code = key.at(-2);
  return typeof code === "string" && code.startsWith("~") ? JSON.stringify(key.slice(0, -1)) : null;
}

/** Folds another process's part of a refusal group into the entry: one entry, their counts summed. */
function merge(into: RequestLogEntry, other: RequestLogEntry) {
  into.count += other.count;
}

/** What `next` holds: the last key read, after the listing's prefix. */
function encodeCursor(suffix: Deno.KvKey): string {
  const bytes = new TextEncoder().encode(JSON.stringify(suffix));
  return btoa(String.fromCharCode(...bytes)).replaceAll("+", "-").replaceAll("/", "_")
    .replace(/=+$/, "");
}

function badCursor(): AppError {
  return new AppError("invalid_request", "cursor: not a cursor from this listing's `next`");
}

function decodeCursor(cursor: string): [number, ...string[]] {
  let parsed: unknown;
  try {
    const text = atob(cursor.replaceAll("-", "+").replaceAll("_", "/"));
    parsed = JSON.parse(new TextDecoder().decode(Uint8Array.from(text, (c) => c.charCodeAt(0))));
  } catch {
    throw badCursor();
  }
  if (
    !Array.isArray(parsed) || parsed.length < 2 || parsed.length > 4 ||
    typeof parsed[0] !== "number" || !Number.isSafeInteger(parsed[0]) ||
    !parsed.slice(1).every((p) => typeof p === "string" && p.length <= 400)
  ) throw badCursor();
  return parsed as [number, ...string[]];
}

/** A page of the log (see RequestLog.list). */
export async function listRequests(kv: Deno.Kv, q: RequestQuery): Promise<RequestPage> {
  const prefix: Deno.KvKey = q.userId ? keys.requestLogsOfUser(q.userId) : keys.requestLogs();
  const from = q.from ?? 0;
  const to = q.to ?? Number.MAX_SAFE_INTEGER;
  let end: Deno.KvKey = [...prefix, to];
  if (q.cursor) {
    const after = decodeCursor(q.cursor);
    if (after[0] < from) return { requests: [], next: null };
    if (after[0] < to) end = [...prefix, ...after];
  }
  if (from >= to) return { requests: [], next: null };
  const matches = (e: RequestLogEntry) =>
    (q.model === undefined || e.model === q.model) &&
    (q.status === undefined || e.status === q.status) &&
    (q.keyId === undefined || e.keyId === q.keyId);
  const requests: RequestLogEntry[] = [];
  let pending: { group: string | null; entry: RequestLogEntry } | null = null;
  let last: Deno.KvKey | null = null;
  let scanned = 0;
  let more = false;
  const iter = q.userId
    ? ownEntries(kv, q.userId, [...prefix, from], end, q.limit)
    : everyonesEntries(kv, [...prefix, from], end, q.limit);
  for await (const e of iter) {
    const group = groupOf(e.key);
    if (pending && group !== null && pending.group === group) {
      merge(pending.entry, e.entry);
      last = e.key;
      continue;
    }
    if (pending && matches(pending.entry)) requests.push(pending.entry);
    pending = null;
    if (requests.length >= q.limit || scanned >= SCAN_MAX) {
      more = true;
      break;
    }
    pending = { group, entry: e.entry };
    last = e.key;
    scanned++;
  }
  if (pending && matches(pending.entry)) requests.push(pending.entry);
  return {
    requests,
    next: more && last ? encodeCursor(last.slice(prefix.length)) : null,
  };
}

/** An entry of a listing, with the key it is listed under. */
interface Listed {
  key: Deno.KvKey;
  entry: RequestLogEntry;
}

const pageSize = (limit: number) => Math.min(500, limit + 10);

/** One user's entries, newest first: `[prefix, user], at, …rest` → the entry. */
async function* ownEntries(
  kv: Deno.Kv,
  userId: string,
  start: Deno.KvKey,
  end: Deno.KvKey,
  limit: number,
): AsyncGenerator<Listed> {
  const iter = kv.list<StoredEntry | RequestLogEntry>(
    { start, end },
    { reverse: true, batchSize: pageSize(limit) },
  );
  for await (const e of iter) {
    const at = e.key[2] as number;
    yield { key: e.key, entry: unpack(e.value, at, userId, String(e.key.at(-1))) };
  }
}

/**
 * Everyone's entries, newest first: the keys by time, a page at a time, each page's entries read
 * from their users' listings (at most 10 keys per read, the reads in parallel). An entry that
 * expired between the two is left out.
 */
async function* everyonesEntries(
  kv: Deno.Kv,
  start: Deno.KvKey,
  end: Deno.KvKey,
  limit: number,
): AsyncGenerator<Listed> {
  const iter = kv.list<StoredEntry | RequestLogEntry | null>(
    { start, end },
    { reverse: true, batchSize: pageSize(limit) },
  );
  let page: Deno.KvEntry<StoredEntry | RequestLogEntry | null>[] = [];
  const flush = async function* (): AsyncGenerator<Listed> {
    const wanted = page.filter((e) => e.value === null).map((e) => {
      const [, at, userId, ...rest] = e.key as [string, number, string, ...string[]];
      return keys.requestLogOfUser(userId, at, ...rest);
    });
    const found = await getManyChunked<StoredEntry | RequestLogEntry>(kv, wanted);
    let i = 0;
    for (const e of page) {
      const at = e.key[1] as number;
      const userId = e.key[2] as string;
      // Written before the index held keys only: the entry is here whole.
      const value = e.value ?? found[i++].value;
      if (value === null) continue;
      yield { key: e.key, entry: unpack(value, at, userId, String(e.key.at(-1))) };
    }
    page = [];
  };
  for await (const e of iter) {
    page.push(e);
    if (page.length >= pageSize(limit)) yield* flush();
  }
  yield* flush();
}
