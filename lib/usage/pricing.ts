/** GLM prices and cost arithmetic (CONTRACT §7). */
import { z } from "zod";

export const pricingSchema = z.record(
  z.string().min(1),
  z.object({
    input: z.number().finite().min(0),
    output: z.number().finite().min(0),
    /** Prompt tokens the upstream served from its cache; `input` when absent. */
    cachedInput: z.number().finite().min(0).optional(),
  }).strict(),
);

/** USD per million tokens, keyed by model; `"*"` is the fallback entry. */
export type Pricing = z.infer<typeof pricingSchema>;

/**
 * List prices in USD per million tokens (input, cached input, output) from Z.ai's pricing page,
 * https://docs.z.ai/guides/overview/pricing (read 2026-11; a cache hit is billed at a fifth of
 * the input price, https://docs.z.ai/help/faq). Override with the PRICING environment variable.
 */
const ZAI = (input: number, cachedInput: number, output: number) => ({
  input,
  cachedInput,
  output,
});

export const DEFAULT_PRICING: Pricing = {
  // Text models (docs.z.ai pricing page).
  "glm-5.1": ZAI(1.4, 0.26, 4.4),
  "glm-5": ZAI(1, 0.2, 3.2),
  "glm-5-turbo": ZAI(1.2, 0.24, 4),
  "glm-4.7": ZAI(0.6, 0.11, 2.2),
  "glm-4.7-flashx": ZAI(0.07, 0.01, 0.4),
  "glm-4.7-flash": ZAI(0, 0, 0), // free
  "glm-4.6": ZAI(0.6, 0.11, 2.2),
  "glm-4.5": ZAI(0.6, 0.11, 2.2),
  "glm-4.5-x": ZAI(2.2, 0.45, 8.9),
  "glm-4.5-air": ZAI(0.2, 0.03, 1.1),
  "glm-4.5-airx": ZAI(1.1, 0.22, 4.5),
  "glm-4.5-flash": ZAI(0, 0, 0), // free
  "glm-4-32b-0414-128k": { input: 0.1, output: 0.1 }, // no context caching
  // Vision models (same page).
  "glm-5v-turbo": ZAI(1.2, 0.24, 4),
  "glm-4.6v": ZAI(0.3, 0.05, 0.9),
  "glm-4.6v-flashx": ZAI(0.04, 0.004, 0.4),
  "glm-4.6v-flash": ZAI(0, 0, 0), // free
  "glm-4.5v": ZAI(0.6, 0.11, 1.8),
  // Older models still served: open.bigmodel.cn, ¥5/M converted at ≈ 7.1 CNY/USD; free.
  "glm-4-plus": { input: 0.7, output: 0.7 },
  "glm-4-flash": { input: 0, output: 0 },
  // Embeddings: open.bigmodel.cn lists Embedding-2 at ¥0.5/M (≈ $0.07); Z.ai publishes no USD
  // price for either, and none for Embedding-3, assumed here to cost what Embedding-2 does.
  "embedding-3": { input: 0.07, output: 0 },
  "embedding-2": { input: 0.07, output: 0 },
};

/**
 * Claude model names → GLM models, so Claude Code and other Anthropic clients work with their
 * default model names: Opus and Sonnet → the current flagship (GLM-5.1), Haiku (background and
 * small tasks) → the fast model Z.ai maps Haiku to (GLM-4.5-Air, https://docs.z.ai/devpack/tool/claude).
 */
export const DEFAULT_MODEL_ALIASES: Record<string, string> = {
  "claude-*opus*": "glm-5.1",
  "claude-*sonnet*": "glm-5.1",
  "claude-*haiku*": "glm-4.5-air",
};

/** The price entry for a model: its own, else `"*"`, else undefined (unpriced). */
export function priceOf(pricing: Pricing, model: string) {
  return pricing[model] ?? pricing["*"];
}

/**
 * Cost in USD of the given tokens; 0 for unpriced models. `cachedTokens` (of the prompt tokens)
 * are priced at the cached-input price where the table has one.
 */
export function costUsd(
  pricing: Pricing,
  model: string,
  promptTokens: number,
  completionTokens: number,
  cachedTokens = 0,
): number {
  const price = priceOf(pricing, model);
  if (!price) return 0;
  const cached = Math.min(cachedTokens, promptTokens);
  return ((promptTokens - cached) * price.input + cached * (price.cachedInput ?? price.input) +
    completionTokens * price.output) / 1_000_000;
}

/** Cost in nano-USD (integer), for KV sum counters that must not lose precision. */
export function costNanoUsd(
  pricing: Pricing,
  model: string,
  promptTokens: number,
  completionTokens: number,
  cachedTokens = 0,
): bigint {
  return BigInt(
    Math.round(costUsd(pricing, model, promptTokens, completionTokens, cachedTokens) * 1e9),
  );
}

/** Rounds a USD amount for display in JSON (to 1e-9, no float noise). */
export function roundUsd(usd: number): number {
  return Math.round(usd * 1e9) / 1e9;
}
