/**
 * The per-request log (CONTRACT §5 "Requests"): one entry per admitted request, and refusals
 * grouped per user, code and minute. Never a prompt, an answer or a key: only what the gateway
 * decided and measured.
 *
 * ## State in KV (both with `expireIn` = REQUEST_LOG_DAYS)
 * - `keys.requestLogOfUser(user, at, …)`: each entry, once, per user (the user's own listing),
 *   and `keys.requestLog(at, user, …)`: its key by time, holding nothing (the operator's listing
 *   reads the entries it names). Both are listed newest first. Entries written before the index
 *   held keys only are whole in both; a listing reads either.
 * - An admitted request's entry is written by the Ledger in the commit that settles it
 *   (lib/limits/admission.ts): two sets more in a commit the request makes anyway, no write of
 *   its own. `at` is when the request arrived; its key ends with the request id.
 * - A refusal is counted in this process's memory per user, code and minute, and the group is
 *   written by a set of its count so far (its fields are the latest refusal's; `at` is the
 *   minute's start, where it is listed), under a key that ends with `~code` and this process's
 *   id: each process owns its keys, so no commit conflicts or reads; a listing merges the groups
 *   of one user, code and minute (adjacent keys) into one entry whose `count` is their sum. A
 *   refusal makes no commit of its own: groups are written together, at most once a second per
 *   process, so a refusal storm costs one small commit a second. A process that crashes loses
 *   the refusals of its last second from the log (never from the limits).
 */
import { type Clock, systemClock } from "../core/clock.ts";
import type { Config } from "../core/config.ts";
import { AppError } from "../core/errors.ts";
import { keys } from "../core/kv.ts";
import { getManyChunked } from "../core/kv_ops.ts";
import type { Logger } from "../core/log.ts";
import { DAY_MS } from "../core/utc.ts";
import { costUsd, type Pricing, roundUsd } from "../usage/pricing.ts";

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

/** What the gateway knows of a request when it ends (the Ledger adds what it charged). */
export interface RequestFacts {
  id: string;
  endpoint: string;
  requestedModel: string | null;
  stream: boolean;
  status: number;
  code: string | null;
  durationMs: number;
  ttfbMs: number | null;
  queueMs: number;
  /** The raw User-Agent header (cut when the entry is built). */
  userAgent: string | null;
}

/** What a settlement charged, as the entry shows it. */
export interface Charged {
  promptTokens: number;
  completionTokens: number;
  cachedTokens?: number;
  estimated: boolean;
  /** Not counted at all (not the user's doing). */
  spared?: boolean;
}

const CLIENT_MAX = 80;
/** Refusal groups written per commit (two sets each). */
const GROUPS_PER_COMMIT = 200;
/** How long refusals wait in memory before their groups are written. */
const FLUSH_MS = 1_000;
const MINUTE_MS = 60_000;
/** Entries a listing reads at most per call (filters may skip many): then `next` goes on. */
const SCAN_MAX = 2_000;

/**
 * The User-Agent as the log keeps it: printable ASCII only, at most 80 characters, and never a
 * key (a client could put one there).
 */
export function clientOf(userAgent: string | null): string {
  if (!userAgent) return "";
  return withoutKeys(userAgent.replace(/[^\x20-\x7E]/g, "")).slice(0, CLIENT_MAX).trim();
}

/** Text a client chose (its User-Agent, the model it asked for) with any `kw_…` key cut out. */
export function withoutKeys(text: string): string {
  return text.replace(/kw_[A-Za-z0-9_-]+/g, "kw_…");
}

/** The model a client asked for, as the log keeps it (a key it put there is not kept). */
const askedFor = (model: string | null) => model === null ? null : withoutKeys(model);

/** How long entries are kept (ms), or 0 for no log. */
export function logTtlMs(config: Config): number {
  return config.requestLogDays * DAY_MS;
}

/** An entry and when its request arrived (ms), which its keys are ordered by. */
export interface LoggedEntry {
  at: number;
  value: RequestLogEntry;
}

/** The entry of an admitted request, settled at `now` (ms) with `charge`. */
export function admittedEntry(
  facts: RequestFacts,
  o: { userId: string; keyId: string; model: string; now: number; pricing: Pricing },
  charge: Charged,
): LoggedEntry {
  const cached = charge.cachedTokens ?? 0;
  const cost = charge.spared
    ? 0
    : costUsd(o.pricing, o.model, charge.promptTokens, charge.completionTokens, cached);
  const at = Math.round(o.now - facts.durationMs); // whole ms: it is in the keys and cursors
  const value: RequestLogEntry = {
    id: facts.id,
    at: new Date(at).toISOString(),
    userId: o.userId,
    keyId: o.keyId,
    endpoint: facts.endpoint,
    model: o.model,
    requestedModel: askedFor(facts.requestedModel),
    stream: facts.stream,
    status: facts.status,
    code: facts.code,
    promptTokens: charge.promptTokens,
    completionTokens: charge.completionTokens,
    cachedTokens: cached,
    costUsd: roundUsd(cost),
    estimated: charge.estimated,
    durationMs: facts.durationMs,
    ttfbMs: facts.ttfbMs,
    queueMs: facts.queueMs,
    client: clientOf(facts.userAgent),
    count: 1,
  };
  return { at, value };
}

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

/** Adds an admitted request's entry and its key by time to a commit (2 mutations). */
export function addEntry(op: Deno.AtomicOperation, { at, value }: LoggedEntry, ttlMs: number) {
  setEntry(op, at, value.userId, [value.id], pack(value, value.id), ttlMs);
}

function setEntry(
  op: Deno.AtomicOperation,
  at: number,
  userId: string,
  rest: string[],
  stored: StoredEntry,
  ttlMs: number,
) {
  op.set(keys.requestLogOfUser(userId, at, ...rest), stored, { expireIn: ttlMs });
  op.set(keys.requestLog(at, userId, ...rest), null, { expireIn: ttlMs });
}

/** A refusal, as the gateway saw it. */
export interface Refusal {
  id: string;
  /** The key it came with ("default": the user's default key). */
  keyId: string;
  endpoint: string;
  model: string | null;
  requestedModel: string | null;
  stream: boolean;
  status: number;
  code: string;
  durationMs: number;
  userAgent: string | null;
}

interface Group {
  userId: string;
  minute: number;
  code: string;
  latest: RequestLogEntry;
  count: number;
  /** Counted since last written. */
  dirty: boolean;
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

export class RequestLog {
  readonly ttlMs: number;
  private readonly groups = new Map<string, Group>();
  /** This process's part of the refusal groups' keys. */
  private readonly proc = crypto.randomUUID().replaceAll("-", "").slice(0, 12);
  private timer: ReturnType<typeof setTimeout> | undefined;
  private flushing: Promise<void> | null = null;

  constructor(
    private readonly kv: Deno.Kv,
    config: Config,
    private readonly options: {
      clock?: Clock;
      log?: Logger;
      /** Each commit's duration (ms), for the metrics. */
      onCommit?: (ms: number) => void;
    } = {},
  ) {
    this.ttlMs = logTtlMs(config);
  }

  get enabled(): boolean {
    return this.ttlMs > 0;
  }

  /** Counts a refusal in its user's group for this code and minute (written within a second). */
  refused(userId: string, r: Refusal) {
    if (!this.enabled) return;
    const now = (this.options.clock ?? systemClock)();
    const minute = Math.floor(now / MINUTE_MS);
    const id = `${userId}\u0000${r.code}\u0000${minute}`;
    let group = this.groups.get(id);
    if (!group) {
      group = { userId, minute, code: r.code, latest: null!, count: 0, dirty: true };
      this.groups.set(id, group);
    }
    group.count++;
    group.dirty = true;
    group.latest = {
      id: r.id,
      // The group stands for its minute: listed, and dated, at the minute's start.
      at: new Date(minute * MINUTE_MS).toISOString(),
      userId,
      keyId: r.keyId,
      endpoint: r.endpoint,
      model: r.model,
      requestedModel: askedFor(r.requestedModel),
      stream: r.stream,
      status: r.status,
      code: r.code,
      promptTokens: 0,
      completionTokens: 0,
      cachedTokens: 0,
      costUsd: 0,
      estimated: false,
      durationMs: r.durationMs,
      ttfbMs: null,
      queueMs: 0,
      client: clientOf(r.userAgent),
      count: 0,
    };
    this.timer ??= this.schedule();
  }

  private schedule() {
    const timer = setTimeout(() => {
      this.timer = undefined;
      this.flush().catch((err) =>
        this.options.log?.warn("request log: refusals not written", { error: String(err) })
      );
    }, FLUSH_MS);
    Deno.unrefTimer(timer);
    return timer;
  }

  /** Writes the refusal groups counted since they were last written. */
  flush(): Promise<void> {
    return this.flushing ??= this.write().finally(() => this.flushing = null);
  }

  private async write() {
    const now = (this.options.clock ?? systemClock)();
    const dirty = [...this.groups.values()].filter((g) => g.dirty);
    for (let i = 0; i < dirty.length; i += GROUPS_PER_COMMIT) {
      const part = dirty.slice(i, i + GROUPS_PER_COMMIT);
      const op = this.kv.atomic();
      for (const g of part) {
        g.dirty = false;
        const at = g.minute * MINUTE_MS;
        const tail = [`~${g.code}`, this.proc];
        const entry = pack({ ...g.latest, count: g.count }, this.proc);
        setEntry(op, at, g.userId, tail, entry, this.ttlMs);
      }
      const started = performance.now();
      try {
        const res = await op.commit();
        if (!res.ok) throw new Error("request log commit failed");
      } catch (err) {
        for (const g of part) g.dirty = true;
        this.timer ??= this.schedule();
        throw err;
      }
      this.options.onCommit?.(performance.now() - started);
    }
    // Groups of past minutes, written: nothing more will be counted in them.
    const current = Math.floor(now / MINUTE_MS);
    for (const [id, g] of this.groups) if (!g.dirty && g.minute < current) this.groups.delete(id);
  }

  /** Writes what is pending (shutdown, tests). */
  async close(): Promise<void> {
    clearTimeout(this.timer);
    this.timer = undefined;
    await this.flush();
  }

  /** A page of the log, newest first: one user's (their index) or everyone's, filtered. */
  list(q: RequestQuery): Promise<RequestPage> {
    return listRequests(this.kv, q);
  }
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
