/**
 * POST /v1/messages → GLM_ANTHROPIC_BASE_URL/v1/messages (Anthropic's Messages API, as Z.ai serves
 * it for Claude Code). The caller's key comes as `x-api-key` (ANTHROPIC_API_KEY) or as a Bearer
 * token (ANTHROPIC_AUTH_TOKEN); `anthropic-version` and `anthropic-beta` are relayed.
 */
import { z } from "zod";
import { invalidRequest } from "../../core/errors.ts";
import { estimatePromptTokens } from "../../usage/estimate.ts";
import { AnthropicMeter, anthropicStreamError } from "./anthropic_usage.ts";
import { bearerToken, isObject, outputCap, type Protocol } from "../protocol.ts";

const schema = z.looseObject({
  model: z.string().min(1).max(200),
  messages: z.array(z.unknown()).min(1),
  max_tokens: z.number().int().min(1),
});

/** `x-api-key`, else a Bearer token. */
export const anthropicKey = (headers: Headers) =>
  headers.get("x-api-key")?.trim() || bearerToken(headers.get("authorization"));

const RELAYED = ["accept", "anthropic-version", "anthropic-beta"] as const;

export const anthropicMessages: Protocol = {
  route: "/v1/messages",
  body: schema,
  metered: true,
  relayedHeaders: RELAYED,
  upstreamUrl: (config) => `${config.glm.anthropicBaseUrl}/v1/messages`,
  upstreamAuth: (key) => ({ "x-api-key": key, authorization: `Bearer ${key}` }),
  meter: (sse) => new AnthropicMeter(sse),
  streamError: anthropicStreamError,
  // Where the Anthropic SDK looks for it (_request_id, error.requestID).
  answerHeaders: (requestId) => ({ "request-id": requestId }),
  apiKey: anthropicKey,
  parseBody(json) {
    if (
      isObject(json) && typeof json.model === "string" && json.model.length >= 1 &&
      json.model.length <= 200 && Array.isArray(json.messages) && json.messages.length >= 1 &&
      typeof json.max_tokens === "number" && Number.isSafeInteger(json.max_tokens) &&
      json.max_tokens >= 1
    ) {
      return {
        model: json.model,
        promptTokens: estimatePromptTokens(json, "anthropic"),
        outputCap: outputCap(json.max_tokens),
        stream: json.stream === true,
      };
    }
    const parsed = schema.safeParse(json);
    if (!parsed.success) return invalidRequest(parsed.error.issues);
    return this.parseBody(parsed.data);
  },
};

const countSchema = z.looseObject({
  model: z.string().min(1).max(200),
  messages: z.array(z.unknown()),
});

/** POST /v1/messages/count_tokens: relayed, not metered, not counted against limits. */
export const anthropicCountTokens: Protocol = {
  route: "/v1/messages/count_tokens",
  body: countSchema,
  metered: false,
  relayedHeaders: RELAYED,
  upstreamUrl: (config) => `${config.glm.anthropicBaseUrl}/v1/messages/count_tokens`,
  upstreamAuth: (key) => ({ "x-api-key": key, authorization: `Bearer ${key}` }),
  meter: (sse) => new AnthropicMeter(sse),
  streamError: anthropicStreamError,
  // Where the Anthropic SDK looks for it (_request_id, error.requestID).
  answerHeaders: (requestId) => ({ "request-id": requestId }),
  apiKey: anthropicKey,
  parseBody(json) {
    const parsed = countSchema.safeParse(json);
    if (!parsed.success) return invalidRequest(parsed.error.issues);
    return { model: parsed.data.model, promptTokens: 0, outputCap: 0 };
  },
};
