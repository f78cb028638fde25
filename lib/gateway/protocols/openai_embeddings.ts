/** POST /v1/embeddings → GLM_BASE_URL/embeddings: usage from the JSON answer, no output tokens. */
import { z } from "zod";
import { invalidRequest } from "../../core/errors.ts";
import { estimatePromptTokens } from "../../usage/estimate.ts";
import { OpenAiMeter, openaiStreamError } from "./openai_usage.ts";
import { bearerToken, type Protocol } from "../protocol.ts";

const schema = z.looseObject({
  model: z.string().min(1).max(200),
  input: z.union([
    z.string(),
    z.array(z.string()).min(1),
    z.array(z.number().int()).min(1),
    z.array(z.array(z.number().int()).min(1)).min(1),
  ], { message: "must be a string, an array of strings, or token arrays" }),
});

export const openaiEmbeddings: Protocol = {
  route: "/v1/embeddings",
  body: schema,
  metered: true,
  relayedHeaders: ["accept"],
  upstreamUrl: (config) => `${config.glm.baseUrl}/embeddings`,
  upstreamAuth: (key) => ({ authorization: `Bearer ${key}` }),
  meter: (sse) => new OpenAiMeter(sse),
  streamError: openaiStreamError,
  answerHeaders: () => ({}),
  apiKey: (headers) => bearerToken(headers.get("authorization")),
  parseBody(json) {
    const parsed = schema.safeParse(json);
    if (!parsed.success) return invalidRequest(parsed.error.issues);
    const { model, input } = parsed.data;
    // Token arrays are their own count; text is estimated.
    const tokens = typeof input === "string"
      ? estimatePromptTokens({ input })
      : input.reduce((n: number, item: string | number | number[]) =>
        n + (typeof item === "string"
          ? estimatePromptTokens({ input: item })
          : Array.isArray(item)
          ? item.length
          : 1), 0);
    return { model, promptTokens: tokens, outputCap: 0 };
  },
};
