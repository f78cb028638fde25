/** Every gateway endpoint (CONTRACT §5, the gateway table). */
import type { Protocol } from "../protocol.ts";
import { anthropicCountTokens, anthropicMessages } from "./anthropic_messages.ts";
import { openaiChat } from "./openai_chat.ts";
import { openaiEmbeddings } from "./openai_embeddings.ts";

export const PROTOCOLS: readonly Protocol[] = [
  openaiChat,
  openaiEmbeddings,
  anthropicMessages,
  anthropicCountTokens,
];
