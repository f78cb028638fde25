/** POST /v1/chat/completions → GLM_BASE_URL/chat/completions (OpenAI's format, as GLM speaks it). */
import { z } from "zod";
import { invalidRequest } from "../../core/errors.ts";
import { estimatePromptTokens } from "../../usage/estimate.ts";
import { OpenAiMeter, openaiStreamError } from "./openai_usage.ts";
import { bearerToken, isObject, outputCap, type Protocol } from "../protocol.ts";

/** Only `model` and `messages` are checked; every other field passes through untouched. */
const schema = z.looseObject({
  model: z.string().min(1).max(200),
  messages: z.array(z.unknown()).min(1),
});

export const openaiChat: Protocol = {
  route: "/v1/chat/completions",
  body: schema,
  metered: true,
  relayedHeaders: ["accept"],
  upstreamUrl: (config) => `${config.glm.baseUrl}/chat/completions`,
  upstreamAuth: (key) => ({ authorization: `Bearer ${key}` }),
  meter: (sse) => new OpenAiMeter(sse),
  streamError: openaiStreamError,
  answerHeaders: () => ({}),
  apiKey: (headers) => bearerToken(headers.get("authorization")),
  parseBody(json) {
    // The schema's rules checked by hand (the hot path); zod words the refusal.
    if (
      isObject(json) && typeof json.model === "string" && json.model.length >= 1 &&
      json.model.length <= 200 && Array.isArray(json.messages) && json.messages.length >= 1
    ) {
      return {
        model: json.model,
        promptTokens: estimatePromptTokens(json, "openai"),
        outputCap: outputCap(json.max_tokens) ?? outputCap(json.max_completion_tokens),
        stream: json.stream === true,
      };
    }
    const parsed = schema.safeParse(json);
    if (!parsed.success) return invalidRequest(parsed.error.issues);
    return this.parseBody(parsed.data); // unreachable: the hand check accepts what zod does
  },
};
