/**
 * The account's true state for people (dashboard, operator pages): what the gateway would do
 * with the next request. It follows the gateway's own rules (lib/limits/policy.ts and
 * quotaRefusal in lib/limits/admission.ts): a disabled or deleted user is refused (403); a user
 * whose day's requests, day's tokens or month's budget are used up is refused until it resets
 * (429, x-should-retry: false). The requests-per-minute limit and reservations of requests in
 * flight refuse only for seconds, so they are not a state worth a banner.
 */
import type { UserRecord } from "../identity/users.ts";
import { type EffectiveLimits } from "./policy.ts";
import { msUntilNextDay, msUntilNextMonth } from "../core/utc.ts";

export type PauseReason = "requests_per_day" | "tokens_per_day" | "budget_monthly";

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
  const paused: { reason: PauseReason; at: number }[] = [];
  const nextDay = now + msUntilNextDay(now);
  if (used.requestsLeftToday <= 0) paused.push({ reason: "requests_per_day", at: nextDay });
  if (limits.tokensPerDay !== null && used.tokensToday >= limits.tokensPerDay) {
    paused.push({ reason: "tokens_per_day", at: nextDay });
  }
  if (
    limits.budgetUsdMonthly !== null &&
    used.spendNanoMonth >= Math.round(limits.budgetUsdMonthly * 1e9)
  ) {
    paused.push({ reason: "budget_monthly", at: now + msUntilNextMonth(now) });
  }
  if (!paused.length) return { status: "active" };
  const longest = paused.reduce((a, b) => (b.at > a.at ? b : a));
  return {
    status: "paused",
    reason: longest.reason,
    reasons: paused.map((p) => p.reason),
    until: new Date(longest.at).toISOString(),
  };
}
