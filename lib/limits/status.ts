/**
 * The read model of the limits: a user's effective limits and what is left of them right now
 * (dashboard, GET /api/usage, refusals that consume nothing). Reads only; the Ledger writes.
 */
import type { Config } from "../core/config.ts";
import { keys, u64 } from "../core/kv.ts";
import { systemClock } from "../core/clock.ts";
import type { UserRecord } from "../identity/users.ts";
import { type RateState, type RateView, rateView, withRefunds } from "./gcra.ts";
import { HELD_FIELDS, usedKeys } from "./lease_record.ts";
import { type EffectiveLimits, effectiveLimits, type Remaining, remainingOf } from "./policy.ts";

export interface LimitStatus {
  limits: EffectiveLimits;
  remaining: Remaining;
  view: RateView;
  user: UserRecord | null;
}

/** The user's limits and what is left of them right now (one getMany of 8 keys). */
export async function limitStatus(
  kv: Deno.Kv,
  config: Config,
  userId: string,
  now: number = systemClock(),
): Promise<LimitStatus> {
  const [userEntry, rateEntry, refunds, _count, heldTokens, heldNano, tokens, spend] = await kv
    .getMany([
      keys.user(userId),
      keys.rate(userId),
      keys.rateRefunds(userId),
      ...HELD_FIELDS.map((f) => keys.leaseHeld(userId, f)),
      ...usedKeys(userId, now),
    ]);
  const user = userEntry.value as UserRecord | null;
  const limits = effectiveLimits(config, user ?? { limits: {} });
  const state = withRefunds(rateEntry.value as RateState | null, u64(refunds.value), limits);
  const view = rateView(state, limits, now);
  return {
    limits,
    remaining: remainingOf(
      limits,
      view,
      u64(tokens.value) + u64(heldTokens.value),
      u64(spend.value) + u64(heldNano.value),
    ),
    view,
    user,
  };
}
