/**
 * A gateway request's body: read up to its limit (MAX_REQUEST_BYTES; refused unread when the
 * declared length is over it), parsed, checked for duplicate keys (what is forwarded must be what was checked) and by its
 * protocol's schema; and the body with an alias resolved.
 */
import { concatBytes, jsonStructureProblem, withTopLevelString } from "../core/encoding.ts";
import { AppError } from "../core/errors.ts";
import type { ParsedRequest, Protocol } from "./protocol.ts";

const decoder = new TextDecoder();

export type RequestBody = ParsedRequest & { bytes: Uint8Array<ArrayBuffer> };

/**
 * Reads and checks the request body, at most `maxBytes` of it; a problem is returned (not thrown)
 * to keep the order.
 */
export async function readBody(
  req: Request,
  protocol: Protocol,
  maxBytes: number,
): Promise<RequestBody | AppError> {
  let bytes: Uint8Array<ArrayBuffer> | null;
  try {
    bytes = await readCapped(req, maxBytes);
  } catch {
    return new AppError("invalid_request", "body: could not be read");
  }
  if (!bytes) return tooLarge(maxBytes);
  let json: unknown;
  const text = decoder.decode(bytes);
  try {
    json = JSON.parse(text);
  } catch {
    return new AppError("invalid_request", "body: not valid JSON");
  }
  // What is forwarded must be what was checked (JSON.parse keeps the last of two keys), and
  // nothing deeper than 64 levels is walked.
  const problem = jsonStructureProblem(text);
  if (problem !== null) return new AppError("invalid_request", `body: ${problem}`);
  const parsed = protocol.parseBody(json);
  return parsed instanceof AppError ? parsed : { ...parsed, bytes };
}

/**
 * The body with its top-level `model` replaced (an alias or a differently cased id resolved),
 * every other byte as the client sent it (a `seed` beyond 2^53, `1.0`, `\u00e9` stay as written).
 */
export function withModel(bytes: Uint8Array<ArrayBuffer>, model: string): Uint8Array<ArrayBuffer> {
  const text = withTopLevelString(decoder.decode(bytes), "model", model);
  if (text === null) throw new Error("withModel: the body has no top-level model string");
  return new TextEncoder().encode(text) as Uint8Array<ArrayBuffer>;
}

/** A body over `maxBytes`: 413, the limit said in MiB. */
export const tooLarge = (maxBytes: number) =>
  new AppError("payload_too_large", `Request body is larger than ${inMiB(maxBytes)}.`);

/** A byte count in MiB for people: "32 MiB", "0.19 MiB". */
export const inMiB = (bytes: number) => `${Math.round(bytes / 1024 / 1024 * 100) / 100} MiB`;

/** The body length the request declares, or null when it is chunked or does not say. */
export function declaredLength(req: Request): number | null {
  const declared = req.headers.get("content-length");
  return declared === null || req.headers.has("transfer-encoding") ? null : Number(declared);
}

/**
 * The body, or null when it is longer than `max` bytes. A declared length is trusted (the
 * runtime enforces it); a chunked body is read chunk by chunk and given up at the limit.
 */
async function readCapped(req: Request, max: number): Promise<Uint8Array<ArrayBuffer> | null> {
  if (!req.body) return new Uint8Array(0);
  if (declaredLength(req) !== null) {
    const bytes = new Uint8Array(await req.arrayBuffer());
    return bytes.byteLength > max ? null : bytes;
  }
  const chunks: Uint8Array[] = [];
  let size = 0;
  for await (const chunk of req.body) {
    size += chunk.byteLength;
    if (size > max) return null;
    chunks.push(chunk);
  }
  return concatBytes(chunks, size);
}
