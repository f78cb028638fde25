/**
 * Every gateway endpoint through the clients people use — the `@anthropic-ai/sdk` (Claude Code's
 * protocol) and the `openai` SDK — against a running Keyway in front of a fake GLM that speaks
 * both formats the way Z.ai does. Usage is read through GET /api/usage, right after each answer.
 */
import assert from "node:assert/strict";
import Anthropic from "@anthropic-ai/sdk";
import OpenAI from "openai";
import {
  json,
  MASTER_KEY,
  type ServedGateway,
  serveGateway,
  type TodayUsage,
} from "../support/helpers.ts";

interface Served extends ServedGateway {
  usage(): Promise<Omit<TodayUsage, "totalTokens">>;
}

async function serve(env: Record<string, string> = {}): Promise<Served> {
  const s = await serveGateway(env, "user_protocols");
  return {
    ...s,
    usage: async () => {
      const { totalTokens: _, ...rest } = await s.today();
      return rest;
    },
  };
}

// GLM-5.1: $1.40 input, $0.26 cached input, $4.40 output per million tokens.
const cost = (input: number, cached: number, output: number) =>
  Math.round((input * 1.4 + cached * 0.26 + output * 4.4) * 1e3) / 1e9;

Deno.test("Anthropic SDK (Claude Code's protocol): messages, streaming, tools, count_tokens, errors", async (t) => {
  const s = await serve({ TOKEN_LIMIT_DAILY: "100000" });
  s.fake.cachedTokens = 4; // of the 11 prompt tokens
  const client = new Anthropic({ apiKey: s.apiKey, baseURL: s.url, maxRetries: 2 });
  try {
    await t.step(
      "a Claude model name is served by the flagship, usage counted at once",
      async () => {
        const message = await client.messages.create({
          model: "claude-sonnet-4-5-20250929",
          max_tokens: 64,
          messages: [{ role: "user", content: "hi" }],
        });
        assert.equal(message.content[0].type, "text");
        assert.equal((message.content[0] as { text: string }).text, "Hello!");
        // The SDK's request id is Keyway's (what the operator finds in the log).
        assert.match(message._request_id ?? "", /^[0-9a-f]{8}-/);
        const sent = s.fake.requests.at(-1)!;
        assert.equal(sent.path, "/api/anthropic/v1/messages");
        assert.equal(JSON.parse(sent.body).model, "glm-5.1");
        assert.equal(sent.headers.get("x-api-key"), MASTER_KEY);
        // Relayed as the SDK sent it.
        assert.match(sent.headers.get("anthropic-version") ?? "", /^\d{4}-\d{2}-\d{2}$/);
        // 7 input + 4 cache reads = 11 prompt tokens, 4 of them at the cached price.
        assert.deepEqual(await s.usage(), {
          requests: 1,
          promptTokens: 11,
          completionTokens: 7,
          costUsd: cost(7, 4, 7),
        });
      },
    );
    await t.step("streamed: relayed event by event, the counts of message_delta win", async () => {
      const stream = client.messages.stream(
        { model: "glm-4.6", max_tokens: 64, messages: [{ role: "user", content: "hi" }] },
        { headers: { "anthropic-beta": "fine-grained-tool-streaming-2025-05-14" } },
      );
      let text = "";
      stream.on("text", (delta) => text += delta);
      const final = await stream.finalMessage();
      assert.equal(text, "Hello!");
      assert.equal(final.usage.output_tokens, 7);
      assert.equal(
        s.fake.requests.at(-1)!.headers.get("anthropic-beta"),
        "fine-grained-tool-streaming-2025-05-14",
      );
      const u = await s.usage();
      assert.equal(u.requests, 2);
      assert.equal(u.promptTokens, 22); // message_start said 0 input tokens
      assert.equal(u.completionTokens, 14);
    });
    await t.step("tool use, streamed and not", async () => {
      const tools = [{
        name: "weather",
        description: "Weather in a city",
        input_schema: { type: "object" as const, properties: { city: { type: "string" } } },
      }];
      const message = await client.messages.create({
        model: "glm-4.6",
        max_tokens: 64,
        tools,
        messages: [{ role: "user", content: "Weather in Paris?" }],
      });
      assert.equal(message.stop_reason, "tool_use");
      assert.deepEqual((message.content[0] as { input: unknown }).input, { city: "Paris" });
      const streamed = await client.messages.stream({
        model: "glm-4.6",
        max_tokens: 64,
        tools,
        messages: [{ role: "user", content: "Weather in Paris?" }],
      }).finalMessage();
      assert.deepEqual((streamed.content[0] as { input: unknown }).input, { city: "Paris" });
      assert.equal((await s.usage()).requests, 4);
    });
    await t.step("an auth token (Bearer) works like an API key; ?beta=true is served", async () => {
      const viaToken = new Anthropic({ authToken: s.apiKey, apiKey: null, baseURL: s.url });
      const message = await viaToken.beta.messages.create({
        model: "claude-haiku-4-5",
        max_tokens: 16,
        messages: [{ role: "user", content: "hi" }],
      });
      assert.equal(message.type, "message");
      assert.match(s.fake.requests.at(-1)!.path, /\/v1\/messages$/);
      assert.equal(JSON.parse(s.fake.requests.at(-1)!.body).model, "glm-4.5-air");
    });
    await t.step("count_tokens is relayed, and counted against nothing", async () => {
      const before = await s.usage();
      const counted = await client.messages.countTokens({
        model: "claude-sonnet-4-5",
        messages: [{ role: "user", content: "hi" }],
      });
      assert.equal(counted.input_tokens, 42);
      assert.equal(s.fake.requests.at(-1)!.path, "/api/anthropic/v1/messages/count_tokens");
      assert.deepEqual(await s.usage(), before);
    });
    await t.step("Keyway's own errors arrive as the SDK's error classes", async () => {
      const wrong = new Anthropic({ apiKey: "kw_" + "A".repeat(43), baseURL: s.url });
      await assert.rejects(
        wrong.messages.create({ model: "glm-4.6", max_tokens: 8, messages: [] }),
        (err: unknown) =>
          err instanceof Anthropic.AuthenticationError &&
          /^[0-9a-f]{8}-/.test(err.requestID ?? "") &&
          (err.error as { error: { type: string; code: string } }).error.type ===
            "authentication_error" &&
          (err.error as { error: { code: string } }).error.code === "invalid_api_key",
      );
      await assert.rejects(
        client.messages.create({
          model: "gpt-4o",
          max_tokens: 8,
          messages: [{ role: "user", content: "hi" }],
        }),
        (err: unknown) => err instanceof Anthropic.BadRequestError && /gpt-4o/.test(err.message),
      );
      // A reservation that can never fit: refused at once, and the SDK does not retry it.
      await s.app.services.users.setLimits("user_protocols", { tokensPerDay: 100 });
      const sent = s.fake.count;
      const started = performance.now();
      await assert.rejects(
        client.messages.create({
          model: "glm-4.6",
          max_tokens: 1000,
          messages: [{ role: "user", content: "hi" }],
        }),
        (err: unknown) =>
          err instanceof Anthropic.PermissionDeniedError &&
          (err.error as { error: { type: string } }).error.type === "permission_error",
      );
      // Its retries would wait 0.5 s and more (a 403 is final, as x-should-retry: false says).
      assert.ok(performance.now() - started < 400, "not retried");
      assert.equal(s.fake.count, sent);
    });
  } finally {
    await s.close();
  }
});

Deno.test("openai SDK: embeddings, tool calls, models by any casing, error classes", async (t) => {
  const s = await serve();
  const client = new OpenAI({ apiKey: s.apiKey, baseURL: `${s.url}/v1`, maxRetries: 0 });
  try {
    await t.step("embeddings are relayed and metered", async () => {
      const res = await client.embeddings.create({ model: "embedding-3", input: ["a", "b"] });
      assert.equal(res.data.length, 2);
      assert.deepEqual(res.data[1].embedding, [0.1, -0.2, 0.3]);
      assert.equal(s.fake.requests.at(-1)!.path, "/api/paas/v4/embeddings");
      const u = await s.usage();
      assert.deepEqual([u.requests, u.promptTokens, u.completionTokens], [1, 10, 0]);
    });
    await t.step("a tool call, with cached prompt tokens priced as cached", async () => {
      s.fake.cachedTokens = 6;
      const res = await client.chat.completions.create({
        model: "GLM-5.1",
        messages: [{ role: "user", content: "Weather in Paris?" }],
        tools: [{
          type: "function",
          function: { name: "weather", parameters: { type: "object", properties: {} } },
        }],
      });
      s.fake.cachedTokens = 0;
      assert.equal(res.choices[0].message.tool_calls?.[0].type, "function");
      assert.equal(JSON.parse(s.fake.requests.at(-1)!.body).model, "glm-5.1");
      const u = await s.usage();
      assert.equal(u.requests, 2);
      // embedding-3: 10 tokens at $0.07/M; glm-5.1: 5 + 6 cached prompt tokens, 7 output.
      assert.equal(u.costUsd, Math.round(10 * 0.07 * 1e3 + cost(5, 6, 7) * 1e9) / 1e9);
    });
    await t.step("models: listed, and retrieved by any casing or alias", async () => {
      const list = await client.models.list();
      assert.ok(list.data.some((m) => m.id === "glm-5.1"));
      assert.equal((await client.models.retrieve("GLM-4.6")).id, "glm-4.6");
      assert.equal((await client.models.retrieve("claude-opus-4-1")).id, "claude-opus-4-1");
      await assert.rejects(client.models.retrieve("gpt-4o"), OpenAI.NotFoundError);
    });
    await t.step("error classes", async () => {
      const wrong = new OpenAI({ apiKey: "kw_" + "B".repeat(43), baseURL: `${s.url}/v1` });
      await assert.rejects(
        wrong.chat.completions.create({ model: "glm-4.6", messages: [] }),
        OpenAI.AuthenticationError,
      );
      await assert.rejects(
        client.embeddings.create({ model: "nope", input: "a" }),
        (err: unknown) =>
          err instanceof OpenAI.BadRequestError &&
          /model_not_allowed/.test(String((err.error as { code?: string }).code ?? err.message)),
      );
    });
  } finally {
    await s.close();
  }
});

Deno.test("bad input on the new endpoints: a 4xx in the route's error shape, nothing charged", async (t) => {
  const s = await serve({
    MODEL_ALIASES: JSON.stringify({ "claude-*": "glm-9-secret" }),
    MAX_REQUEST_BYTES: String(1024 * 1024),
  });
  const post = (path: string, body: unknown, headers: Record<string, string> = {}) =>
    fetch(`${s.url}${path}`, {
      method: "POST",
      headers: { "x-api-key": s.apiKey, "content-type": "application/json", ...headers },
      body: typeof body === "string" ? body : JSON.stringify(body),
    });
  try {
    await t.step("/v1/messages without max_tokens: 400 naming it, Anthropic's shape", async () => {
      const res = await post("/v1/messages", {
        model: "glm-4.6",
        messages: [{ role: "user", content: "hi" }],
      });
      assert.equal(res.status, 400);
      const body = await json<
        { type: string; error: { type: string; code: string; message: string } }
      >(res);
      assert.equal(body.type, "error");
      assert.equal(body.error.type, "invalid_request_error");
      assert.equal(body.error.code, "invalid_request");
      assert.match(body.error.message, /^max_tokens/);
    });
    await t.step("/v1/messages over 1 MiB: 413 request_too_large", async () => {
      const res = await post("/v1/messages", "x".repeat(1024 * 1024 + 1));
      assert.equal(res.status, 413);
      const body = await json<{ error: { type: string; code: string } }>(res);
      assert.deepEqual([body.error.type, body.error.code], [
        "request_too_large",
        "payload_too_large",
      ]);
    });
    await t.step("an alias that resolves to a disallowed model: 400 saying so", async () => {
      const res = await post("/v1/messages", {
        model: "claude-sonnet-4-5",
        max_tokens: 8,
        messages: [{ role: "user", content: "hi" }],
      });
      assert.equal(res.status, 400);
      const body = await json<{ error: { type: string; code: string; message: string } }>(res);
      assert.equal(body.error.code, "model_not_allowed");
      assert.match(body.error.message, /maps to "glm-9-secret"/);
    });
    await t.step("embeddings with an input of the wrong type: 400 naming input", async () => {
      const res = await post("/v1/embeddings", { model: "embedding-3", input: { text: 1 } }, {
        authorization: `Bearer ${s.apiKey}`,
      });
      assert.equal(res.status, 400);
      const body = await json<{ type?: string; error: { code: string; message: string } }>(res);
      assert.equal(body.type, undefined, "OpenAI's shape on OpenAI routes");
      assert.match(body.error.message, /^input/);
    });
    await t.step("an unknown key on /v1/messages: 401 authentication_error", async () => {
      const res = await post("/v1/messages", {}, { "x-api-key": "kw_" + "C".repeat(43) });
      assert.equal(res.status, 401);
      assert.equal(
        (await json<{ error: { type: string } }>(res)).error.type,
        "authentication_error",
      );
    });
    assert.equal(s.fake.count, 0);
    assert.equal((await s.usage()).requests, 0);
  } finally {
    await s.close();
  }
});

Deno.test("an aliased model is replaced in place: every other byte as the client sent it", async () => {
  const s = await serve();
  try {
    const body = '{"model":"claude-sonnet-4-5-20250929","max_tokens":16,' +
      '"metadata":{"user_id":"\\u00e9"},"temperature":1.0,"top_k":12345678901234567890,' +
      '"messages":[{"role":"user","content":"hi"}]}';
    const res = await fetch(`${s.url}/v1/messages`, {
      method: "POST",
      headers: { "x-api-key": s.apiKey, "content-type": "application/json" },
      body,
    });
    assert.equal(res.status, 200);
    await res.body?.cancel();
    assert.equal(
      s.fake.requests.at(-1)!.body,
      body.replace("claude-sonnet-4-5-20250929", "glm-5.1"),
    );
  } finally {
    await s.close();
  }
});
