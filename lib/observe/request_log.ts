/**
 * The per-request log (CONTRACT §5 "Requests"): one entry per admitted request, and refusals
 * grouped per user, code and minute. Never a prompt, an answer or a key: only what the gateway
 * decided and measured.
 *
 * ## State in KV (both with `expireIn` = REQUEST_LOG_DAYS)
 * - Each entry once, per user, and its key by time (how they are kept and listed: log_store.ts).
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
import {
  listRequests,
  type RequestLogEntry,
  type RequestPage,
  type RequestQuery,
  storeEntry,
} from "./log_store.ts";
import type { Logger } from "../core/log.ts";
import { DAY_MS } from "../core/utc.ts";
import { costUsd, type Pricing, roundUsd } from "../usage/pricing.ts";

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

/** Adds an admitted request's entry and its key by time to a commit (2 mutations). */
export function addEntry(op: Deno.AtomicOperation, { at, value }: LoggedEntry, ttlMs: number) {
  storeEntry(op, at, value, [value.id], ttlMs);
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
        storeEntry(op, at, { ...g.latest, count: g.count }, tail, this.ttlMs);
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
