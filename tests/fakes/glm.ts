/**
 * A fake GLM (OpenAI-compatible) upstream on loopback, speaking the real wire formats: a JSON
 * chat completion with `usage`, or an SSE stream of `chat.completion.chunk`s whose last chunk
 * carries `usage`, then `data: [DONE]`. Failure modes: 500, slow headers, a stream cut mid-way.
 */

export type GlmMode = "json" | "sse" | "error500" | "slow_headers" | "cut";

export interface ReceivedRequest {
  path: string;
  authorization: string | null;
  accept: string | null;
  body: string;
}

interface Deferred {
  promise: Promise<void>;
  resolve: () => void;
}

function deferred(): Deferred {
  let resolve!: () => void;
  const promise = new Promise<void>((r) => (resolve = r));
  return { promise, resolve };
}

/**
 * Deno.serve's onError for fakes that cut streams on purpose ("cut" mode): without it the
 * runtime prints a stack trace for every cut into the test output.
 */
export function cutQuietly(): Response {
  return new Response(null, { status: 500 });
}

export class FakeGlm {
  mode: GlmMode = "json";
  usage = { prompt_tokens: 11, completion_tokens: 7, total_tokens: 18 };
  /** Content chunks in SSE mode (the usage chunk and [DONE] come after them). */
  sseChunks = ["Hel", "lo", "!"];
  /** Delay before each SSE chunk after the first (ms). */
  sseDelayMs = 0;
  /**
   * When set, SSE/cut streams send their first chunk, then wait for `release()` (a cut stream
   * is cut right after the release).
   */
  holdAfterFirstChunk = false;
  /** Every request received, in order (Authorization kept to check the master key arrived). */
  readonly requests: ReceivedRequest[] = [];
  /** SSE chunks written so far, and whether the last stream has finished / was cancelled. */
  chunksSent = 0;
  streamsFinished = 0;
  streamsCancelled = 0;

  private hold = deferred();
  private closing = deferred();
  private readonly server: Deno.HttpServer<Deno.NetAddr>;

  constructor() {
    this.server = Deno.serve(
      { hostname: "127.0.0.1", port: 0, onListen: () => {}, onError: cutQuietly },
      (req) => this.handle(req),
    );
  }

  /** Base URL as GLM_BASE_URL expects it (the gateway appends /chat/completions). */
  get baseUrl(): string {
    return `http://127.0.0.1:${this.server.addr.port}/api/paas/v4`;
  }

  get count(): number {
    return this.requests.length;
  }

  /** Lets a held stream go on. */
  release() {
    this.hold.resolve();
    this.hold = deferred();
  }

  async close() {
    this.closing.resolve();
    this.hold.resolve();
    await this.server.shutdown();
  }

  private async handle(req: Request): Promise<Response> {
    const body = await req.text();
    this.requests.push({
      path: new URL(req.url).pathname,
      authorization: req.headers.get("authorization"),
      accept: req.headers.get("accept"),
      body,
    });
    let model = "glm-4.6";
    try {
      model = JSON.parse(body).model ?? model;
    } catch { /* the gateway forwards valid JSON only */ }
    switch (this.mode) {
      case "json":
        return Response.json({
          id: "chatcmpl-fake",
          object: "chat.completion",
          created: 1_700_000_000,
          model,
          choices: [{
            index: 0,
            message: { role: "assistant", content: "Hello!" },
            finish_reason: "stop",
          }],
          usage: this.usage,
        }, { headers: { "x-request-id": "upstream-req-1" } });
      case "error500":
        return Response.json(
          { error: { message: "upstream exploded", type: "server_error" } },
          { status: 500 },
        );
      case "slow_headers":
        await Promise.race([this.closing.promise, new Promise((r) => setTimeout(r, 10_000))]);
        return Response.json({ late: true });
      case "sse":
      case "cut":
        return this.stream(model, this.mode === "cut");
    }
  }

  private stream(model: string, cut: boolean): Response {
    const enc = new TextEncoder();
    const chunk = (delta: Record<string, unknown>, extra: Record<string, unknown> = {}) =>
      enc.encode(
        `data: ${
          JSON.stringify({
            id: "chatcmpl-fake",
            object: "chat.completion.chunk",
            created: 1_700_000_000,
            model,
            choices: [{ index: 0, delta, finish_reason: null }],
            ...extra,
          })
        }\n\n`,
      );
    const hold = this.holdAfterFirstChunk ? this.hold.promise : null;
    const closing = this.closing.promise;
    let cancelled = false;
    const body = new ReadableStream<Uint8Array>({
      start: async (controller) => {
        const pause = async () => {
          if (this.sseDelayMs > 0) await new Promise((r) => setTimeout(r, this.sseDelayMs));
        };
        try {
          for (let i = 0; i < this.sseChunks.length; i++) {
            if (i > 0) await pause();
            if (cancelled) return;
            controller.enqueue(chunk({ content: this.sseChunks[i] }));
            this.chunksSent++;
            if (i === 0 && hold) await Promise.race([hold, closing]);
            if (cut && i === 0) {
              controller.error(new Error("fake upstream cut the stream"));
              return;
            }
          }
          await pause();
          if (cancelled) return;
          controller.enqueue(chunk({}, { usage: this.usage }));
          controller.enqueue(enc.encode("data: [DONE]\n\n"));
          controller.close();
          this.streamsFinished++;
        } catch {
          // The consumer went away while we were writing.
        }
      },
      cancel: () => {
        cancelled = true;
        this.streamsCancelled++;
      },
    });
    return new Response(body, {
      headers: { "content-type": "text/event-stream", "cache-control": "no-cache" },
    });
  }
}
