/**
 * The relay's parts: reading the upstream's body chunk by chunk, the watchdog on its silences,
 * and the meter that finds `usage`, the end of an SSE answer and how much was generated.
 */
import { concatBytes } from "../core/encoding.ts";
import { estimateRelayedTokens } from "../usage/estimate.ts";
import type { TokenUsage } from "../usage/usage.ts";
import type { WireFormat } from "./protocol.ts";

/** Bodies the relay reads at once at most (a declared length is read into one buffer up to this). */
const MAX_READ_BYTES = 1024 * 1024;
/** JSON answers up to this size are parsed whole for `usage`; larger ones are scanned. */
const FULL_PARSE_BYTES = 1024 * 1024;
/** JSON answers larger than this are relayed without metering tokens. */
const MAX_METERED_JSON_BYTES = 16 * 1024 * 1024;
/** An SSE line longer than this cannot be a usage chunk worth keeping. */
const MAX_SSE_LINE = 1024 * 1024;

const decoder = new TextDecoder();

/** What the relay was waiting for when its watchdog fired. */
/** Why an answer is cut: a silent upstream or client, STREAM_MAX_MS, or the server stopping. */
export type Stall = "upstream" | "client" | "deadline" | "shutdown";

/**
 * The relay's watchdog. Calls `onStall` once, when one wait lasts `ms` — for the upstream (its
 * headers, then each read of its body) or for the client (between a chunk handed over and its
 * next read: a client that reads nothing holds the upstream call and its slots) — or when the
 * whole answer has taken `maxMs`. One timer per request, re-armed only when it fires, so each
 * step costs a clock read, not a timer.
 */
export class IdleTimer {
  private since = performance.now();
  private readonly deadline: number;
  private phase: "upstream" | "client" = "upstream";
  private timer: ReturnType<typeof setTimeout> | undefined;

  constructor(
    private readonly ms: number,
    maxMs: number,
    private readonly onStall: (stall: Stall) => void,
    started = this.since,
  ) {
    this.deadline = started + maxMs;
    this.arm(Math.min(ms, this.deadline - this.since));
  }

  /** A read from the upstream starts: the clock runs from now. */
  wait() {
    this.since = performance.now();
    this.phase = "upstream";
  }

  /** A read is over: now the client's turn to ask for more. */
  rest() {
    this.since = performance.now();
    this.phase = "client";
  }

  stop() {
    clearTimeout(this.timer);
    this.timer = undefined;
  }

  /** Fires now, as if the wait had run out (the server is shutting down). */
  fire(stall: Stall) {
    this.stop();
    this.onStall(stall);
  }

  private arm(delay: number) {
    this.timer = setTimeout(() => {
      const now = performance.now();
      if (now >= this.deadline) return this.onStall("deadline");
      const quiet = now - this.since;
      if (quiet >= this.ms) return this.onStall(this.phase);
      this.arm(Math.min(this.ms - quiet, this.deadline - now));
    }, Math.max(0, delay));
  }
}

/** Read buffer for bodies of unknown length (SSE events are small; a busy stream fills more). */
const STREAM_READ_BYTES = 16 * 1024;

/**
 * Reads an upstream body chunk by chunk without the runtime's default reader, which allocates and
 * zeroes 64 KiB per read (it cost more than the rest of the relay together). A declared length
 * is read into a buffer of exactly that size (a JSON answer lands whole in one read, no copy);
 * otherwise one 16 KiB buffer is read into again and again, and each chunk is a right-sized copy.
 */
export class ChunkReader {
  private readonly reader: ReadableStreamBYOBReader;
  /** Bytes still expected when the upstream declared a length; null when it did not. */
  private left: number | null;
  private buffer: ArrayBuffer | null = null;

  constructor(source: ReadableStream<Uint8Array>, contentLength: string | null) {
    this.reader = source.getReader({ mode: "byob" });
    const declared = contentLength === null ? NaN : Number(contentLength);
    this.left = Number.isSafeInteger(declared) && declared >= 0 ? declared : null;
  }

  /** True once every declared byte has been read. */
  get complete(): boolean {
    return this.left === 0;
  }

  /** The next chunk, or null at the end of the body. */
  async read(): Promise<Uint8Array | null> {
    if (this.left) {
      const { done, value } = await this.reader.read(
        new Uint8Array(Math.min(this.left, MAX_READ_BYTES)),
      );
      if (done || !value?.byteLength) return null;
      this.left -= Math.min(this.left, value.byteLength);
      return value;
    }
    // The read transfers the buffer; it comes back as value.buffer, to be read into next time.
    const { done, value } = await this.reader.read(
      new Uint8Array(this.buffer ?? new ArrayBuffer(STREAM_READ_BYTES)),
    );
    if (done || !value?.byteLength) return null;
    this.buffer = value.buffer;
    return value.slice();
  }

  cancel(reason?: unknown) {
    this.reader.cancel(reason).catch(() => {});
  }
}

/** A body that fails at once: the client sees the upstream's cut as a cut. */
export function erroredStream(err: unknown): ReadableStream<Uint8Array> {
  return new ReadableStream({ start: (controller) => controller.error(err) });
}

/** A count as `z.number().int().min(0).optional()` allows it: absent or a non-negative safe integer. */
const badCount = (v: unknown) =>
  v !== undefined && !(typeof v === "number" && Number.isSafeInteger(v) && v >= 0);

const count = (v: unknown): number =>
  typeof v === "number" && Number.isSafeInteger(v) && v >= 0 ? v : 0;

/**
 * Token usage from an OpenAI/GLM `usage` object, or null when it is not one: an object whose
 * `prompt_tokens`, `completion_tokens` and `total_tokens` are each absent or a count (checked by
 * hand — it runs once per answer on the hot path). Cached prompt tokens come from
 * `prompt_tokens_details.cached_tokens`.
 */
export function usageFrom(value: unknown): TokenUsage | null {
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

/** Anthropic's usage fields, as the largest value seen of each. */
interface AnthropicCounts {
  input: number;
  output: number;
  cacheRead: number;
  cacheCreation: number;
  seen: boolean;
}

/** Folds an Anthropic `usage` object into `into` (the largest value of each field wins). */
function foldAnthropic(into: AnthropicCounts, value: unknown) {
  if (typeof value !== "object" || value === null || Array.isArray(value)) return;
  const u = value as Record<string, unknown>;
  into.input = Math.max(into.input, count(u.input_tokens));
  into.output = Math.max(into.output, count(u.output_tokens));
  into.cacheRead = Math.max(into.cacheRead, count(u.cache_read_input_tokens));
  into.cacheCreation = Math.max(into.cacheCreation, count(u.cache_creation_input_tokens));
  into.seen = true;
}

/**
 * Anthropic usage as Keyway counts it: as in Anthropic's API, `input_tokens` excludes cached
 * tokens, so prompt tokens = input + cache read + cache creation, of which cache reads are cached.
 */
function fromAnthropic(c: AnthropicCounts): TokenUsage | null {
  if (!c.seen) return null;
  const usage: TokenUsage = {
    promptTokens: c.input + c.cacheRead + c.cacheCreation,
    completionTokens: c.output,
  };
  if (c.cacheRead) usage.cachedTokens = c.cacheRead;
  return usage;
}

const USAGE_OBJECT = /"usage"\s*:\s*\{/g;
const END_EVENT = {
  openai: /(?:^|\n)data: ?\[DONE\]/,
  anthropic: /(?:^|\n)(?:event: ?message_stop|data: ?\{"type": ?"message_stop")/,
} as const;
const END_MARK = { openai: "[DONE]", anthropic: "message_stop" } as const;

/**
 * Watches relayed bytes for `usage`, for the end of the answer and for how much was generated.
 * SSE: lines are split incrementally across chunk boundaries; OpenAI's format keeps the last
 * `data:` line holding a usage object (parsed once, at the end), Anthropic's folds the usage of
 * `message_start` and of every `message_delta` (the largest value of each field wins: GLM may
 * report 0 input tokens at the start and the real counts at the end). `data: [DONE]` or
 * `message_stop` marks the end; the generated text is estimated chunk by chunk. JSON: the chunks
 * are kept (by reference) and parsed once the answer is complete.
 */
export class UsageMeter {
  private readonly text = new TextDecoder();
  private carry = "";
  private lastUsageLine: string | null = null;
  private readonly anthropic: AnthropicCounts = {
    input: 0,
    output: 0,
    cacheRead: 0,
    cacheCreation: 0,
    seen: false,
  };
  private chunks: Uint8Array[] | null = [];
  private size = 0;
  private whole: string | null = null;
  private relayed = 0;
  /** SSE: the end event has been seen (what follows it is not part of the answer). */
  ended = false;
  /** Anthropic SSE: a `message_delta` has brought the answer's counts (not just the start's). */
  private anthropicFinal = false;

  constructor(private readonly format: WireFormat, private readonly sse: boolean) {}

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
    if (piece.includes(END_MARK[this.format]) && END_EVENT[this.format].test(text)) {
      this.ended = true;
    }
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
    if (!line.startsWith("data:")) return;
    USAGE_OBJECT.lastIndex = 0;
    if (!USAGE_OBJECT.test(line)) return;
    if (this.format === "openai") {
      this.lastUsageLine = line;
      return;
    }
    try {
      const event = JSON.parse(line.slice(5));
      foldAnthropic(this.anthropic, event?.message?.usage ?? event?.usage);
      if (event?.type === "message_delta") this.anthropicFinal = true;
    } catch { /* not an event of ours */ }
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
      if (this.format === "anthropic") {
        const usage = fromAnthropic(this.anthropic);
        if (!usage || this.anthropicFinal) return usage;
        // Cut before any message_delta: message_start's counts are not the answer's (GLM reports
        // 0 input tokens there, and 0 or 1 output). With no input count the estimate charges it;
        // otherwise what was relayed counts as generated.
        if (usage.promptTokens === 0) return null;
        return { ...usage, completionTokens: Math.max(usage.completionTokens, this.relayed) };
      }
      if (!this.lastUsageLine) return null;
      try {
        return usageFrom(JSON.parse(this.lastUsageLine.slice(5)).usage);
      } catch {
        return null;
      }
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
    if (this.format === "openai") return usageFrom(usage);
    const counts = { ...this.anthropic };
    foldAnthropic(counts, usage);
    return fromAnthropic(counts);
  }
}

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
