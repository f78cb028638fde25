/**
 * A settlement's mutations (the Ledger's commit, lib/limits/admission.ts): the lease gone, its
 * reservation given back, its upstream slot freed and its usage charged — or, for a lease a
 * reaper took already, only what goes beyond what the reaper charged.
 */
import { keys } from "../core/kv.ts";
import type { Pricing } from "../usage/pricing.ts";
import { addSum, addUsageSums, type UsageSums } from "../usage/record.ts";
import type { Charge } from "./charge.ts";
import type { HeldLease } from "./lease.ts";
import { type Held, type LeaseRecord, refundable, slotCounters } from "./lease_record.ts";

export interface SettlementContext {
  now: number;
  /** The commit's usage sums, shared by its operations. */
  sums: UsageSums;
  /** Adds to a user's held sums (as written, and as later admissions of the batch see them). */
  addHeld: (userId: string, d: Held) => void;
  pricing: Pricing;
  /** The process the lease lives under. */
  procId: string;
  /** The lease's entry in KV, when it was read (a guarded retry): the slot it records. */
  inKv?: LeaseRecord | null;
}

export function planSettlement(
  op: Deno.AtomicOperation,
  lease: HeldLease,
  c: Charge,
  ctx: SettlementContext,
) {
  const { now, sums, addHeld, inKv } = ctx;
  const r = lease.record;
  const { slot, slotKey } = inKv?.slot ? inKv : r;
  const base = { userId: r.userId, model: r.model, at: now, keyId: r.keyId };
  if (lease.lost) {
    // Reaped already (charged its estimate as of its last renewal, its upstream slot freed):
    // only the rest.
    if (c.spared) return;
    const prompt = Math.max(0, c.promptTokens - r.prompt);
    addUsageSums(sums, ctx.pricing, {
      ...base,
      promptTokens: prompt,
      completionTokens: Math.max(0, c.completionTokens - lease.committedCompletion),
      cachedTokens: Math.min(prompt, c.cachedTokens ?? 0),
      requests: 0,
    });
    return;
  }
  op.delete(keys.lease(ctx.procId, lease.id));
  addHeld(r.userId, { count: -1, tokens: -r.tokens, nano: -r.nano });
  if (slot) { for (const k of slotCounters(slot, r.userId, slotKey)) addSum(sums, k, -1); }
  if (c.spared) {
    // Not the user's doing: the request is given back to its limits, and nothing is recorded.
    if (refundable(r, now)) addSum(sums, keys.rateRefunds(r.userId), 1);
    return;
  }
  addUsageSums(sums, ctx.pricing, {
    ...base,
    promptTokens: c.promptTokens,
    completionTokens: c.completionTokens,
    cachedTokens: c.cachedTokens,
    requests: 1,
  });
}
