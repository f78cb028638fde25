/**
 * A user's effective limits (per-user overrides over the configured defaults), what is left of
 * them, the x-ratelimit-* headers and the refusals the contract names (CONTRACT §4, §5).
 *
 * Rate headers (every gateway response after the key check):
 * - `x-ratelimit-limit-requests`: the requests-per-minute limit (rpm);
 * - `x-ratelimit-remaining-requests`: requests that could be sent right now — the smaller of what
 *   is left of the minute allowance and of the day allowance;
 * - `x-ratelimit-reset-requests`: OpenAI-style duration ("850ms", "12s", "1m30s", "5h3m0s") until
 *   that allowance is whole again: the minute bucket refilled, or 00:00 UTC when the day
 *   allowance is the smaller one.
 * 429 answers carry `Retry-After` in whole seconds (≥ 1) until a retry can succeed. Refusals that
 * cannot succeed soon (the day's requests, a spent quota, a disabled or deleted user) are 403,
 * never 429 (coding tools that ignore `x-should-retry` would sleep on a 429 for hours), with
 * `x-should-retry: false` and, for a spent limit, `Retry-After` until its reset.
 */
import type { Config } from "../core/config.ts";
import { AppError } from "../core/errors.ts";
import type { UserRecord } from "../identity/users.ts";
import type { RateLimits, RateView } from "./gcra.ts";
import { msUntilNextDay, msUntilNextMonth } from "../core/utc.ts";
import { formatCount, formatUsdExact } from "../core/format.ts";

export interface EffectiveLimits extends RateLimits {
  /** null = unlimited */
  tokensPerDay: number | null;
  /** null = unlimited */
  budgetUsdMonthly: number | null;
}

export function effectiveLimits(config: Config, user: Pick<UserRecord, "limits">): EffectiveLimits {
  const o = user.limits;
  const tokens = o.tokensPerDay ?? config.limits.tokensPerDay;
  const budget = o.budgetUsdMonthly ?? config.limits.budgetUsdMonthly;
  return {
    rpm: o.rpm ?? config.limits.rpm,
    rpd: o.rpd ?? config.limits.rpd,
    tokensPerDay: tokens > 0 ? tokens : null,
    budgetUsdMonthly: budget > 0 ? budget : null,
  };
}

export const hasQuota = (l: EffectiveLimits) =>
  l.tokensPerDay !== null || l.budgetUsdMonthly !== null;

/** OpenAI-style duration: "850ms", "12s", "1.5s", "1m30s", "5h3m0s". */
export function formatDuration(ms: number): string {
  if (ms <= 0) return "0s";
  if (ms < 1000) return `${Math.ceil(ms)}ms`;
  const totalS = ms / 1000;
  if (totalS < 60) return `${Math.round(totalS * 1000) / 1000}s`;
  const s = Math.ceil(totalS);
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const rest = s % 60;
  return h > 0 ? `${h}h${m}m${rest}s` : `${m}m${rest}s`;
}

/** The three x-ratelimit-* headers for a view (see the comment at the top). */
export function rateHeaders(
  limits: EffectiveLimits,
  view: RateView,
  now: number,
): Record<string, string> {
  const dayBinds = view.remainingDay < view.remainingMinute;
  return {
    "x-ratelimit-limit-requests": String(limits.rpm),
    "x-ratelimit-remaining-requests": String(Math.min(view.remainingMinute, view.remainingDay)),
    "x-ratelimit-reset-requests": formatDuration(
      dayBinds ? msUntilNextDay(now) : view.minuteResetMs,
    ),
  };
}

/**
 * The x-ratelimit-remaining-requests header once the request was given back to the limits (not
 * served, not counted): one more left than at admission, within both limits.
 */
export function givenBackHeader(
  limits: EffectiveLimits,
  remaining: Pick<Remaining, "minute" | "day">,
): Record<string, string> {
  const minute = Math.min(limits.rpm, remaining.minute + 1);
  const day = Math.min(limits.rpd, remaining.day + 1);
  return { "x-ratelimit-remaining-requests": String(Math.min(minute, day)) };
}

export interface Remaining {
  minute: number;
  day: number;
  tokensToday: number | null;
  budgetUsd: number | null;
}

/** What is left: `tokensToday` and `spendNanoMonth` include the reservations of requests in flight. */
export function remainingOf(
  limits: EffectiveLimits,
  view: RateView,
  tokensToday: number,
  spendNanoMonth: number,
): Remaining {
  return {
    minute: view.remainingMinute,
    day: view.remainingDay,
    tokensToday: limits.tokensPerDay === null
      ? null
      : Math.max(0, limits.tokensPerDay - tokensToday),
    budgetUsd: limits.budgetUsdMonthly === null
      ? null
      : Math.max(0, Math.round(limits.budgetUsdMonthly * 1e9 - spendNanoMonth) / 1e9),
  };
}

/** Headers of a refusal that retrying soon cannot fix (CONTRACT §4). */
export const FINAL = { "x-should-retry": "false" } as const;

/**
 * A spent limit's refusal (the day's requests or tokens, the month's budget): 403
 * `quota_exceeded` (CONTRACT §4), `x-should-retry: false` and `Retry-After` in whole seconds until
 * the reset; the message ends with when that is.
 */
function spentRefusal(message: string, resetMs: number, headers: Record<string, string>): AppError {
  const retryAfter = Math.max(1, Math.ceil(resetMs / 1000));
  return new AppError(
    "quota_exceeded",
    `${message} (in ${formatDuration(retryAfter * 1000)}).`,
    { ...headers, "retry-after": String(retryAfter), ...FINAL },
    403,
  );
}

export function userDisabled(headers: Record<string, string>): AppError {
  return new AppError("user_disabled", "This account has been disabled.", {
    ...headers,
    ...FINAL,
  });
}

export function userDeleted(headers: Record<string, string>): AppError {
  return new AppError("user_deleted", "This account has been deleted.", { ...headers, ...FINAL });
}

/** The user's state as the gateway and /api/usage see it: active, or why not (403). */
export function checkUserState(user: UserRecord, headers: Record<string, string>): UserRecord {
  if (user.status === "disabled") throw userDisabled(headers);
  if (user.status === "deleted") throw userDeleted(headers);
  return user;
}

/** What a user has used up now, in the gateway's order of checks (limits spent until a reset). */
export type SpentLimit = "requests_per_day" | "tokens_per_day" | "budget_monthly";

/**
 * The limits used up: the day's requests, the day's tokens, the month's budget. The one check
 * behind the gateway's refusals that "nothing but the reset helps" and the account's paused state
 * (lib/limits/account_state.ts).
 */
export function spentLimits(
  limits: EffectiveLimits,
  used: { requestsLeftToday: number; tokensToday: number; spendNanoMonth: number },
): SpentLimit[] {
  const spent: SpentLimit[] = [];
  if (used.requestsLeftToday <= 0) spent.push("requests_per_day");
  if (limits.tokensPerDay !== null && used.tokensToday >= limits.tokensPerDay) {
    spent.push("tokens_per_day");
  }
  if (
    limits.budgetUsdMonthly !== null &&
    used.spendNanoMonth >= Math.round(limits.budgetUsdMonthly * 1e9)
  ) spent.push("budget_monthly");
  return spent;
}

/**
 * The request limits' refusal: the day's requests spent is final until 00:00 UTC (403
 * `quota_exceeded`); the per-minute limit is worth a retry in `retryAfter` seconds (429
 * `rate_limit_exceeded`).
 */
export function rateRefusal(
  limits: EffectiveLimits,
  dayLimit: boolean,
  retryAfter: number,
  now: number,
  headers: Record<string, string>,
): AppError {
  if (dayLimit) {
    return spentRefusal(
      `Daily request limit of ${
        formatCount(limits.rpd, "request")
      } reached; it resets at 00:00 UTC`,
      msUntilNextDay(now),
      headers,
    );
  }
  return new AppError(
    "rate_limit_exceeded",
    `Rate limit of ${
      formatCount(limits.rpm, "request")
    } per minute reached; retry in ${retryAfter}s.`,
    { ...headers, "retry-after": String(retryAfter) },
  );
}

/** CONCURRENCY_LIMIT's refusal. */
export function concurrencyRefusal(limit: number, headers: Record<string, string>): AppError {
  return new AppError(
    "concurrency_limit_exceeded",
    `${formatCount(limit, "request")} of this account ${
      limit === 1 ? "is" : "are"
    } in flight already; ` +
      "retry when one of them has finished.",
    { ...headers, "retry-after": "1" },
  );
}

/** A model without a price, for a user with a budget. */
export function unpricedRefusal(model: string, headers: Record<string, string>): AppError {
  return new AppError(
    "model_not_allowed",
    `model: "${model}" has no price, and this account has a monthly budget; ` +
      "the operator must add a price for it (PRICING) before it can be used here.",
    headers,
  );
}

export interface QuotaFigures {
  usedTokens: number;
  usedNano: number;
  heldTokens: number;
  heldNano: number;
  reserveTokens: number;
  reserveNano: number;
  reserveOutput: number;
}

/**
 * The quota refusal, or null when the reservation fits. A reservation that does not fit what is
 * left of the quota is refused until the quota resets (403, x-should-retry: false); one that only does
 * not fit beside the reservations of requests in flight may fit in a moment (Retry-After: 1).
 * A request reserving nothing (shared mode's reports) is refused once the quota is reached.
 */
export function quotaRefusal(
  limits: EffectiveLimits,
  now: number,
  headers: Record<string, string>,
  f: QuotaFigures,
): AppError | null {
  const check = (
    limit: number,
    used: number,
    held: number,
    reserve: number,
    words: {
      whole: string;
      resets: string;
      retryAfterMs: number;
      unit: (n: number) => string;
      /** The verb that agrees with `unit(n)`. */
      are: (n: number) => "is" | "are";
    },
  ): AppError | null => {
    if (used + reserve <= limit && used < limit) {
      if (used + held + reserve <= limit && used + held < limit) return null;
      return new AppError(
        "quota_exceeded",
        `${words.unit(held)} of ${words.whole} ${
          words.are(held)
        } reserved by requests in flight; ` +
          "retry when they have finished.",
        { ...headers, "retry-after": "1" },
      );
    }
    if (used >= limit) {
      return spentRefusal(
        `${words.whole} is used up; ${words.resets}`,
        words.retryAfterMs,
        headers,
      );
    }
    return spentRefusal(
      `This request reserves ${words.unit(reserve)} (its prompt and up to ` +
        `${formatCount(f.reserveOutput, "output token")}) but ${words.unit(limit - used)} of ` +
        `${words.whole} ${words.are(limit - used)} left; ` +
        `lower max_tokens, or wait: ${words.resets}`,
      words.retryAfterMs,
      headers,
    );
  };
  if (limits.tokensPerDay !== null) {
    const limit = limits.tokensPerDay;
    const refused = check(limit, f.usedTokens, f.heldTokens, f.reserveTokens, {
      whole: `the daily token quota of ${formatCount(limit, "token")}`,
      resets: "it resets at 00:00 UTC",
      retryAfterMs: msUntilNextDay(now),
      unit: (n) => formatCount(n, "token"),
      are: (n) => n === 1 ? "is" : "are",
    });
    if (refused) return capitalized(refused);
  }
  if (limits.budgetUsdMonthly !== null) {
    const budget = limits.budgetUsdMonthly;
    const refused = check(Math.round(budget * 1e9), f.usedNano, f.heldNano, f.reserveNano, {
      whole: `the monthly budget of ${formatUsdExact(budget)}`,
      resets: "it resets on the 1st of next month at 00:00 UTC",
      retryAfterMs: msUntilNextMonth(now),
      unit: (n) => formatUsdExact(n / 1e9),
      are: () => "is",
    });
    if (refused) return capitalized(refused);
  }
  return null;
}

function capitalized(err: AppError): AppError {
  const message = err.message[0].toUpperCase() + err.message.slice(1);
  return new AppError(err.code, message, err.headers, err.status);
}
