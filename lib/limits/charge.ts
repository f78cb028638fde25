/** What a settled request is charged, by how its answer ended (CONTRACT §5 "Quotas are reserved"). */
import type { TokenUsage } from "../usage/record.ts";

export type Outcome =
  /** The answer was relayed to its end. */
  | "complete"
  /** The upstream stream broke or stalled mid-answer. */
  | "cut"
  /** The client left. */
  | "cancelled"
  /** No answer in time (the upstream may have processed the prompt). */
  | "timeout"
  /** The upstream refused the request (an error status): nothing was generated. */
  | "refused"
  /** The client left before the request reached the upstream (it waited for a slot). */
  | "left"
  /**
   * Not served for reasons that are not the user's (no upstream slot in time, GLM throttling,
   * the operator's GLM account refused, an upstream 5xx, the upstream unreachable): nothing is
   * counted, and the request allowance is given back.
   */
  | "not_served";

/** What a request is charged. */
export interface Charge {
  promptTokens: number;
  completionTokens: number;
  /** Of the prompt tokens, those the upstream served from its cache. */
  cachedTokens?: number;
  /** True when no `usage` was metered and the charge is the estimate. */
  estimated: boolean;
  /** Not counted at all: the request allowance is given back (outcome "not_served"). */
  spared?: boolean;
}

/**
 * The charge for an answer: its metered usage when there is one; otherwise the prompt estimate
 * plus the completion estimated from what was relayed when the upstream got the request and did
 * not refuse it, and nothing when it never got it or refused it.
 */
export function chargeFor(
  usage: TokenUsage | null,
  outcome: Outcome,
  promptEstimate: number,
  relayedTokens: number,
): Charge {
  if (outcome === "not_served") {
    return { promptTokens: 0, completionTokens: 0, estimated: false, spared: true };
  }
  if (usage) return { ...usage, estimated: false };
  if (outcome === "refused" || outcome === "left") {
    return { promptTokens: 0, completionTokens: 0, estimated: false };
  }
  return { promptTokens: promptEstimate, completionTokens: relayedTokens, estimated: true };
}
