/**
 * The Lease: an admitted request's hold on its slot and reservation (admission.ts admits and
 * settles it). Sealed: outside lib/limits a lease is the Lease interface — what was relayed, and
 * one settlement; its state is written by the Ledger alone.
 */
import type { UserRecord } from "../identity/users.ts";
import { DEFAULT_KEY_ID } from "../identity/user_record.ts";
import type { TokenUsage } from "../usage/record.ts";
import type { Charge, Outcome } from "./charge.ts";
import type { LeaseRecord } from "./lease_record.ts";
import type { RequestFacts } from "../observe/request_log.ts";
import { type EffectiveLimits, givenBackHeader, type Remaining } from "./policy.ts";

/** Who settles a lease (the Ledger). */
export interface LeaseSettler {
  settle(
    lease: HeldLease,
    usage: TokenUsage | null,
    outcome: Outcome,
    facts?: RequestFacts,
  ): Promise<Charge>;
}

/**
 * An admitted request: holds its slot and reservation until settled. Sealed: its state is the
 * Ledger's; the gateway reports what it relayed and settles it, once.
 */
export interface Lease {
  readonly id: string;
  readonly user: UserRecord;
  /** The key the request came with: "default", or a connected app's `k_…` id. */
  readonly keyId: string;
  readonly limits: EffectiveLimits;
  readonly remaining: Remaining;
  readonly model: string;
  readonly promptEstimate: number;
  /** x-ratelimit-* headers for the answer (a request given back shows as not taken). */
  readonly headers: Record<string, string>;
  /** Reaped while this process was stalled: its reservation was given back, estimate charged. */
  readonly lost: boolean;
  /** Completion tokens estimated from what has been relayed so far (what a reaper charges). */
  relayed(tokens: number): void;
  /**
   * Replaces the reservation with what was used and frees the slot: one atomic commit. Once per
   * lease; later calls get the first call's promise. Resolves to what was charged. `facts`: the
   * request log's entry is written in the same commit.
   */
  settle(usage: TokenUsage | null, outcome: Outcome, facts?: RequestFacts): Promise<Charge>;
  /** The answer's headers say the request is given back (its settlement will not count it). */
  giveBack(): void;
}

/** The Ledger's lease: every field below is written by the Ledger alone. */
export class HeldLease implements Lease {
  relayedTokens = 0;
  /** The completion estimate in KV: what a reaper charges if this process dies. */
  committedCompletion = 0;
  lost = false;
  /** Its settlement has been asked for (renewals leave it alone). */
  closing = false;
  /**
   * Its entry in KV may not be what this process holds, or may not exist (a commit that threw
   * and may have landed): its settlement reads the entry first and frees what that says.
   */
  uncertain = false;
  settling: Promise<Charge> | null = null;

  constructor(
    readonly id: string,
    readonly user: UserRecord,
    readonly limits: EffectiveLimits,
    public headers: Record<string, string>,
    readonly remaining: Remaining,
    readonly record: LeaseRecord,
    private readonly ledger: LeaseSettler,
  ) {}

  get model(): string {
    return this.record.model;
  }

  get keyId(): string {
    return this.record.keyId ?? DEFAULT_KEY_ID;
  }

  get promptEstimate(): number {
    return this.record.prompt;
  }

  relayed(tokens: number): void {
    this.relayedTokens = tokens;
  }

  settle(usage: TokenUsage | null, outcome: Outcome, facts?: RequestFacts): Promise<Charge> {
    return this.ledger.settle(this, usage, outcome, facts);
  }

  giveBack(): void {
    this.headers = { ...this.headers, ...givenBackHeader(this.limits, this.remaining) };
  }
}
