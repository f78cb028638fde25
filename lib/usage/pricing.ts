/** GLM prices and cost arithmetic (CONTRACT §7). */
import { z } from "zod";

export const pricingSchema = z.record(
  z.string().min(1),
  z.object({ input: z.number().finite().min(0), output: z.number().finite().min(0) }).strict(),
);

/** USD per million tokens, keyed by model; `"*"` is the fallback entry. */
export type Pricing = z.infer<typeof pricingSchema>;

/**
 * List prices in USD per million tokens from Z.ai's public pricing page
 * (https://docs.z.ai/guides/overview/pricing, read 2026-11; glm-4-plus from open.bigmodel.cn,
 * ¥5/M converted at ≈7.1 CNY/USD). Cached-input discounts are not modelled: the gateway is
 * billed conservatively at the uncached rate. Override with the PRICING environment variable.
 */
export const DEFAULT_PRICING: Pricing = {
  "glm-4.7": { input: 0.6, output: 2.2 },
  "glm-4.6": { input: 0.6, output: 2.2 },
  "glm-4.5": { input: 0.6, output: 2.2 },
  "glm-4.5-x": { input: 2.2, output: 8.9 },
  "glm-4.5-air": { input: 0.2, output: 1.1 },
  "glm-4.5-airx": { input: 1.1, output: 4.5 },
  "glm-4.5-flash": { input: 0, output: 0 },
  "glm-4-plus": { input: 0.7, output: 0.7 },
  "glm-4-32b-0414-128k": { input: 0.1, output: 0.1 },
  "glm-4-flash": { input: 0, output: 0 },
};

/** The price entry for a model: its own, else `"*"`, else undefined (unpriced). */
export function priceOf(pricing: Pricing, model: string) {
  return pricing[model] ?? pricing["*"];
}

/** Cost in USD of the given tokens; 0 for unpriced models. */
export function costUsd(
  pricing: Pricing,
  model: string,
  promptTokens: number,
  completionTokens: number,
): number {
  const price = priceOf(pricing, model);
  if (!price) return 0;
  return (promptTokens * price.input + completionTokens * price.output) / 1_000_000;
}

/** Cost in nano-USD (integer), for KV sum counters that must not lose precision. */
export function costNanoUsd(
  pricing: Pricing,
  model: string,
  promptTokens: number,
  completionTokens: number,
): bigint {
  return BigInt(Math.round(costUsd(pricing, model, promptTokens, completionTokens) * 1e9));
}

/** Rounds a USD amount for display in JSON (to 1e-9, no float noise). */
export function roundUsd(usd: number): number {
  return Math.round(usd * 1e9) / 1e9;
}
