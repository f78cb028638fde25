/**
 * A fake GLM upstream on loopback, speaking the real wire formats the way Z.ai does:
 * - `/api/paas/v4/chat/completions` (OpenAI's format): a JSON chat completion with `usage`, or an
 *   SSE stream of `chat.completion.chunk`s whose last chunk carries `usage`, then `data: [DONE]`;
 *   a request with `tools` gets a tool call;
 * - `/api/paas/v4/embeddings`: OpenAI's embedding list, with GLM's `usage`;
 * - `/api/anthropic/v1/messages` (Anthropic's Messages API): JSON, or an SSE stream whose
 *   `message_start` reports 0 input tokens and whose `message_delta` carries the real counts
 *   (cache reads included); `/v1/messages/count_tokens` answers `{"input_tokens": n}`.
 * Mode `auto` answers as GLM does for real clients (the coding tools in tests/e2e/clients): a stream
 * when the body asks for one, JSON otherwise, and a scripted tool round trip (`script`): a request
 * offering the scripted tool gets a call of it, and the request carrying its result gets a text
 * answer quoting that result.
 * Failure modes: 500, slow headers, a stream cut mid-way, an endless stream; GLM's account
 * refusals with its real bodies (`{"error": {"code": "1113", "message": "…"}}`); and a per-model
 * concurrency cap answered with `1302` (HTTP 429), as GLM limits an account's requests in flight.
 */

export type GlmMode = "json" | "sse" | "auto" | "error500" | "slow_headers" | "cut" | "endless";

/** A tool call the fake makes in `auto` mode when a request offers a tool of that name. */
export interface ToolScript {
  tool: string;
  input: Record<string, unknown>;
}

/** The text of the first tool result in a conversation (OpenAI `tool` message, Anthropic block). */
function toolResultText(body: Record<string, unknown>): string | null {
  const text = (content: unknown): string =>
    typeof content === "string"
      ? content
      : Array.isArray(content)
      ? content.map((part) =>
        typeof part === "string" ? part : text(
          (part as Record<string, unknown>)?.text ??
            (part as Record<string, unknown>)?.content,
        )
      ).join("")
      : "";
  for (const message of Array.isArray(body.messages) ? body.messages : []) {
    if (message?.role === "tool") return text(message.content);
    if (!Array.isArray(message?.content)) continue;
    for (const block of message.content) {
      if (block?.type === "tool_result") return text(block.content);
    }
  }
  return null;
}

/** The tool names a request offers, in either format. */
function toolNames(body: Record<string, unknown>): string[] {
  if (!Array.isArray(body.tools)) return [];
  return body.tools.map((t: { name?: string; function?: { name?: string } }) =>
    String(t?.function?.name ?? t?.name ?? "")
  );
}

/** GLM's answers when the account, not the request, is the problem (docs.bigmodel.cn api-code). */
export const GLM_REFUSALS = {
  /** Balance exhausted. */
  balance: { status: 429, code: "1113", message: "您的账户已欠费,请充值后重试" },
  /** The master key refused. */
  key_rejected: {
    status: 401,
    code: "1002",
    message: "Authentication Token非法,请确认Authentication Token正确传递",
  },
  /** Too many requests in flight on the account. */
  concurrency: {
    status: 429,
    code: "1302",
    message: "您当前使用该API的并发数过高,请降低并发,或联系客服增加限额",
  },
  /** Too many requests per unit of time. */
  frequency: {
    status: 429,
    code: "1303",
    message: "您当前使用该API的频率过高,请降低频率,或联系客服增加限额",
  },
  /** The user's own mistake: relayed as-is. */
  bad_parameter: { status: 400, code: "1214", message: "messages 参数非法。请检查文档" },
} as const;

export type GlmRefusal = keyof typeof GLM_REFUSALS;

export interface ReceivedRequest {
  path: string;
  authorization: string | null;
  accept: string | null;
  body: string;
  headers: Headers;
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
  /** `auto` mode's scripted tool call (null: answer with text). */
  script: ToolScript | null = null;
  /** What the fake reported as used, summed over every answer that carried `usage`. */
  readonly reported = { requests: 0, promptTokens: 0, completionTokens: 0 };
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

  /** Requests whose caller gave up (cancelled the call) before they were answered. */
  requestsAborted = 0;
  /** When set, every generation request is refused this way. */
  refusal: GlmRefusal | null = null;
  /** Keys (as sent: Bearer or x-api-key) whose every request is refused this way. */
  readonly refusedKeys = new Map<string, GlmRefusal>();
  /** GLM's per-model limit of requests in flight (null: none); beyond it, `1302`. */
  concurrencyCap: number | null = null;
  /** Requests in flight per model now, the most seen at once, and the 1302s answered. */
  readonly inFlight = new Map<string, number>();
  maxInFlight = 0;
  rejectedOverCap = 0;
  /** How long a JSON answer takes (ms): a caller may cancel meanwhile. */
  jsonDelayMs = 0;

  private refuse(refusal: GlmRefusal): Response {
    const { status, code, message } = GLM_REFUSALS[refusal];
    return Response.json({ error: { code, message } }, { status });
  }

  /** Holds one of the model's in-flight places until the answer has been sent (or dropped). */
  private async counted(model: string, answer: () => Promise<Response>): Promise<Response> {
    const now = this.inFlight.get(model) ?? 0;
    if (this.concurrencyCap !== null && now >= this.concurrencyCap) {
      this.rejectedOverCap++;
      return this.refuse("concurrency");
    }
    this.inFlight.set(model, now + 1);
    this.maxInFlight = Math.max(this.maxInFlight, now + 1);
    let released = false;
    const release = () => {
      if (released) return;
      released = true;
      this.inFlight.set(model, (this.inFlight.get(model) ?? 1) - 1);
    };
    let res: Response;
    try {
      res = await answer();
    } catch (err) {
      release();
      throw err;
    }
    if (!res.body || !res.headers.get("content-type")?.includes("text/event-stream")) {
      release();
      return res;
    }
    const reader = res.body.getReader();
    const body = new ReadableStream<Uint8Array>({
      pull: async (controller) => {
        try {
          const { done, value } = await reader.read();
          if (done) {
            release();
            controller.close();
          } else controller.enqueue(value);
        } catch (err) {
          release();
          controller.error(err);
        }
      },
      cancel: async (reason) => {
        release();
        await reader.cancel(reason);
      },
    });
    return new Response(body, { status: res.status, headers: res.headers });
  }

  private async handle(req: Request): Promise<Response> {
    req.signal.addEventListener("abort", () => this.requestsAborted++, { once: true });
    const body = await req.text();
    this.requests.push({
      path: new URL(req.url).pathname,
      authorization: req.headers.get("authorization"),
      accept: req.headers.get("accept"),
      body,
      headers: req.headers,
    });
    const path = new URL(req.url).pathname;
    let model = "glm-4.6";
    let parsed: Record<string, unknown> = {};
    try {
      parsed = JSON.parse(body);
      model = String(parsed.model ?? model);
    } catch { /* the gateway forwards valid JSON only */ }
    const key = req.headers.get("x-api-key") ??
      req.headers.get("authorization")?.replace(/^Bearer /, "") ?? "";
    const keyRefusal = this.refusedKeys.get(key);
    if (keyRefusal) return this.refuse(keyRefusal);
    if (path.endsWith("/v1/messages/count_tokens")) return Response.json({ input_tokens: 42 });
    if (this.refusal) return this.refuse(this.refusal);
    return await this.counted(model, () => this.answer(req, path, model, parsed));
  }

  private async answer(
    req: Request,
    path: string,
    model: string,
    parsed: Record<string, unknown>,
  ): Promise<Response> {
    if (this.mode !== "error500" && this.mode !== "slow_headers") {
      if (path.endsWith("/embeddings")) return this.embeddings(model, parsed);
      if (path.endsWith("/v1/messages")) return this.messages(model, parsed);
    }
    if (this.mode === "auto") return this.auto(model, parsed);
    if (this.mode === "json" && Array.isArray(parsed.tools)) return this.toolCall(model, parsed);
    switch (this.mode) {
      case "json":
        if (this.jsonDelayMs > 0) {
          await new Promise((r) => setTimeout(r, this.jsonDelayMs));
          if (req.signal.aborted) return new Response(null, { status: 499 });
        }
        return this.completion(model, { role: "assistant", content: "Hello!" }, "stop");
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
      case "endless":
        return this.endless(model);
    }
  }

  /** Cached prompt tokens reported in usage (GLM's `prompt_tokens_details.cached_tokens`). */
  cachedTokens = 0;
  /** Whether a request offering tools is answered with a call of the first one. */
  callsTools = true;

  private chatUsage() {
    return this.cachedTokens
      ? { ...this.usage, prompt_tokens_details: { cached_tokens: this.cachedTokens } }
      : this.usage;
  }

  /** Counts a `usage` the fake is about to send. */
  private reportUsage() {
    this.reported.requests++;
    this.reported.promptTokens += this.usage.prompt_tokens;
    this.reported.completionTokens += this.usage.completion_tokens;
  }

  /** The scripted call, when this request offers its tool and has not had its result yet. */
  private scriptedCall(body: Record<string, unknown>): ToolScript | null {
    const script = this.script;
    if (!script || !toolNames(body).includes(script.tool)) return null;
    return toolResultText(body) === null ? script : null;
  }

  /** The answer's text: a quote of the tool result once there is one. */
  private answerText(body: Record<string, unknown>): string[] {
    const result = this.mode === "auto" ? toolResultText(body) : null;
    return result === null ? this.sseChunks : ["The tool said: ", result.slice(0, 200)];
  }

  /** `auto` mode on the OpenAI format: as the body asks, a scripted call when it applies. */
  private auto(model: string, body: Record<string, unknown>): Response {
    const call = this.scriptedCall(body);
    const toolCall = call && {
      id: "call_1",
      type: "function",
      function: { name: call.tool, arguments: JSON.stringify(call.input) },
    };
    if (body.stream === true) return this.stream(model, false, body, toolCall);
    if (toolCall) {
      return this.completion(model, {
        role: "assistant",
        content: null,
        tool_calls: [toolCall],
      }, "tool_calls");
    }
    return this.completion(model, {
      role: "assistant",
      content: this.answerText(body).join(""),
    }, "stop");
  }

  private embeddings(model: string, body: Record<string, unknown>): Response {
    const inputs = Array.isArray(body.input) ? body.input : [body.input];
    return Response.json({
      object: "list",
      model,
      data: inputs.map((_, index) => ({ object: "embedding", index, embedding: [0.1, -0.2, 0.3] })),
      usage: {
        prompt_tokens: 5 * inputs.length,
        completion_tokens: 0,
        total_tokens: 5 * inputs.length,
      },
    });
  }

  private toolCall(model: string, body: Record<string, unknown>): Response {
    const tool = (body.tools as Array<{ function?: { name?: string } }>)[0]?.function?.name ?? "f";
    return this.completion(model, {
      role: "assistant",
      content: null,
      tool_calls: [{
        id: "call_1",
        type: "function",
        function: { name: tool, arguments: '{"city":"Paris"}' },
      }],
    }, "tool_calls");
  }

  /** A whole chat completion, as GLM answers without streaming. */
  private completion(model: string, message: unknown, finishReason: string): Response {
    this.reportUsage();
    return Response.json({
      id: "chatcmpl-fake",
      object: "chat.completion",
      created: 1_700_000_000,
      model,
      choices: [{ index: 0, message, finish_reason: finishReason }],
      usage: this.chatUsage(),
    }, { headers: { "x-request-id": "upstream-req-1" } });
  }

  /** Anthropic usage for `this.usage`: input_tokens excludes the cache reads. */
  private anthropicUsage() {
    return {
      input_tokens: this.usage.prompt_tokens - this.cachedTokens,
      output_tokens: this.usage.completion_tokens,
      cache_read_input_tokens: this.cachedTokens,
      cache_creation_input_tokens: 0,
    };
  }

  private messages(model: string, body: Record<string, unknown>): Response {
    const call = this.mode === "auto"
      ? this.scriptedCall(body)
      : Array.isArray(body.tools) && this.callsTools
      ? { tool: String(body.tools[0]?.name ?? "f"), input: { city: "Paris" } }
      : null;
    const tools = call ? [{ name: call.tool }] : null;
    const chunks = this.answerText(body);
    const content = call
      ? [{ type: "tool_use", id: "toolu_1", name: call.tool, input: call.input }]
      : [{ type: "text", text: chunks.join("") }];
    this.reportUsage();
    if (body.stream !== true) {
      return Response.json({
        id: "msg_fake",
        type: "message",
        role: "assistant",
        model,
        content,
        stop_reason: tools ? "tool_use" : "end_turn",
        stop_sequence: null,
        usage: this.anthropicUsage(),
      }, { headers: { "request-id": "req_fake" } });
    }
    const enc = new TextEncoder();
    const event = (name: string, data: Record<string, unknown>) =>
      enc.encode(`event: ${name}\ndata: ${JSON.stringify({ type: name, ...data })}\n\n`);
    const events: Uint8Array[] = [
      // Z.ai reports 0 input tokens here, and the real counts in message_delta.
      event("message_start", {
        message: {
          id: "msg_fake",
          type: "message",
          role: "assistant",
          model,
          content: [],
          stop_reason: null,
          stop_sequence: null,
          usage: { input_tokens: 0, output_tokens: 0 },
        },
      }),
      event("ping", {}),
    ];
    if (tools) {
      events.push(
        event("content_block_start", {
          index: 0,
          content_block: {
            type: "tool_use",
            id: "toolu_1",
            name: tools[0]?.name ?? "f",
            input: {},
          },
        }),
        ...splitInTwo(JSON.stringify(call!.input)).map((partial_json) =>
          event("content_block_delta", {
            index: 0,
            delta: { type: "input_json_delta", partial_json },
          })
        ),
      );
    } else {
      events.push(
        event("content_block_start", { index: 0, content_block: { type: "text", text: "" } }),
        ...chunks.map((text) =>
          event("content_block_delta", { index: 0, delta: { type: "text_delta", text } })
        ),
      );
    }
    events.push(
      event("content_block_stop", { index: 0 }),
      event("message_delta", {
        delta: { stop_reason: tools ? "tool_use" : "end_turn", stop_sequence: null },
        usage: this.anthropicUsage(),
      }),
      event("message_stop", {}),
    );
    const hold = this.holdAfterFirstChunk ? this.hold.promise : null;
    const closing = this.closing.promise;
    const stream = new ReadableStream<Uint8Array>({
      start: async (controller) => {
        for (let i = 0; i < events.length; i++) {
          controller.enqueue(events[i]);
          if (i === 0 && hold) await Promise.race([hold, closing]);
        }
        controller.close();
        this.streamsFinished++;
      },
    });
    return new Response(stream, {
      headers: { "content-type": "text/event-stream", "cache-control": "no-cache" },
    });
  }

  /** An answer that never ends: a chunk every `sseDelayMs` (at least 10 ms) until cancelled. */
  private endless(model: string): Response {
    const enc = new TextEncoder();
    const closing = this.closing.promise;
    let cancelled = false;
    const body = new ReadableStream<Uint8Array>({
      start: async (controller) => {
        while (!cancelled) {
          try {
            controller.enqueue(enc.encode(`data: ${
              JSON.stringify({
                id: "chatcmpl-fake",
                object: "chat.completion.chunk",
                created: 1_700_000_000,
                model,
                choices: [{ index: 0, delta: { content: "more " }, finish_reason: null }],
              })
            }\n\n`));
          } catch {
            return;
          }
          this.chunksSent++;
          const pause = new Promise((r) => setTimeout(r, Math.max(10, this.sseDelayMs)));
          if (await Promise.race([pause.then(() => false), closing.then(() => true)])) {
            try {
              controller.close();
            } catch { /* cancelled */ }
            return;
          }
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

  private stream(
    model: string,
    cut: boolean,
    request: Record<string, unknown> = {},
    toolCall: Record<string, unknown> | null = null,
  ): Response {
    const texts = this.answerText(request);
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
          if (toolCall) {
            controller.enqueue(
              chunk({ role: "assistant", tool_calls: [{ index: 0, ...toolCall }] }),
            );
          }
          for (let i = 0; !toolCall && i < texts.length; i++) {
            if (i > 0) await pause();
            if (cancelled) return;
            controller.enqueue(chunk({ content: texts[i] }));
            this.chunksSent++;
            if (i === 0 && hold) await Promise.race([hold, closing]);
            if (cut && i === 0) {
              controller.error(new Error("fake upstream cut the stream"));
              return;
            }
          }
          await pause();
          if (cancelled) return;
          this.reportUsage();
          // GLM's last chunk carries the finish reason with the usage (auto mode speaks it fully;
          // the older modes' tests were written against a usage-only last chunk).
          const finish = this.mode === "auto"
            ? {
              choices: [{ index: 0, delta: {}, finish_reason: toolCall ? "tool_calls" : "stop" }],
            }
            : {};
          controller.enqueue(chunk({}, { ...finish, usage: this.chatUsage() }));
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

/** A string in two pieces, as streamed JSON arrives. */
function splitInTwo(s: string): string[] {
  const half = Math.ceil(s.length / 2);
  return [s.slice(0, half), s.slice(half)];
}
