/**
 * Exact accounting through the gateway, as clients see it: every admitted request holds a lease
 * that reserves its slot and tokens, and is settled — its usage committed — before its answer
 * ends or at once when the client leaves. No test waits on the server's writes: usage is read
 * through GET /api/usage like any client would.
 */
import assert from "node:assert/strict";
import OpenAI from "openai";
import { estimatePromptTokens } from "../../lib/usage/estimate.ts";
import {
  bearer,
  eventually,
  json,
  type ServedGateway,
  serveGateway,
  type TodayUsage,
} from "../support/helpers.ts";

interface Served extends ServedGateway {
  chat(body: unknown, signal?: AbortSignal): Promise<Response>;
  /** Today's usage as GET /api/usage reports it to the key's owner (without the cost). */
  usage(): Promise<Omit<TodayUsage, "costUsd">>;
}

/** The app on a real port (hang-ups need real connections), with a fake GLM behind it. */
async function serve(env: Record<string, string> = {}): Promise<Served> {
  const s = await serveGateway(env, "user_lease");
  return {
    ...s,
    chat: (body, signal) =>
      fetch(`${s.url}/v1/chat/completions`, {
        method: "POST",
        headers: { ...bearer(s.apiKey), "content-type": "application/json" },
        body: JSON.stringify(body),
        signal,
      }),
    usage: async () => {
      const { costUsd: _, ...rest } = await s.today();
      return rest;
    },
  };
}

const CHAT = { model: "glm-4.6", messages: [{ role: "user", content: "hi" }] };

async function errorOf(res: Response) {
  assert.match(res.headers.get("content-type") ?? "", /application\/json/);
  return (await json<{ error: { code: string; message: string } }>(res)).error;
}

Deno.test("50 simultaneous requests against a quota that fits 10 reservations: 10 admitted", async () => {
  // Each request reserves 6 (prompt estimate) + 8 (max_tokens) = 14 tokens and uses 18.
  const s = await serve({ TOKEN_LIMIT_DAILY: "140", CONCURRENCY_LIMIT: "64" });
  try {
    s.fake.mode = "sse";
    s.fake.holdAfterFirstChunk = true; // admitted requests stay in flight, holding reservations
    const body = { ...CHAT, stream: true, max_tokens: 8 };
    const results = await Promise.all(Array.from({ length: 50 }, () => s.chat(body)));
    const admitted = results.filter((r) => r.status === 200);
    const refused = results.filter((r) => r.status === 429);
    assert.equal(admitted.length, 10);
    assert.equal(refused.length, 40);
    for (const r of refused) {
      assert.equal((await errorOf(r)).code, "quota_exceeded");
      // The reservations in flight settle soon: worth a retry in a second, not tomorrow.
      assert.equal(r.headers.get("retry-after"), "1");
      assert.equal(r.headers.get("x-should-retry"), null);
    }
    s.fake.release();
    for (const r of admitted) assert.match(await r.text(), /data: \[DONE\]/);
    const usage = await s.usage();
    assert.equal(usage.requests, 10);
    // The documented bound: the quota plus what admitted requests used beyond their reservations.
    assert.equal(usage.totalTokens, 180);
    assert.ok(usage.totalTokens <= 140 + admitted.length * (18 - 14));
    const after = await s.chat(body);
    assert.equal(after.status, 403);
    assert.equal(after.headers.get("x-should-retry"), "false");
    await after.body?.cancel();
    assert.equal(s.fake.count, 10);
  } finally {
    await s.close();
  }
});

Deno.test("hang-ups are charged their estimate and trip the quota", async (t) => {
  // Small bodies: Deno.serve does not notice a client leaving before the response headers when
  // the request body is over about 1 KB (such a request is cut at UPSTREAM_TIMEOUT_MS instead,
  // and charged the same estimate; see the README).
  const body = { ...CHAT, max_tokens: 1 };
  const prompt = estimatePromptTokens(body);
  assert.equal(prompt, 6); // "user", "hi", and 4 per message
  // Three hang-ups fit (6, 6, 7 tokens used; 7 reserved each); the fourth uses more than 10.
  const s = await serve({ TOKEN_LIMIT_DAILY: "27", UPSTREAM_TIMEOUT_MS: "60000" });
  let charged = { requests: 0, promptTokens: 0, completionTokens: 0 };
  /** Waits until the hang-up's settlement shows in GET /api/usage. */
  const nextCharge = async () => {
    const before = charged;
    const now = await eventually(async () => {
      const u = await s.usage();
      return u.requests > before.requests ? u : undefined;
    });
    charged = now;
    return {
      requests: now.requests - before.requests,
      prompt: now.promptTokens - before.promptTokens,
      completion: now.completionTokens - before.completionTokens,
    };
  };
  const cancelledLines = () => s.app.logs.filter((l) => l.includes('"outcome":"cancelled"')).length;
  try {
    await t.step("JSON, before the headers", async () => {
      s.fake.mode = "slow_headers";
      const client = new AbortController();
      const call = s.chat(body, client.signal).catch((err) => err);
      await eventually(() => s.fake.count === 1);
      client.abort();
      assert.ok((await call) instanceof Error);
      assert.deepEqual(await nextCharge(), { requests: 1, prompt, completion: 0 });
      assert.equal(cancelledLines(), 1);
    });
    await t.step("SSE, before the headers", async () => {
      const client = new AbortController();
      const call = s.chat({ ...body, stream: true }, client.signal).catch((err) => err);
      await eventually(() => s.fake.count === 2);
      client.abort();
      assert.ok((await call) instanceof Error);
      assert.deepEqual(await nextCharge(), { requests: 1, prompt, completion: 0 });
      assert.equal(cancelledLines(), 2);
    });
    await t.step("SSE, after the first chunk", async () => {
      s.fake.mode = "sse";
      s.fake.holdAfterFirstChunk = true;
      const client = new AbortController();
      const res = await s.chat({ ...body, stream: true }, client.signal);
      assert.equal(res.status, 200);
      const reader = res.body!.getReader();
      assert.match(new TextDecoder().decode((await reader.read()).value), /Hel/);
      client.abort();
      // "Hel" was relayed: one completion token.
      assert.deepEqual(await nextCharge(), { requests: 1, prompt, completion: 1 });
      assert.equal(cancelledLines(), 3);
      s.fake.holdAfterFirstChunk = false;
      s.fake.release();
    });
    await t.step("SSE, mid-stream", async () => {
      s.fake.sseChunks = Array.from({ length: 200 }, () => "token ");
      s.fake.sseDelayMs = 5;
      const client = new AbortController();
      const res = await s.chat({ ...body, stream: true }, client.signal);
      assert.equal(res.status, 200);
      const reader = res.body!.getReader();
      const text = new TextDecoder();
      let seen = 0;
      while (seen < 10) {
        seen += text.decode((await reader.read()).value).split('"token ').length - 1;
      }
      client.abort();
      const charge = await nextCharge();
      assert.equal(charge.prompt, prompt);
      // At least what the client saw, at most what the upstream sent: one token per chunk.
      assert.ok(charge.completion >= seen, `${charge.completion} < ${seen}`);
      assert.ok(charge.completion < 200, String(charge.completion));
      assert.equal(cancelledLines(), 4);
    });
    await t.step("the quota has tripped: the next request is refused", async () => {
      const res = await s.chat(body);
      assert.equal(res.status, 403);
      assert.equal((await errorOf(res)).code, "quota_exceeded");
      assert.equal(res.headers.get("x-should-retry"), "false");
      assert.equal(s.fake.count, 4);
    });
  } finally {
    await s.close();
  }
});

Deno.test("openai SDK: usage counted when the answer ends, and a spent quota is not retried", async () => {
  const s = await serve({ TOKEN_LIMIT_DAILY: "40" });
  try {
    const client = new OpenAI({ apiKey: s.apiKey, baseURL: `${s.url}/v1`, maxRetries: 2 });
    s.fake.mode = "sse";
    const stream = await client.chat.completions.create({
      model: "glm-4.6",
      messages: [{ role: "user", content: "hi" }],
      max_tokens: 8,
      stream: true,
    });
    let text = "";
    for await (const chunk of stream) text += chunk.choices[0]?.delta?.content ?? "";
    assert.equal(text, "Hello!");
    assert.deepEqual(await s.usage(), {
      requests: 1,
      promptTokens: 11,
      completionTokens: 7,
      totalTokens: 18,
    });
    s.fake.mode = "json";
    const second = await client.chat.completions.create({
      model: "glm-4.6",
      messages: [{ role: "user", content: "hi" }],
      max_tokens: 8,
    });
    assert.equal(second.usage?.total_tokens, 18);
    assert.equal((await s.usage()).requests, 2);
    // 36 used: no reservation of 14 fits. A 403 is never retried (a 429 might be slept on until
    // midnight), and the SDK names it for what it is.
    const started = performance.now();
    await assert.rejects(
      client.chat.completions.create({
        model: "glm-4.6",
        messages: [{ role: "user", content: "hi" }],
        max_tokens: 8,
      }),
      (err: unknown) =>
        err instanceof OpenAI.PermissionDeniedError && /daily token quota/.test(err.message),
    );
    assert.ok(performance.now() - started < 2000);
    assert.equal(s.fake.count, 2);
  } finally {
    await s.close();
  }
});

Deno.test("refusals that retrying cannot fix say so; unpriced models are closed to budgets", async (t) => {
  const s = await serve({
    ALLOWED_MODELS: "*",
    PRICING: JSON.stringify({ "glm-4.6": { input: 1, output: 2 } }),
    RATE_LIMIT_RPD: "3",
  });
  try {
    await t.step("start-up warned that * has no price", () => {
      assert.ok(
        s.app.logs.some((l) =>
          l.includes('"level":"warn"') && l.includes("ALLOWED_MODELS=* but PRICING has no")
        ),
      );
    });
    await t.step("an unpriced model is fine without a budget", async () => {
      const res = await s.chat({ ...CHAT, model: "glm-next-preview" });
      assert.equal(res.status, 200);
      await res.text();
    });
    await t.step("with a budget it is refused, saying why", async () => {
      await s.app.services.users.setLimits("user_lease", { budgetUsdMonthly: 5 });
      const res = await s.chat({ ...CHAT, model: "glm-next-preview" });
      assert.equal(res.status, 400);
      const error = await errorOf(res);
      assert.equal(error.code, "model_not_allowed");
      assert.match(error.message, /"glm-next-preview" has no price.*monthly budget/);
      const priced = await s.chat({ ...CHAT, max_tokens: 10 });
      assert.equal(priced.status, 200);
      await priced.text();
    });
    await t.step("the day's requests spent: x-should-retry false", async () => {
      const ok = await s.chat({ ...CHAT, max_tokens: 10 });
      assert.equal(ok.status, 200);
      await ok.text();
      const res = await s.chat(CHAT);
      assert.equal(res.status, 403);
      assert.equal(res.headers.get("x-should-retry"), "false");
      assert.equal((await errorOf(res)).code, "quota_exceeded");
    });
    await t.step("a disabled user: x-should-retry false", async () => {
      await s.app.services.users.setStatus("user_lease", "disabled");
      const disabled = await s.chat(CHAT);
      assert.equal(disabled.status, 403);
      assert.equal(disabled.headers.get("x-should-retry"), "false");
      assert.equal((await errorOf(disabled)).code, "user_disabled");
    });
    // A call begun before the disable's commit was seen is cancelled, not counted.
    assert.equal((await s.usage()).requests, 3);
  } finally {
    await s.close();
  }
});
