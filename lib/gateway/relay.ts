/**
 * The relay: an upstream answer relayed to the client chunk by chunk (relayAnswer), settled before
 * its last byte, and the reader of the upstream's body. The
 * meter (meter.ts, one per protocol) finds `usage`, the end of an SSE answer and what was generated.
 */
import { concatBytes } from "../core/encoding.ts";
import { formatInt } from "../core/format.ts";
import type { Outcome } from "../limits/admission.ts";
import type { Exchange, IdleTimer, StopReason } from "./exchange.ts";
import type { RequestEnd, Settlement } from "./exits.ts";
import type { Protocol } from "./protocol.ts";

/** Bodies the relay reads at once at most (a declared length is read into one buffer up to this). */
const MAX_READ_BYTES = 1024 * 1024;
/** Error bodies read whole, to classify or to relay (GLM's are a few hundred bytes). */
const MAX_ERROR_BODY = 64 * 1024;

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

/** An upstream error body, up to MAX_ERROR_BODY bytes, under the watchdog (null: none). */
export async function readErrorBody(
  body: ReadableStream<Uint8Array> | null,
  idle: IdleTimer,
): Promise<Uint8Array<ArrayBuffer> | null> {
  if (!body) return null;
  const chunks: Uint8Array[] = [];
  let size = 0;
  idle.wait();
  try {
    for await (const chunk of body) {
      chunks.push(chunk);
      size += chunk.byteLength;
      if (size >= MAX_ERROR_BODY) break;
    }
  } catch {
    // Cut or stalled: classify what arrived.
  }
  idle.rest();
  return concatBytes(chunks, size);
}

export interface RelayContext {
  protocol: Protocol;
  exchange: Exchange;
  end: RequestEnd;
  lease: Settlement;
  /** The answer's headers (rate headers, ids, the upstream's relayed headers). */
  headers: Record<string, string>;
  timeoutMs: number;
  streamMaxMs: number;
  /** An error body as it may reach the user (any copy of the master key replaced). */
  clean(bytes: Uint8Array<ArrayBuffer> | null): Uint8Array<ArrayBuffer> | null;
}

/**
 * Relays an upstream answer that is not a refusal: an error answer whole (the user's own mistake
 * generated nothing; an upstream 5xx is not counted at all), a JSON answer as bytes when it came
 * whole, anything else as a stream. The lease is settled (end.settle) before the last byte.
 */
export async function relayAnswer(upstream: Response, ctx: RelayContext): Promise<Response> {
  const { protocol, exchange, end, lease, headers } = ctx;
  const status = upstream.status;
  const idle = exchange.idle;
  const source = upstream.body;
  if (status >= 400) {
    const bytes = source ? await readErrorBody(source, idle) : null;
    await end.settle(null, status, status >= 500 ? "not_served" : "refused");
    return new Response(ctx.clean(bytes), { status, headers });
  }
  if (!source) {
    await end.settle(null, status, "complete");
    return new Response(null, { status, headers });
  }
  /** Why the watchdog fired, as the log line and a cut stream's error event say it. */
  const why = (stop: StopReason) =>
    stop === "client"
      ? `the client read nothing for ${ctx.timeoutMs} ms`
      : stop === "deadline"
      ? `the answer took longer than STREAM_MAX_MS (${formatInt(ctx.streamMaxMs)} ms)`
      : stop === "shutdown"
      ? "the server is restarting"
      : `upstream sent nothing for ${ctx.timeoutMs} ms`;
  const stalled = () => {
    const stop = exchange.stopped;
    return stop === "deadline" || stop === "upstream" ? why(stop) : undefined;
  };
  /** The error a cut answer ends with, for the request log (a client that left gets none). */
  const cutCode = (stop: StopReason | null) =>
    stop === "client" || stop === "client_left"
      ? null
      : stop === "deadline" || stop === "upstream"
      ? "upstream_timeout"
      : "upstream_unavailable";
  const contentType = headers["content-type"] ?? "";
  const sse = contentType.includes("text/event-stream");
  const meter = protocol.meter(sse);
  // A compressed answer arrives decompressed: its content-length is not the length read.
  const declared = sse || upstream.headers.has("content-encoding")
    ? null
    : upstream.headers.get("content-length");
  const reader = new ChunkReader(source, declared);
  /** The next piece of the answer, under the watchdog. */
  const read = async () => {
    idle.wait();
    const chunk = await reader.read();
    idle.rest();
    return chunk;
  };
  let pending: Uint8Array | null = null;
  if (!sse) {
    // A JSON answer usually arrives whole in its first read. When that read holds every byte
    // the upstream declared, relay it as bytes: the runtime then answers natively instead of
    // pumping a JS stream (≈ a third of the relay's cost). Nothing waits for more data than
    // has arrived; anything else is streamed below, the first chunk included.
    let first: Uint8Array | null;
    try {
      first = await read();
    } catch (err) {
      await end.settle(null, status, "cut", stalled(), cutCode(exchange.stopped));
      return new Response(erroredStream(err), { status, headers });
    }
    if (!first) {
      await end.settle(null, status, "complete");
      return new Response(null, { status, headers });
    }
    if (reader.complete) {
      reader.cancel(); // at its end already: frees the upstream connection
      meter.push(first);
      await end.settle(meter.usage(), status, "complete");
      return new Response(first as Uint8Array<ArrayBuffer>, { status, headers });
    }
    pending = first;
  }
  const finish = (outcome: Outcome, detail?: string, code: string | null = null) => {
    if (end.done) return end.settle(null, status, outcome);
    const usage = meter.usage();
    if (!usage) lease.relayed(meter.relayedTokens());
    return end.settle(usage, status, outcome, detail, code);
  };
  /** Relays a chunk; the one that ends the answer waits for the settlement first. */
  const relay = async (
    controller: ReadableStreamDefaultController<Uint8Array>,
    chunk: Uint8Array,
  ) => {
    meter.push(chunk);
    if (meter.ended || reader.complete) await finish("complete");
    else if (sse) lease.relayed(meter.relayedTokens());
    controller.enqueue(chunk);
  };
  /** The stream has ended one way or another (nothing more is enqueued). */
  let closed = false;
  let out: ReadableStreamDefaultController<Uint8Array>;
  // A stop cuts the answer where it stands: the upstream call is cancelled and the lease settled
  // (the estimate of what was relayed). A stalled upstream or an answer past STREAM_MAX_MS ends
  // an SSE stream with an error event its SDK reports; a client that reads nothing gets its
  // connection closed.
  exchange.relaying((stop) => {
    exchange.abortUpstream();
    reader.cancel();
    if (closed) return;
    closed = true;
    const detail = why(stop);
    finish(stop === "client" ? "cancelled" : "cut", detail, cutCode(stop)).then(() => {
      try {
        if (stop !== "client" && sse) {
          const code = stop === "shutdown" ? "upstream_unavailable" : "upstream_timeout";
          out.enqueue(protocol.streamError(code, `The answer was cut: ${detail}.`));
          out.close();
        } else out.error(new Error(detail));
      } catch { /* the client is gone already */ }
    });
  });
  const body = new ReadableStream<Uint8Array>({
    start: (controller) => {
      out = controller;
    },
    pull: async (controller) => {
      if (closed) return;
      if (pending) {
        const chunk = pending;
        pending = null;
        return await relay(controller, chunk);
      }
      let chunk: Uint8Array | null;
      try {
        chunk = await read();
      } catch (err) {
        if (closed) return; // cut by the watchdog
        closed = true;
        await finish("cut", stalled(), cutCode(exchange.stopped));
        controller.error(err);
        return;
      }
      if (closed) return;
      if (!chunk) {
        closed = true;
        await finish("complete");
        controller.close();
        return;
      }
      await relay(controller, chunk);
    },
    cancel: async (reason) => {
      // The client went away: stop the upstream call too, and settle at once.
      closed = true;
      exchange.abortUpstream();
      reader.cancel(reason);
      await finish("cancelled");
    },
  });
  return new Response(body, { status, headers });
}
