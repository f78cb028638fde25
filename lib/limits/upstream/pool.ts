/**
 * The pool of GLM keys (GLM_API_KEY, comma-separated): several accounts, or several keys of one,
 * served as one. UPSTREAM_CONCURRENCY applies per key (slots.ts takes a slot on the key with the
 * most free slots); a key GLM refuses (401/403, `1113`…) is left out for UPSTREAM_KEY_COOLDOWN_MS
 * across all processes (`keys.upstreamKeyCooldown(id)`, expiring), and the request is sent again
 * on another key.
 *
 * A key is named in KV by an id (the first 16 hex digits of its SHA-256: nothing of the key) and
 * to people by its last 4 characters (its hint). The secret itself stays in this process.
 */
import { type Clock, systemClock } from "../../core/clock.ts";
import type { Config } from "../../core/config.ts";
import { keys } from "../../core/kv.ts";
import { getManyChunked } from "../../core/kv_ops.ts";
import { sha256Hex } from "../../core/hash.ts";

/** How long this process trusts its view of which keys cool down (other processes' refusals). */
const REFRESH_MS = 1_000;

export interface PoolKey {
  /** The key's id in KV (a SHA-256 prefix). */
  readonly id: string;
  /** Its last 4 characters, for people. */
  readonly hint: string;
  /** The key itself: sent upstream, never stored, logged or shown. */
  readonly secret: string;
}

interface Cooldown {
  until: number;
  /** Why: "key_rejected" or "balance_exhausted". */
  reason: string;
  /**
   * When GLM began refusing this key: kept when it is refused again within STREAK_MS of its
   * cool-down's end (tried again and refused again), so an outage keeps its start.
   */
  since?: number;
}

/** A key refused again this soon after its cool-down ended is still in the same refusal. */
const STREAK_MS = 60_000;
const MINUTE_MS = 60_000;

export interface PoolKeyStatus {
  hint: string;
  /** null while in service; else until when it is left out (ms since the epoch) and why. */
  coolingUntil: number | null;
  reason: string | null;
  /** While left out: since when GLM has refused it (ms since the epoch). */
  since: number | null;
}

export class KeyPool {
  private cooling = new Map<string, Cooldown>();
  private readAt = -Infinity;
  private reading: Promise<void> | null = null;
  private next = 0;
  private pool: PoolKey[] = [];
  private readonly cooldownMs: number;
  /** Resolves once the keys' ids are known (hashed at start-up). */
  readonly ready: Promise<void>;

  constructor(
    private readonly kv: Deno.Kv,
    config: Config,
    private readonly clock: Clock = systemClock,
  ) {
    this.cooldownMs = config.glm.keyCooldownMs;
    this.ready = Promise.all(config.glm.apiKeys.map(async (secret) => ({
      id: (await sha256Hex(secret)).slice(0, 16),
      hint: secret.slice(-4),
      secret,
    }))).then((pool) => {
      this.pool = pool;
    });
  }

  /** Every key of the pool (after `ready`). */
  get keys(): readonly PoolKey[] {
    return this.pool;
  }

  get size(): number {
    return this.pool.length;
  }

  byId(id: string): PoolKey | undefined {
    return this.pool.find((k) => k.id === id);
  }

  /** The keys in service now (none cooling down), in pool order. */
  async inService(): Promise<PoolKey[]> {
    await this.ready;
    if (this.clock() - this.readAt > REFRESH_MS) await this.refresh();
    const now = this.clock();
    return this.keys.filter((k) => !((this.cooling.get(k.id)?.until ?? 0) > now));
  }

  /** A key for a call without an upstream slot: the in-service keys in turn; null when none. */
  async pick(): Promise<PoolKey | null> {
    const keys = await this.inService();
    if (!keys.length) return null;
    return keys[this.next++ % keys.length];
  }

  /** Leaves a key out of the pool for UPSTREAM_KEY_COOLDOWN_MS, across processes. */
  async coolDown(key: PoolKey, reason: string): Promise<void> {
    const now = this.clock();
    const until = now + this.cooldownMs;
    const before = this.cooling.get(key.id);
    const since = before && before.until + STREAK_MS >= now ? (before.since ?? now) : now;
    const cooldown: Cooldown = { until, reason, since };
    this.cooling.set(key.id, cooldown);
    // KV drops an expired entry some time after it expires: `until` is what counts. It is kept
    // a little longer than the cool-down, so a refusal right after it ends keeps `since`.
    await this.kv.set(keys.upstreamKeyCooldown(key.id), cooldown, {
      expireIn: this.cooldownMs + STREAK_MS,
    }).catch(() => {}); // KV unreachable: this process leaves it out all the same
  }

  /**
   * Counts a request refused because no key was in service (503 upstream_unavailable), for the
   * operator's outage banner: a sum per UTC minute, written off the request's own commits.
   */
  countRefused(): void {
    const minute = Math.floor(this.clock() / MINUTE_MS);
    this.kv.atomic().sum(keys.upstreamRefusals(minute), 1n).commit().catch(() => {});
  }

  /** Requests refused with no key in service from `since` on (to the minute). */
  async refusedSince(since: number): Promise<number> {
    const first = Math.floor(since / MINUTE_MS);
    let n = 0;
    const old: Deno.KvKey[] = [];
    for await (
      const e of this.kv.list<Deno.KvU64>({ prefix: keys.upstreamRefusals() }, { batchSize: 500 })
    ) {
      const minute = Number(e.key[1]);
      if (minute >= first) n += Number(e.value.value);
      else if (minute < first - 7 * 24 * 60) old.push(e.key);
    }
    // Sums cannot expire: counts of outages over a week old are dropped here, a few at a time.
    for (const key of old.slice(0, 100)) await this.kv.delete(key).catch(() => {});
    return n;
  }

  /** Each key's state, for /admin (hints only). */
  async status(): Promise<PoolKeyStatus[]> {
    await this.ready;
    await this.refresh();
    const now = this.clock();
    return this.keys.map((k) => {
      const c = this.cooling.get(k.id);
      const cooling = c && c.until > now ? c : null;
      return {
        hint: k.hint,
        coolingUntil: cooling?.until ?? null,
        reason: cooling?.reason ?? null,
        since: cooling ? (cooling.since ?? cooling.until - this.cooldownMs) : null,
      };
    });
  }

  private refresh(): Promise<void> {
    return this.reading ??= (async () => {
      try {
        const entries = await getManyChunked<Cooldown>(
          this.kv,
          this.keys.map((k) => keys.upstreamKeyCooldown(k.id)),
        );
        const next = new Map<string, Cooldown>();
        this.keys.forEach((k, i) => {
          const value = entries[i].value;
          if (value) next.set(k.id, value);
        });
        // A cooldown this process started a moment ago and has not read back yet stays.
        for (const [id, c] of this.cooling) {
          if (c.until > (next.get(id)?.until ?? 0)) next.set(id, c);
        }
        this.cooling = next;
        this.readAt = this.clock();
      } catch {
        // KV unreachable: keep the last view.
      } finally {
        this.reading = null;
      }
    })();
  }
}
