/**
 * A streamed request that waits for an upstream slot is answered at once: the SSE headers go out
 * after EARLY_HEADERS_MS of waiting, then a comment line every HEARTBEAT_MS, then the answer
 * itself once the slot is taken — or the protocol's stream error event when the wait ends without
 * one.
 *
 * Why: Deno.serve (HTTP/1.1) does not notice a client that hangs up before the response headers
 * when its request had a body longer than about 400 bytes (the whole request did not arrive in
 * the server's first 512-byte read; README "Known limitations"). Once the response is streaming,
 * a hang-up cancels its body within milliseconds, so a client that gives up while waiting is seen
 * leaving, never sent upstream, and charged nothing. Refusals decided at once (a full queue)
 * still get their own status: they come before EARLY_HEADERS_MS.
 */
import { AppError } from "../core/errors.ts";
import type { Protocol } from "./protocol.ts";

/** How long a streamed request waits for its slot before its headers are sent. */
export const EARLY_HEADERS_MS = 250;
/** How often a waiting stream writes a comment line (what notices a client that left). */
export const HEARTBEAT_MS = 1_000;

const HEARTBEAT = new TextEncoder().encode(": waiting for an upstream slot\n\n");

export interface WaitingAnswer<T> {
  protocol: Protocol;
  /** Resolves once the slot is taken; rejects with the refusal. */
  waiting: Promise<T>;
  /** The early answer's headers (rate headers, ids, the protocol's own). */
  headers: Record<string, string>;
  /** The client left while its answer streams: stops the wait (and the call, once begun). */
  leave(): void;
  /** The upstream call and its relay, once the slot is taken. */
  forward(taken: T): Promise<Response>;
}

/** The answer to a streamed request that may wait for an upstream slot (see the top). */
export async function answerWhileWaiting<T>(w: WaitingAnswer<T>): Promise<Response> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const early = new Promise<null>((r) => timer = setTimeout(() => r(null), EARLY_HEADERS_MS));
  const settled = w.waiting.then((taken) => ({ taken }), (err: unknown) => ({ err }));
  const first = await Promise.race([settled, early]);
  clearTimeout(timer);
  if (first) {
    if ("err" in first) throw first.err;
    return await w.forward(first.taken);
  }
  let source: ReadableStreamDefaultReader<Uint8Array> | null = null;
  let beat: ReturnType<typeof setInterval> | undefined;
  let ready!: Promise<void>;
  let gone = false;
  const body = new ReadableStream<Uint8Array>({
    start: (controller) => {
      const send = (bytes: Uint8Array) => {
        try {
          controller.enqueue(bytes);
        } catch { /* the client left */ }
      };
      const end = (bytes: Uint8Array) => {
        send(bytes);
        try {
          controller.close();
        } catch { /* the client left */ }
      };
      send(HEARTBEAT);
      beat = setInterval(() => send(HEARTBEAT), HEARTBEAT_MS);
      ready = (async () => {
        try {
          const res = await w.forward(await w.waiting);
          clearInterval(beat);
          if (gone) return void res.body?.cancel();
          if (res.ok && res.body) source = res.body.getReader();
          else end(await errorEvent(w.protocol, res));
        } catch (err) {
          clearInterval(beat);
          const e = err instanceof AppError
            ? err
            : new AppError("internal_error", "internal error");
          end(w.protocol.streamError(e.code, e.message));
        }
      })();
    },
    pull: async (controller) => {
      await ready;
      if (!source) return;
      const { done, value } = await source.read();
      if (done) controller.close();
      else controller.enqueue(value);
    },
    cancel: (reason) => {
      gone = true;
      clearInterval(beat);
      w.leave();
      return source?.cancel(reason);
    },
  });
  return new Response(body, {
    status: 200,
    headers: {
      ...w.headers,
      "content-type": "text/event-stream; charset=utf-8",
      "cache-control": "no-cache",
    },
  });
}

/** An error answer (the upstream's, relayed) as the protocol's stream error event. */
async function errorEvent(protocol: Protocol, res: Response): Promise<Uint8Array> {
  const text = await res.text().catch(() => "");
  let code = res.status >= 500 ? "upstream_unavailable" : "invalid_request";
  let message = `The upstream answered HTTP ${res.status}.`;
  try {
    const error = JSON.parse(text)?.error;
    if (typeof error?.message === "string") message = error.message;
    if (typeof error?.code === "string" && /^[a-z_]+$/.test(error.code)) code = error.code;
  } catch { /* not JSON: the status says it */ }
  return protocol.streamError(code, message);
}
