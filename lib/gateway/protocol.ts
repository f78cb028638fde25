/**
 * The Protocol seam: one module per gateway endpoint (lib/gateway/protocols/), each owning where
 * its caller's key comes from, its body's schema and token estimate, its upstream URL and how its
 * answers carry usage. The gateway serves them all one way: auth → admit → forward → settle.
 */
import type { z } from "zod";
import type { Config } from "../core/config.ts";
import type { AppError } from "../core/errors.ts";
import type { UsageMeter } from "./meter.ts";

/** What the gateway needs from a request body. */
export interface ParsedRequest {
  /** The model as the client named it (aliases and case are resolved by the gateway). */
  model: string;
  /** Estimated prompt tokens (lib/usage/estimate.ts). */
  promptTokens: number;
  /** The answer's output cap (`max_tokens`…) when the body sets one; 0 for no output at all. */
  outputCap: number | null;
  /** The answer is asked for as a stream (`"stream": true`): an SSE answer. */
  stream?: boolean;
}

export interface Protocol {
  /** The route, as logs name it. */
  readonly route: string;
  /** The body's schema (what parseBody checks), for the OpenAPI document. */
  readonly body: z.ZodType;
  /** Counted against the limits and metered; count_tokens is neither. */
  readonly metered: boolean;
  /** Request headers relayed upstream (the operator's key replaces the caller's). */
  readonly relayedHeaders: readonly string[];
  upstreamUrl(config: Config): string;
  /** The operator's key as this upstream takes it. */
  upstreamAuth(masterKey: string): Record<string, string>;
  /** The caller's key as sent, or null. */
  apiKey(headers: Headers): string | null;
  /** Checks the parsed body; a refusal names the field. */
  parseBody(json: unknown): ParsedRequest | AppError;
  /** A meter for one answer: where this format puts its usage and its end event. */
  meter(sse: boolean): UsageMeter;
  /** The SSE event that ends a cut stream, in this format's error shape. */
  streamError(code: string, message: string): Uint8Array;
  /** Headers this format's answers carry besides Keyway's own. */
  answerHeaders(requestId: string): Record<string, string>;
}

/** The token of `Authorization: Bearer <token>`, or null. */
export function bearerToken(authorization: string | null | undefined): string | null {
  if (!authorization) return null;
  const space = authorization.indexOf(" ");
  if (space < 0 || authorization.slice(0, space).toLowerCase() !== "bearer") return null;
  return authorization.slice(space + 1).trim();
}

/** An output cap as the upstream would take it, or null (absent or not a count). */
export const outputCap = (v: unknown): number | null =>
  typeof v === "number" && Number.isSafeInteger(v) && v >= 0 ? v : null;

export const isObject = (v: unknown): v is Record<string, unknown> =>
  typeof v === "object" && v !== null && !Array.isArray(v);
