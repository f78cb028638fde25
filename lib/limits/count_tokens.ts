/**
 * count_tokens' own limits (CONTRACT §2 `COUNT_TOKENS_RPM`, §5 the gateway's endpoint table):
 * per user, `COUNT_TOKENS_RPM` calls a minute (GCRA, burst = the rpm, as lib/limits/gcra.ts
 * counts requests) and at most COUNT_TOKENS_IN_FLIGHT at once, across all processes. They count
 * against no other limit, and no other limit counts them.
 *
 * One KV entry per user, `keys.countTokens(user)` = `{tat, flights}`: a call is admitted by a
 * commit that checks it (so both limits are exact across processes) and adds its flight; its end
 * removes the flight the same way. A flight carries an expiry its process renews while the call
 * lasts, so the flights of a process that died stop counting within FLIGHT_TTL_MS.
 * Calls of one user in one process take turns on the entry (they would only conflict).
 */
import type { Config } from "../core/config.ts";
import { AppError } from "../core/errors.ts";
import { formatCount } from "../core/format.ts";
import { commitOrConflict, keys } from "../core/kv.ts";
import { backoffMs } from "../core/kv_ops.ts";
import { type Clock, systemClock } from "../core/clock.ts";
import type { Logger } from "../core/log.ts";

export const COUNT_TOKENS_IN_FLIGHT = 2;
/** A flight not renewed for this long belongs to a process that died. */
const FLIGHT_TTL_MS = 30_000;
const RENEW_MS = 10_000;
const MINUTE_MS = 60_000;
/** Absorbs float error in tat so that exactly rpm calls fit into a fresh minute. */
const EPSILON = 1e-6;
const ATTEMPTS = 50;

interface CountTokensState {
  /** GCRA theoretical arrival time (ms since the epoch). */
  tat: number;
  flights: Array<{ id: string; exp: number }>;
}

/** A call admitted: release() ends it (once). */
export interface Flight {
  release(): Promise<void>;
}

export class CountTokensLimiter {
  /** Per user, the tail of this process's operations on the entry (they take turns). */
  private readonly turns = new Map<string, Promise<unknown>>();

  constructor(
    private readonly kv: Deno.Kv,
    private readonly config: Config,
    private readonly options: { clock?: Clock; log?: Logger } = {},
  ) {}

  /**
   * Admits one call of the user or throws 429 `rate_limit_exceeded` / `concurrency_limit_exceeded`
   * with Retry-After (and `headers`, the request-rate headers as they stand).
   */
  take(userId: string, headers: Record<string, string>): Promise<Flight> {
    return this.inTurn(userId, async () => {
      const id = crypto.randomUUID();
      await this.update(userId, (state, now) => {
        const rpm = this.config.countTokensRpm;
        const interval = MINUTE_MS / rpm;
        const base = Math.max(state.tat, now);
        if (base + interval - now > MINUTE_MS + EPSILON) {
          const s = Math.max(1, Math.ceil((base + interval - MINUTE_MS - now) / 1000));
          throw new AppError(
            "rate_limit_exceeded",
            `count_tokens is limited to ${formatCount(rpm, "call")} per minute; retry in ${s}s. ` +
              "(It counts against no other limit.)",
            { ...headers, "retry-after": String(s) },
          );
        }
        if (state.flights.length >= COUNT_TOKENS_IN_FLIGHT) {
          throw new AppError(
            "concurrency_limit_exceeded",
            `${
              formatCount(COUNT_TOKENS_IN_FLIGHT, "count_tokens call")
            } of this account are in flight ` +
              "already; retry when one of them has finished.",
            { ...headers, "retry-after": "1" },
          );
        }
        return {
          tat: base + interval,
          flights: [...state.flights, { id, exp: now + FLIGHT_TTL_MS }],
        };
      });
      return this.flight(userId, id);
    });
  }

  private flight(userId: string, id: string): Flight {
    const timer = setInterval(() => {
      this.inTurn(userId, () =>
        this.update(userId, (state, now) => ({
          ...state,
          flights: state.flights.map((f) => f.id === id ? { id, exp: now + FLIGHT_TTL_MS } : f),
        }))).catch(() => {}); // the next renewal tries again
    }, RENEW_MS);
    Deno.unrefTimer(timer);
    let released: Promise<void> | null = null;
    return {
      release: () =>
        released ??= (async () => {
          clearInterval(timer);
          try {
            await this.inTurn(userId, () =>
              this.update(userId, (state) => ({
                ...state,
                flights: state.flights.filter((f) => f.id !== id),
              })));
          } catch (err) {
            // It expires on its own within FLIGHT_TTL_MS.
            this.options.log?.warn("count_tokens flight not released", { error: String(err) });
          }
        })(),
    };
  }

  /** Read-modify-write of the user's entry (expired flights dropped), until it commits. */
  private async update(
    userId: string,
    change: (state: CountTokensState, now: number) => CountTokensState,
  ): Promise<void> {
    const key = keys.countTokens(userId);
    for (let attempt = 1; attempt <= ATTEMPTS; attempt++) {
      const entry = await this.kv.get<CountTokensState>(key);
      const now = (this.options.clock ?? systemClock)();
      const stored = entry.value ?? { tat: 0, flights: [] };
      const state = { tat: stored.tat, flights: stored.flights.filter((f) => f.exp > now) };
      const next = change(state, now);
      // Worthless once its minute has passed and nothing is in flight: KV drops it.
      const expireIn = Math.max(next.tat - now, 0) + MINUTE_MS + FLIGHT_TTL_MS;
      const res = await commitOrConflict(
        this.kv.atomic().check(entry).set(key, next, { expireIn }),
      );
      if (res.ok) return;
      await new Promise((r) => setTimeout(r, backoffMs(attempt)));
    }
    throw new Error("count_tokens limits: KV write kept conflicting");
  }

  /** Runs fn after this process's earlier operations on the user's entry. */
  private inTurn<T>(userId: string, fn: () => Promise<T>): Promise<T> {
    const before = this.turns.get(userId) ?? Promise.resolve();
    const run = before.then(fn, fn);
    const tail = run.catch(() => {});
    this.turns.set(userId, tail);
    tail.then(() => {
      if (this.turns.get(userId) === tail) this.turns.delete(userId);
    });
    return run;
  }
}
