/**
 * The account's true state for people (dashboard, operator pages): what the gateway would do
 * with the next request. It follows the gateway's own rules (lib/limits/policy.ts and
 * quotaRefusal there): a disabled or deleted user is refused (403); a user
 * whose day's requests, day's tokens or month's budget are used up is refused until it resets
 * (403, x-should-retry: false). The requests-per-minute limit and reservations of requests in
 * flight refuse only for seconds, so they are not a state worth a banner.
 */
import type { UserRecord } from "../identity/users.ts";
import { type EffectiveLimits, type SpentLimit, spentLimits } from "./policy.ts";
import { msUntilNextDay, msUntilNextMonth } from "../core/utc.ts";

export type PauseReason = SpentLimit;

export type AccountState =
  | { status: "active" }
  | { status: "disabled" }
  | { status: "deleted" }
  | {
    status: "paused";
    /** The limit that keeps the account paused longest (the one `until` belongs to). */
    reason: PauseReason;
    /** Every limit that is used up now, in the gateway's order of checks. */
    reasons: PauseReason[];
    /** ISO time when requests work again: 00:00 UTC, or the 1st of next month (UTC). */
    until: string;
  };

export interface UsedNow {
  /** Requests left today (the rate view's remainingDay). */
  requestsLeftToday: number;
  /** Tokens metered today (reservations of requests in flight not included). */
  tokensToday: number;
  /** Spend this UTC month in nano-USD (reservations not included). */
  spendNanoMonth: number;
}

/** What the next request would meet, from the user record, its effective limits and usage. */
export function accountState(
  user: Pick<UserRecord, "status"> | null,
  limits: EffectiveLimits,
  used: UsedNow,
  now: number,
): AccountState {
  if (user?.status === "disabled") return { status: "disabled" };
  if (user?.status === "deleted") return { status: "deleted" };
  // The gateway's own check (policy.ts): what is used up refuses until its reset.
  const nextDay = now + msUntilNextDay(now);
  const paused = spentLimits(limits, used).map((reason) => ({
    reason,
    at: reason === "budget_monthly" ? now + msUntilNextMonth(now) : nextDay,
  }));
  if (!paused.length) return { status: "active" };
  const longest = paused.reduce((a, b) => (b.at > a.at ? b : a));
  return {
    status: "paused",
    reason: longest.reason,
    reasons: paused.map((p) => p.reason),
    until: new Date(longest.at).toISOString(),
  };
}
