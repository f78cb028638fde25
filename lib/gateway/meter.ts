/**
 * The meter: watches an answer's relayed bytes for its `usage`, for the end of an SSE answer and
 * for how much was generated. What is common to every wire format lives here — SSE lines split
 * incrementally across chunk boundaries, JSON answers kept (by reference) and parsed once
 * complete, the generated text estimated chunk by chunk. Where a format puts its usage is its
 * protocol's own (lib/gateway/protocols/*_usage.ts).
 */
import { concatBytes } from "../core/encoding.ts";
import { estimateRelayedTokens } from "../usage/estimate.ts";
import type { TokenUsage } from "../usage/record.ts";

/** JSON answers up to this size are parsed whole for `usage`; larger ones are scanned. */
const FULL_PARSE_BYTES = 1024 * 1024;
/** JSON answers larger than this are relayed without metering tokens. */
const MAX_METERED_JSON_BYTES = 16 * 1024 * 1024;
/** An SSE line longer than this cannot be a usage chunk worth keeping. */
const MAX_SSE_LINE = 1024 * 1024;

const decoder = new TextDecoder();
const USAGE_OBJECT = /"usage"\s*:\s*\{/g;

/** Whether an SSE `data:` line holds a usage object. */
function hasUsageObject(line: string): boolean {
  USAGE_OBJECT.lastIndex = 0;
  return USAGE_OBJECT.test(line);
}

export abstract class UsageMeter {
  private readonly text = new TextDecoder();
  private carry = "";
  private chunks: Uint8Array[] | null = [];
  private size = 0;
  private whole: string | null = null;
  /** Completion tokens estimated from the SSE text relayed so far. */
  protected relayed = 0;
  /** SSE: the end event has been seen (what follows it is not part of the answer). */
  ended = false;

  /** The end event's text, cheap to look for in every chunk; endEvent confirms it. */
  protected abstract readonly endMark: string;
  protected abstract readonly endEvent: RegExp;
  /** An SSE `data:` line that holds a usage object. */
  protected abstract considerLine(line: string): void;
  /** The stream's usage as seen so far (the end, or a cut). */
  protected abstract streamUsage(): TokenUsage | null;
  /** A JSON answer's usage from its `usage` value. */
  protected abstract jsonUsage(usage: unknown): TokenUsage | null;

  constructor(private readonly sse: boolean) {}

  push(chunk: Uint8Array) {
    if (!this.sse) {
      if (!this.chunks) return;
      this.size += chunk.byteLength;
      if (this.size > MAX_METERED_JSON_BYTES) this.chunks = null;
      else this.chunks.push(chunk);
      return;
    }
    const piece = this.text.decode(chunk, { stream: true });
    this.relayed += estimateRelayedTokens(piece);
    const text = this.carry + piece;
    // The end event, not those characters inside generated text (JSON escapes newlines).
    if (piece.includes(this.endMark) && this.endEvent.test(text)) this.ended = true;
    // Cheap on the hot path: one indexOf for "usage" per chunk, lines cut only where needed.
    let usageAt = text.indexOf('"usage"');
    let start = 0;
    let nl: number;
    while ((nl = text.indexOf("\n", start)) !== -1) {
      if (usageAt !== -1 && usageAt < nl) {
        this.consider(text.slice(start, nl));
        usageAt = text.indexOf('"usage"', nl + 1);
      }
      start = nl + 1;
    }
    this.carry = start === 0 ? text : text.slice(start);
    if (this.carry.length > MAX_SSE_LINE) this.carry = "";
  }

  private consider(raw: string) {
    const line = raw.trim();
    if (line.startsWith("data:") && hasUsageObject(line)) this.considerLine(line);
  }

  /** The JSON answer's text so far (decoded once). */
  private jsonText(): string | null {
    if (this.whole === null && this.chunks) {
      this.whole = decoder.decode(concatBytes(this.chunks, this.size));
      this.chunks = null;
    }
    return this.whole;
  }

  /** Completion tokens estimated from the generated text relayed so far. */
  relayedTokens(): number {
    if (this.sse) return this.relayed;
    const text = this.jsonText();
    return text === null ? 0 : estimateRelayedTokens(text);
  }

  /** The usage seen so far (complete answers and streams cut mid-way alike). */
  usage(): TokenUsage | null {
    if (this.sse) {
      if (this.carry.includes('"usage"')) this.consider(this.carry);
      this.carry = "";
      return this.streamUsage();
    }
    const text = this.jsonText();
    if (text === null) return null;
    let usage: unknown;
    if (this.size <= FULL_PARSE_BYTES) {
      try {
        usage = JSON.parse(text)?.usage;
      } catch {
        return null;
      }
    } else usage = scanUsage(text);
    return this.jsonUsage(usage);
  }
}

/** A count as `z.number().int().min(0).optional()` allows it: absent or a non-negative integer. */
export const badCount = (v: unknown) =>
  v !== undefined && !(typeof v === "number" && Number.isSafeInteger(v) && v >= 0);

export const count = (v: unknown): number =>
  typeof v === "number" && Number.isSafeInteger(v) && v >= 0 ? v : 0;

/** Finds the last `"usage": {…}` object in a large JSON text and parses just that object. */
function scanUsage(text: string): unknown {
  let at = -1;
  for (const m of text.matchAll(USAGE_OBJECT)) at = m.index + m[0].length - 1;
  if (at < 0) return null;
  let depth = 0;
  for (let i = at; i < text.length && i < at + 4096; i++) {
    const ch = text[i];
    if (ch === "{") depth++;
    else if (ch === "}" && --depth === 0) {
      try {
        return JSON.parse(text.slice(at, i + 1));
      } catch {
        return null;
      }
    }
  }
  return null;
}
