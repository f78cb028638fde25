/**
 * Where Anthropic's answers carry usage: `message_start`'s and every `message_delta`'s `usage`
 * (streams), or the message's `usage` (JSON). As in Anthropic's API, `input_tokens` excludes
 * cached tokens: prompt tokens = input + cache read + cache creation, of which cache reads are
 * cached.
 */
import type { TokenUsage } from "../../usage/record.ts";
import { count, UsageMeter } from "../meter.ts";

/** Anthropic's usage fields, as the largest value seen of each. */
interface AnthropicCounts {
  input: number;
  output: number;
  cacheRead: number;
  cacheCreation: number;
  seen: boolean;
}

/** Folds an Anthropic `usage` object into `into` (the largest value of each field wins). */
function foldAnthropic(into: AnthropicCounts, value: unknown) {
  if (typeof value !== "object" || value === null || Array.isArray(value)) return;
  const u = value as Record<string, unknown>;
  into.input = Math.max(into.input, count(u.input_tokens));
  into.output = Math.max(into.output, count(u.output_tokens));
  into.cacheRead = Math.max(into.cacheRead, count(u.cache_read_input_tokens));
  into.cacheCreation = Math.max(into.cacheCreation, count(u.cache_creation_input_tokens));
  into.seen = true;
}

function fromAnthropic(c: AnthropicCounts): TokenUsage | null {
  if (!c.seen) return null;
  const usage: TokenUsage = {
    promptTokens: c.input + c.cacheRead + c.cacheCreation,
    completionTokens: c.output,
  };
  if (c.cacheRead) usage.cachedTokens = c.cacheRead;
  return usage;
}

/**
 * Folds the usage of `message_start` and of every `message_delta` (the largest value of each
 * field wins: GLM may report 0 input tokens at the start and the real counts at the end).
 */
export class AnthropicMeter extends UsageMeter {
  protected readonly endMark = "message_stop";
  protected readonly endEvent = /(?:^|\n)(?:event: ?message_stop|data: ?\{"type": ?"message_stop")/;
  private readonly counts: AnthropicCounts = {
    input: 0,
    output: 0,
    cacheRead: 0,
    cacheCreation: 0,
    seen: false,
  };
  /** A `message_delta` has brought the answer's counts (not just the start's). */
  private final = false;

  protected considerLine(line: string) {
    try {
      const event = JSON.parse(line.slice(5));
      foldAnthropic(this.counts, event?.message?.usage ?? event?.usage);
      if (event?.type === "message_delta") this.final = true;
    } catch { /* not an event of ours */ }
  }

  protected streamUsage(): TokenUsage | null {
    const usage = fromAnthropic(this.counts);
    if (!usage || this.final) return usage;
    // Cut before any message_delta: message_start's counts are not the answer's (GLM reports
    // 0 input tokens there, and 0 or 1 output). With no input count the estimate charges it;
    // otherwise what was relayed counts as generated.
    if (usage.promptTokens === 0) return null;
    return { ...usage, completionTokens: Math.max(usage.completionTokens, this.relayed) };
  }

  protected jsonUsage(usage: unknown): TokenUsage | null {
    const counts = { ...this.counts };
    foldAnthropic(counts, usage);
    return fromAnthropic(counts);
  }
}

/** An Anthropic-format SSE error event that ends a cut stream. */
export function anthropicStreamError(_code: string, message: string): Uint8Array {
  return new TextEncoder().encode(
    `event: error\ndata: ${
      JSON.stringify({ type: "error", error: { type: "api_error", message } })
    }\n\n`,
  );
}
