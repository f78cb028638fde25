/**
 * Request limits: requests per minute (GCRA) and per UTC day, decided on one state entry per user.
 *
 * - Requests per minute: GCRA (generic cell rate algorithm) with burst = rpm. Each user has a
 *   "theoretical arrival time" `tat` (ms). With interval T = 60 000 / rpm, a request at `now` is
 *   admitted when `max(tat, now) + T − now ≤ 60 000`, and then `tat := max(tat, now) + T`. A fresh
 *   user can therefore send rpm requests at once; after that one request every T ms. This is a
 *   token bucket of capacity rpm refilled continuously, with no window edges to game.
 * - Requests per UTC day: a counter that belongs to the calendar day it was written on (it
 *   restarts at 00:00 UTC).
 * Pure functions: lib/limits/admission.ts reads and writes the state atomically.
 */
import { type Day, msUntilNextDay, utcDay } from "../core/utc.ts";

/** The request limits GCRA decides on (the rest of a user's limits is lib/limits/policy.ts's). */
export interface RateLimits {
  rpm: number;
  rpd: number;
}

/** The request-limit part of a user's limit state (lib/limits/admission.ts adds the leases). */
export interface RateState {
  /** GCRA theoretical arrival time, ms since the epoch. */
  tat: number;
  day: Day;
  dayCount: number;
  /** The user's refund counter (`keys.rateRefunds`) as of this state: refunds up to it applied. */
  refunded?: number;
  /** The rpm `tat` was counted in (absent in states written before it was kept). */
  rpm?: number;
}

const MINUTE_MS = 60_000;
/** Absorbs float error in tat so that exactly rpm requests fit into a fresh minute. */
const EPSILON = 1e-6;

export interface RateView {
  remainingMinute: number;
  remainingDay: number;
  /** ms until the minute allowance is whole again. */
  minuteResetMs: number;
}

/**
 * The state with the requests given back since it was written (refusals that were not the
 * user's doing, lib/limits/admission.ts): each returns one request of the minute and the day.
 * A refund counter read late only returns the allowance later; none is lost or applied twice.
 */
export function withRefunds(
  state: RateState | null,
  refunds: number,
  limits: RateLimits,
): RateState | null {
  if (!state) return refunds ? { tat: 0, day: "", dayCount: 0, refunded: refunds } : null;
  const n = refunds - (state.refunded ?? 0);
  if (n <= 0) return state;
  return {
    ...state,
    tat: state.tat - n * (MINUTE_MS / (state.rpm ?? limits.rpm)),
    dayCount: Math.max(0, state.dayCount - n),
    refunded: refunds,
  };
}

/**
 * The state counted in the current rpm: when an operator changes a user's rpm, the requests of
 * the last minute stay what they were, and the allowance is the new one at once (raising rpm
 * from 2 to 60 after 2 requests leaves 58, not what the old pace would have refilled by now;
 * lowering it below what was used leaves a full minute to wait at most).
 */
function inCurrentRpm(state: RateState | null, limits: RateLimits, now: number) {
  if (!state?.rpm || state.rpm === limits.rpm || state.tat <= now) return state;
  // Lowered below what was used: at most a minute's worth is owed (as a window would count it).
  const used = Math.min((state.tat - now) / (MINUTE_MS / state.rpm), limits.rpm);
  return { ...state, tat: now + used * (MINUTE_MS / limits.rpm), rpm: limits.rpm };
}

/** What is left of the request limits at `now`, without consuming anything. */
export function rateView(
  stored: RateState | null,
  limits: RateLimits,
  now: number,
): RateView {
  const state = inCurrentRpm(stored, limits, now);
  const interval = MINUTE_MS / limits.rpm;
  const base = state ? Math.max(state.tat, now) : now;
  const remainingMinute = Math.max(
    0,
    Math.floor((MINUTE_MS - (base - now)) / interval + EPSILON),
  );
  const dayCount = state && state.day === utcDay(now) ? state.dayCount : 0;
  return {
    remainingMinute,
    remainingDay: Math.max(0, limits.rpd - dayCount),
    minuteResetMs: base - now,
  };
}

export interface RateDecision {
  allowed: boolean;
  /** The state to write when allowed. */
  next: RateState;
  /** The view as it stands, before this request. */
  before: RateView;
  /** The view after admitting this request (equals `before` when refused). */
  after: RateView;
  /** Whole seconds until a retry can succeed (refusals only). */
  retryAfter: number;
}

/** GCRA + day counter decision for one request at `now`. */
export function decideRate(
  stored: RateState | null,
  limits: RateLimits,
  now: number,
): RateDecision {
  const state = inCurrentRpm(stored, limits, now);
  const before = rateView(state, limits, now);
  const interval = MINUTE_MS / limits.rpm;
  const base = state ? Math.max(state.tat, now) : now;
  const today = utcDay(now);
  const dayCount = state && state.day === today ? state.dayCount : 0;
  const allowed = before.remainingMinute >= 1 && before.remainingDay >= 1;
  const next: RateState = {
    tat: base + interval,
    day: today,
    dayCount: dayCount + 1,
    refunded: state?.refunded ?? 0,
    rpm: limits.rpm,
  };
  if (allowed) {
    const after = {
      remainingMinute: before.remainingMinute - 1,
      remainingDay: before.remainingDay - 1,
      minuteResetMs: next.tat - now,
    };
    return { allowed, next, before, after, retryAfter: 0 };
  }
  let waitMs = 0;
  if (before.remainingMinute < 1) waitMs = base + interval - MINUTE_MS - now;
  if (before.remainingDay < 1) waitMs = Math.max(waitMs, msUntilNextDay(now));
  const retryAfter = Math.max(1, Math.ceil(waitMs / 1000));
  return { allowed, next, before, after: before, retryAfter };
}
