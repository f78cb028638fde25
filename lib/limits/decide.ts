/**
 * One admission decided on a user's state as it stands (pure): the key and user-state checks,
 * the model's price, the request limits (GCRA), concurrency, then the quotas, in the contract's
 * order (CONTRACT §5) — and whether the decision is sure enough for the upstream call to start
 * before the admission commit lands.
 */
import type { Config } from "../core/config.ts";
import { AppError } from "../core/errors.ts";
import type { UserRecord } from "../identity/users.ts";
import { DEFAULT_KEY_ID } from "../identity/user_record.ts";
import { costNanoUsd, priceOf, type Pricing } from "../usage/pricing.ts";
import { decideRate, type RateState, withRefunds } from "./gcra.ts";
import type { LeaseRecord } from "./lease_record.ts";
import {
  concurrencyRefusal,
  type EffectiveLimits,
  effectiveLimits,
  quotaRefusal,
  rateHeaders,
  rateRefusal,
  type Remaining,
  remainingOf,
  unpricedRefusal,
} from "./policy.ts";
import type { Snapshot } from "./user_states.ts";

export interface AdmitRequest {
  userId: string;
  /** The key the request came with ("default" or a connected app's id): usage is kept per key. */
  keyId?: string;
  /** The model as priced and recorded. */
  model: string;
  /** Tokens reserved against the quotas (prompt estimate and output allowance), 0 for none. */
  reserve: { prompt: number; output: number };
  /**
   * The key and user-state checks (and model allow-list) on each fresh read, before the limits;
   * throws an AppError to refuse. `headers` are the rate headers as they stand.
   */
  validate: (user: UserRecord | null, headers: Record<string, string>) => UserRecord;
  /**
   * Called when a snapshot admits the request with room to spare, before the admission commit is
   * sent (the gateway starts its upstream call then). The commit may still fail and the request
   * be refused after all: admit() rejecting is the last word.
   */
  onAdmitted?: () => void;
  /** The request waits for an upstream slot after admission (its model has a cap). */
  waitsForSlot?: boolean;
}

/** What an admission grants: the lease's fields. */
export interface Admitted {
  user: UserRecord;
  limits: EffectiveLimits;
  /** x-ratelimit-* headers after this request. */
  headers: Record<string, string>;
  remaining: Remaining;
  record: LeaseRecord;
}

export interface Decision {
  admitted: Admitted;
  /** The user's rate state after this request. */
  next: RateState;
  /** Sure enough to start the upstream call before the commit lands. */
  sure: boolean;
}

/** Decides one admission. `contended`: another process has been busy with the user lately. */
export function decideAdmission(
  config: Config,
  pricing: Pricing,
  req: AdmitRequest,
  snap: Snapshot,
  rate: RateState | null,
  now: number,
  contended: boolean,
): Decision | AppError {
  const user = snap.userEntry.value;
  const limits = effectiveLimits(config, user ?? { limits: {} });
  const state = withRefunds(rate ?? snap.rateEntry.value, snap.refunds, limits);
  const decision = decideRate(state, limits, now);
  const current = rateHeaders(limits, decision.before, now);
  let checked: UserRecord;
  try {
    checked = req.validate(user, current);
  } catch (err) {
    if (err instanceof AppError) return err;
    throw err;
  }
  if (limits.budgetUsdMonthly !== null && !priceOf(pricing, req.model)) {
    return unpricedRefusal(req.model, current);
  }
  if (!decision.allowed) {
    const dayLimit = decision.before.remainingDay < 1;
    return rateRefusal(limits, dayLimit, decision.retryAfter, now, current);
  }
  if (snap.held.count >= config.concurrencyLimit) {
    return concurrencyRefusal(config.concurrencyLimit, current);
  }
  // Without a quota nothing needs reserving (and the held sums are left alone).
  const reserveTokens = limits.tokensPerDay === null && limits.budgetUsdMonthly === null
    ? 0
    : req.reserve.prompt + req.reserve.output;
  const reserveNano = limits.budgetUsdMonthly === null ? 0 : Number(
    costNanoUsd(pricing, req.model, req.reserve.prompt, req.reserve.output),
  );
  const used = snap.used ?? { tokens: 0, nano: 0 };
  const refusal = quotaRefusal(limits, now, current, {
    usedTokens: used.tokens,
    usedNano: used.nano,
    heldTokens: snap.held.tokens,
    heldNano: snap.held.nano,
    reserveTokens,
    reserveNano,
    reserveOutput: req.reserve.output,
  });
  if (refusal) return refusal;
  const record: LeaseRecord = {
    userId: req.userId,
    model: req.model,
    tokens: reserveTokens,
    nano: reserveNano,
    prompt: req.reserve.prompt,
    completion: 0,
    at: now,
  };
  if (req.keyId && req.keyId !== DEFAULT_KEY_ID) record.keyId = req.keyId;
  if (req.waitsForSlot) record.waitsForSlot = true;
  const admitted: Admitted = {
    user: checked,
    limits,
    headers: rateHeaders(limits, decision.after, now),
    remaining: remainingOf(
      limits,
      decision.after,
      used.tokens + snap.held.tokens + reserveTokens,
      used.nano + snap.held.nano + reserveNano,
    ),
    record,
  };
  // Sure enough to start the upstream call before the commit lands: this process wrote the
  // user's entries last (decided on what it remembers, not on a read after a conflict or a
  // first contact), no other process has been busy with the user lately, and one more request
  // taking its share first would not change the answer. Near a limit, on first contact or under
  // contention, the call waits for the commit.
  const sure = snap.remembered && decision.after.remainingMinute >= 1 &&
    decision.after.remainingDay >= 1 &&
    snap.held.count + 2 <= config.concurrencyLimit &&
    !contended &&
    quotaRefusal(limits, now, current, {
        usedTokens: used.tokens,
        usedNano: used.nano,
        heldTokens: snap.held.tokens + reserveTokens,
        heldNano: snap.held.nano + reserveNano,
        reserveTokens,
        reserveNano,
        reserveOutput: req.reserve.output,
      }) === null;
  return { admitted, next: decision.next, sure };
}
