/** Where OpenAI's (and GLM's) answers carry usage: `usage`, in the last SSE chunk for streams. */
import type { TokenUsage } from "../../usage/record.ts";
import { badCount, count, UsageMeter } from "../meter.ts";

/**
 * Token usage from an OpenAI/GLM `usage` object, or null when it is not one: an object whose
 * `prompt_tokens`, `completion_tokens` and `total_tokens` are each absent or a count (checked by
 * hand — it runs once per answer on the hot path). Cached prompt tokens come from
 * `prompt_tokens_details.cached_tokens`.
 */
function usageFrom(value: unknown): TokenUsage | null {
  if (typeof value !== "object" || value === null || Array.isArray(value)) return null;
  const { prompt_tokens, completion_tokens, total_tokens, prompt_tokens_details } = value as Record<
    string,
    unknown
  >;
  if (badCount(prompt_tokens) || badCount(completion_tokens) || badCount(total_tokens)) {
    return null;
  }
  if (prompt_tokens === undefined && completion_tokens === undefined) return null;
  const prompt = (prompt_tokens as number | undefined) ?? 0;
  const total = (total_tokens as number | undefined) ?? prompt;
  const usage: TokenUsage = {
    promptTokens: prompt,
    completionTokens: (completion_tokens as number | undefined) ?? Math.max(0, total - prompt),
  };
  const cached = typeof prompt_tokens_details === "object" && prompt_tokens_details !== null
    ? Math.min(prompt, count((prompt_tokens_details as Record<string, unknown>).cached_tokens))
    : 0;
  if (cached) usage.cachedTokens = cached;
  return usage;
}

/** OpenAI's stream: the last `data:` line holding a usage object (parsed once, at the end). */
export class OpenAiMeter extends UsageMeter {
  protected readonly endMark = "[DONE]";
  protected readonly endEvent = /(?:^|\n)data: ?\[DONE\]/;
  private lastUsageLine: string | null = null;

  protected considerLine(line: string) {
    this.lastUsageLine = line;
  }

  protected streamUsage(): TokenUsage | null {
    if (!this.lastUsageLine) return null;
    try {
      return usageFrom(JSON.parse(this.lastUsageLine.slice(5)).usage);
    } catch {
      return null;
    }
  }

  protected jsonUsage(usage: unknown): TokenUsage | null {
    return usageFrom(usage);
  }
}

/** An OpenAI-format SSE event that ends a cut stream. */
export function openaiStreamError(code: string, message: string): Uint8Array {
  return new TextEncoder().encode(
    `data: ${JSON.stringify({ error: { code, type: code, message } })}\n\n`,
  );
}
