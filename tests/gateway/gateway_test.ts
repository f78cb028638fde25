import assert from "node:assert/strict";
import { Gateway } from "../../lib/gateway/gateway.ts";
import { UpstreamSlots } from "../../lib/limits/upstream_slots.ts";
import { Ledger } from "../../lib/limits/admission.ts";
import { openaiChat } from "../../lib/gateway/protocols/openai_chat.ts";
import { userUsage } from "../../lib/usage/usage.ts";
import { createApp } from "../../routes/mod.ts";
import { FakeGlm } from "../../testing/fakes/glm.ts";
import {
  bearer,
  eventually,
  interceptCommits,
  json,
  MASTER_KEY,
  type TestApp,
  testApp,
} from "../support/helpers.ts";

interface Setup {
  app: TestApp;
  fake: FakeGlm;
  apiKey: string;
  userId: string;
  session: string;
  chat(body?: unknown, init?: { key?: string; headers?: Record<string, string> }): Promise<
    Response
  >;
  usage(): Promise<{ requests: number; promptTokens: number; completionTokens: number }>;
  close(): Promise<void>;
}

const CHAT = { model: "glm-4.6", messages: [{ role: "user", content: "hi" }] };

async function setup(env: Record<string, string> = {}): Promise<Setup> {
  const fake = new FakeGlm();
  const app = await testApp({ GLM_BASE_URL: fake.baseUrl, ...env });
  const { token, userId } = await app.services.sessions.issueLocal("ada@example.test");
  const res = await app.request("/api/key", { method: "POST", headers: bearer(token) });
  assert.equal(res.status, 201);
  const apiKey = String((await json(res)).apiKey);
  const s: Setup = {
    app,
    fake,
    apiKey,
    userId,
    session: token,
    chat: (body = CHAT, init = {}) =>
      app.request("/v1/chat/completions", {
        method: "POST",
        headers: {
          ...bearer(init.key ?? s.apiKey),
          "content-type": "application/json",
          ...init.headers,
        },
        body: typeof body === "string" ? body : JSON.stringify(body),
      }),
    usage: async () => {
      const u = await userUsage(app.kv, app.services.config.pricing, userId, 1);
      return {
        requests: u.today.requests,
        promptTokens: u.today.promptTokens,
        completionTokens: u.today.completionTokens,
      };
    },
    close: async () => {
      await fake.close();
      await app.close();
    },
  };
  return s;
}

/** Lets go of a response body whether or not it was read. */
async function drain(res: Response) {
  if (!res.bodyUsed) await res.body?.cancel();
}

function assertRateHeaders(res: Response) {
  assert.match(res.headers.get("x-ratelimit-limit-requests") ?? "", /^\d+$/);
  assert.match(res.headers.get("x-ratelimit-remaining-requests") ?? "", /^\d+$/);
  assert.match(
    res.headers.get("x-ratelimit-reset-requests") ?? "",
    /^(\d+ms|[\d.]+s|\d+m\d+s|\d+h\d+m\d+s)$/,
  );
}

async function errorOf(res: Response) {
  assert.match(res.headers.get("content-type") ?? "", /application\/json/);
  return (await json<{ error: { code: string; message: string } }>(res)).error;
}

Deno.test("JSON answer is relayed and its usage recorded; the master key stays upstream", async () => {
  const s = await setup({ RATE_LIMIT_RPM: "10" });
  try {
    const res = await s.chat({ ...CHAT, temperature: 0.2, custom_field: { keep: [1, 2] } });
    assert.equal(res.status, 200);
    assert.match(res.headers.get("content-type") ?? "", /application\/json/);
    const text = await res.text();
    const body = JSON.parse(text);
    assert.equal(body.choices[0].message.content, "Hello!");
    assert.deepEqual(body.usage, { prompt_tokens: 11, completion_tokens: 7, total_tokens: 18 });
    assert.equal(res.headers.get("x-ratelimit-limit-requests"), "10");
    assert.equal(res.headers.get("x-ratelimit-remaining-requests"), "9");
    assert.equal(res.headers.get("x-ratelimit-reset-requests"), "6s");
    assert.equal(res.headers.get("x-upstream-request-id"), "upstream-req-1");

    assert.equal(s.fake.count, 1);
    const got = s.fake.requests[0];
    assert.equal(got.path, "/api/paas/v4/chat/completions");
    assert.equal(got.authorization, `Bearer ${MASTER_KEY}`);
    // Every field passes through untouched, byte for byte.
    assert.equal(
      got.body,
      JSON.stringify({ ...CHAT, temperature: 0.2, custom_field: { keep: [1, 2] } }),
    );

    assert.deepEqual(await s.usage(), { requests: 1, promptTokens: 11, completionTokens: 7 });
    assert.ok(!text.includes(MASTER_KEY));
    for (const [, v] of res.headers) assert.ok(!v.includes(MASTER_KEY));
    assert.ok(s.app.logs.some((l) => l.includes('"msg":"gateway"')), "gateway log line");
    assert.ok(!s.app.logs.some((l) => l.includes(MASTER_KEY) || l.includes(s.apiKey)));
  } finally {
    await s.close();
  }
});

Deno.test("SSE is relayed as it arrives: the first chunk reaches the client before the upstream ends", async () => {
  const s = await setup();
  try {
    s.fake.mode = "sse";
    s.fake.holdAfterFirstChunk = true;
    const res = await s.chat({ ...CHAT, stream: true }, {
      headers: { accept: "text/event-stream" },
    });
    assert.equal(res.status, 200);
    assert.match(res.headers.get("content-type") ?? "", /text\/event-stream/);
    assertRateHeaders(res);
    assert.equal(s.fake.requests[0].accept, "text/event-stream");
    const reader = res.body!.getReader();
    const dec = new TextDecoder();
    const first = dec.decode((await reader.read()).value);
    assert.match(first, /"content":"Hel"/);
    // The upstream is held after its first chunk: nothing more has been produced yet.
    assert.equal(s.fake.chunksSent, 1);
    assert.equal(s.fake.streamsFinished, 0);
    s.fake.release();
    let rest = "";
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      rest += dec.decode(value, { stream: true });
    }
    assert.equal(s.fake.streamsFinished, 1);
    assert.match(rest, /"usage":\{"prompt_tokens":11/);
    assert.ok(rest.trimEnd().endsWith("data: [DONE]"));
    assert.deepEqual(await s.usage(), { requests: 1, promptTokens: 11, completionTokens: 7 });
  } finally {
    await s.close();
  }
});

Deno.test("20 concurrent requests with rpm 5: exactly 5 reach the upstream, 15 get 429", async () => {
  const s = await setup({ RATE_LIMIT_RPM: "5" });
  try {
    const results = await Promise.all(Array.from({ length: 20 }, () => s.chat()));
    const ok = results.filter((r) => r.status === 200);
    const limited = results.filter((r) => r.status === 429);
    assert.equal(ok.length, 5);
    assert.equal(limited.length, 15);
    assert.equal(s.fake.count, 5);
    for (const r of limited) {
      assert.match(r.headers.get("retry-after") ?? "", /^[1-9]\d*$/);
      assert.ok(Number(r.headers.get("retry-after")) <= 12);
      assertRateHeaders(r);
      assert.equal(r.headers.get("x-ratelimit-remaining-requests"), "0");
      assert.equal((await errorOf(r)).code, "rate_limit_exceeded");
    }
    for (const r of ok) await drain(r);
    assert.equal((await s.usage()).requests, 5);
  } finally {
    await s.close();
  }
});

Deno.test("requests per day are exact under concurrency and override per user", async (t) => {
  const s = await setup({ RATE_LIMIT_RPM: "1000", RATE_LIMIT_RPD: "7" });
  try {
    await t.step("12 concurrent against rpd 7 admit 7", async () => {
      const results = await Promise.all(Array.from({ length: 12 }, () => s.chat()));
      assert.equal(results.filter((r) => r.status === 200).length, 7);
      assert.equal(s.fake.count, 7);
      const limited = results.filter((r) => r.status === 429);
      assert.equal(limited.length, 5);
      const retry = Number(limited[0].headers.get("retry-after"));
      const untilMidnight = 86_400 - Math.floor((Date.now() % 86_400_000) / 1000);
      assert.ok(Math.abs(retry - untilMidnight) <= 2, `${retry} vs ${untilMidnight}`);
      assert.equal((await errorOf(limited[0])).code, "rate_limit_exceeded");
      for (const r of results) await drain(r);
    });
    await t.step("a per-user override raises the day limit at once", async () => {
      await s.app.services.users.setLimits(s.userId, { rpd: 9 });
      assert.equal((await s.chat()).status, 200);
      assert.equal((await s.chat()).status, 200);
      const third = await s.chat();
      assert.equal(third.status, 429);
      await third.body?.cancel();
      assert.equal(s.fake.count, 9);
    });
  } finally {
    await s.close();
  }
});

Deno.test("token quota: back to back, exactly the requests whose reservations fit get through", async () => {
  // Each request reserves its prompt estimate (6) + max_tokens (8) = 14 tokens and uses 18.
  const s = await setup({ TOKEN_LIMIT_DAILY: "50" });
  try {
    for (let i = 1; i <= 3; i++) {
      const r = await s.chat({ ...CHAT, max_tokens: 8 });
      assert.equal(r.status, 200);
      await r.text();
      // No pause: the usage is committed before the answer ends.
      assert.deepEqual(await s.usage(), {
        requests: i,
        promptTokens: 11 * i,
        completionTokens: 7 * i,
      });
    }
    const refused = await s.chat({ ...CHAT, max_tokens: 8 }); // 54 ≥ 50
    assert.equal(refused.status, 429);
    assertRateHeaders(refused);
    const retry = Number(refused.headers.get("retry-after"));
    const untilMidnight = 86_400 - Math.floor((Date.now() % 86_400_000) / 1000);
    assert.ok(Math.abs(retry - untilMidnight) <= 2, `${retry} vs ${untilMidnight}`);
    assert.equal(refused.headers.get("x-should-retry"), "false");
    const error = await errorOf(refused);
    assert.equal(error.code, "quota_exceeded");
    assert.match(error.message, /daily token quota of 50 tokens is used up/i);
    assert.equal(s.fake.count, 3);
    assert.equal((await s.usage()).requests, 3);
  } finally {
    await s.close();
  }
});

Deno.test("token quota: a reservation that cannot fit is refused at once, saying how to fit", async () => {
  const s = await setup({ TOKEN_LIMIT_DAILY: "1000" });
  try {
    // No max_tokens: OUTPUT_RESERVE_TOKENS (4096) output tokens are reserved.
    const r = await s.chat();
    assert.equal(r.status, 429);
    assert.equal(r.headers.get("x-should-retry"), "false");
    const error = await errorOf(r);
    assert.equal(error.code, "quota_exceeded");
    assert.match(error.message, /reserves 4102 tokens .*up to 4096 output tokens.*1000 tokens/);
    assert.match(error.message, /lower max_tokens/);
    const ok = await s.chat({ ...CHAT, max_completion_tokens: 100 });
    assert.equal(ok.status, 200);
    await ok.text();
    assert.equal(s.fake.count, 1);
  } finally {
    await s.close();
  }
});

Deno.test("monthly budget: refused once spent, with Retry-After until next month", async () => {
  const s = await setup({
    PRICING: JSON.stringify({ "glm-4.6": { input: 1000, output: 1000 } }), // 18 tokens = $0.018
    BUDGET_USD_MONTHLY: "0.03",
  });
  try {
    for (let i = 0; i < 2; i++) {
      const r = await s.chat({ ...CHAT, max_tokens: 4 }); // reserves 10 tokens = $0.01
      assert.equal(r.status, 200);
      await r.text();
    }
    const c = await s.chat({ ...CHAT, max_tokens: 4 });
    assert.equal(c.status, 429);
    const now = new Date();
    const nextMonth = Date.UTC(now.getUTCFullYear(), now.getUTCMonth() + 1, 1);
    const retry = Number(c.headers.get("retry-after"));
    assert.ok(Math.abs(retry - (nextMonth - now.getTime()) / 1000) <= 2);
    assert.equal(c.headers.get("x-should-retry"), "false");
    assert.equal((await errorOf(c)).code, "quota_exceeded");
    assert.equal(s.fake.count, 2);
  } finally {
    await s.close();
  }
});

Deno.test("keys and user state", async (t) => {
  const s = await setup();
  try {
    await t.step("missing, malformed and unknown keys → 401 invalid_api_key", async () => {
      for (const key of ["", "sk-nope", "kw_" + "A".repeat(43)]) {
        const res = await s.chat(CHAT, { key });
        assert.equal(res.status, 401);
        assert.equal((await errorOf(res)).code, "invalid_api_key");
      }
      const none = await s.app.request("/v1/chat/completions", {
        method: "POST",
        body: JSON.stringify(CHAT),
      });
      assert.equal(none.status, 401);
      await none.body?.cancel();
    });
    await t.step("rotated key → 401 at once, the new key works", async () => {
      assert.equal((await s.chat()).status, 200);
      const rot = await s.app.request("/api/key/rotate", {
        method: "POST",
        headers: bearer(s.session),
      });
      assert.equal(rot.status, 200);
      const fresh = String((await json(rot)).apiKey);
      const old = await s.chat();
      assert.equal(old.status, 401);
      assert.equal((await errorOf(old)).code, "invalid_api_key");
      const ok = await s.chat(CHAT, { key: fresh });
      assert.equal(ok.status, 200);
      await ok.text();
      s.apiKey = fresh;
    });
    await t.step("disabled user → 403 user_disabled at once, enabled again → 200", async () => {
      await s.app.services.users.setStatus(s.userId, "disabled");
      const res = await s.chat();
      assert.equal(res.status, 403);
      assertRateHeaders(res);
      assert.equal((await errorOf(res)).code, "user_disabled");
      await s.app.services.users.setStatus(s.userId, "active");
      const again = await s.chat();
      assert.equal(again.status, 200);
      await again.text();
    });
    await t.step("deleted user (key revoked) → 401, nothing counted", async () => {
      const before = await s.usage();
      await s.app.services.users.markDeleted(s.userId);
      const res = await s.chat();
      assert.equal(res.status, 401);
      assert.equal((await errorOf(res)).code, "invalid_api_key");
      assert.deepEqual(await s.usage(), before);
    });
  } finally {
    await s.close();
  }
});

Deno.test("a key revoked while requests race never gets through after the revocation", async () => {
  const s = await setup({ RATE_LIMIT_RPM: "1000" });
  s.fake.jsonDelayMs = 50; // a call begun before the revocation's commit is seen cancelled
  try {
    const racing = Array.from({ length: 30 }, () => s.chat());
    const revoked = s.app.services.users.markDeleted(s.userId);
    const results = await Promise.all(racing);
    await revoked;
    for (const r of results) {
      assert.ok([200, 401].includes(r.status), String(r.status));
      await drain(r);
    }
    // Every admitted request was answered upstream (a call begun for one the revocation refused
    // was cancelled), and none is admitted any more.
    const admitted = results.filter((r) => r.status === 200).length;
    await eventually(() => s.fake.count - s.fake.requestsAborted === admitted);
    assert.equal((await s.chat()).status, 401);
  } finally {
    await s.close();
  }
});

Deno.test("bad requests are refused before the upstream and count against nothing", async (t) => {
  const s = await setup({ RATE_LIMIT_RPM: "3" });
  try {
    const cases: Array<[string, unknown, number, string, RegExp]> = [
      ["disallowed model", { ...CHAT, model: "gpt-4o" }, 400, "model_not_allowed", /model/],
      ["invalid JSON", "{nope", 400, "invalid_request", /JSON/],
      [
        "missing model",
        { messages: CHAT.messages },
        400,
        "invalid_request",
        /^model: is required$/,
      ],
      [
        "model too long",
        { ...CHAT, model: "m".repeat(201) },
        400,
        "invalid_request",
        /^model: must be at most 200 characters long$/,
      ],
      [
        "empty messages",
        { model: "glm-4.6", messages: [] },
        400,
        "invalid_request",
        /^messages: must have at least 1 item$/,
      ],
      [
        "messages not an array",
        { model: "glm-4.6", messages: "hi" },
        400,
        "invalid_request",
        /^messages: must be an array$/,
      ],
      ["not an object", [1, 2], 400, "invalid_request", /body|expected object/],
      [
        "1 MiB + 1 body",
        JSON.stringify({ ...CHAT, pad: "x".repeat(1024 * 1024) }),
        413,
        "payload_too_large",
        /1 MiB/,
      ],
    ];
    for (const [name, body, status, code, message] of cases) {
      await t.step(name, async () => {
        const res = await s.chat(body);
        assert.equal(res.status, status);
        const err = await errorOf(res);
        assert.equal(err.code, code);
        assert.match(err.message, message);
        if (status === 400) {
          assertRateHeaders(res);
          assert.equal(res.headers.get("x-ratelimit-remaining-requests"), "3");
        }
      });
    }
    await t.step("a chunked body over 1 MiB is refused too", async () => {
      const big = new TextEncoder().encode(
        JSON.stringify({ ...CHAT, pad: "y".repeat(1100 * 1024) }),
      );
      const stream = new ReadableStream<Uint8Array>({
        start(c) {
          for (let i = 0; i < big.length; i += 64 * 1024) c.enqueue(big.subarray(i, i + 64 * 1024));
          c.close();
        },
      });
      const res = await s.app.request("/v1/chat/completions", {
        method: "POST",
        headers: bearer(s.apiKey),
        body: stream,
      });
      assert.equal(res.status, 413);
      assert.equal((await errorOf(res)).code, "payload_too_large");
    });
    await t.step("nothing reached the upstream or was counted", async () => {
      assert.equal(s.fake.count, 0);
      assert.equal((await s.usage()).requests, 0);
      const ok = await Promise.all([s.chat(), s.chat(), s.chat()]);
      assert.deepEqual(ok.map((r) => r.status), [200, 200, 200]);
      for (const r of ok) await r.text();
    });
  } finally {
    await s.close();
  }
});

Deno.test("every gateway answer carries its request id and nosniff, refusals included", async (t) => {
  const s = await setup({ RATE_LIMIT_RPM: "1" });
  const framed = (res: Response) => {
    assert.equal(res.headers.get("x-content-type-options"), "nosniff");
    assert.match(res.headers.get("x-request-id") ?? "", /^[0-9a-f]{8}-[0-9a-z]+$/);
  };
  try {
    await t.step("200: an incoming id is not taken (clients do not write the logs)", async () => {
      const res = await s.chat(CHAT, { headers: { "x-request-id": "trace-abc.123" } });
      assert.equal(res.status, 200);
      framed(res);
      await res.text();
      assert.ok(!s.app.logs.some((l) => l.includes("trace-abc.123")));
    });
    await t.step("429, with a malformed incoming id replaced", async () => {
      const res = await s.chat(CHAT, { headers: { "x-request-id": "bad id\u00e9" } });
      assert.equal(res.status, 429);
      framed(res);
      assert.equal((await errorOf(res)).code, "rate_limit_exceeded");
    });
    await t.step("401 and 413 (declared length)", async () => {
      const bad = await s.chat(CHAT, { key: "kw_" + "x".repeat(43) });
      assert.equal(bad.status, 401);
      framed(bad);
      assert.equal((await errorOf(bad)).code, "invalid_api_key");
      const big = await s.chat(JSON.stringify({ ...CHAT, pad: "z".repeat(1024 * 1024) }));
      assert.equal(big.status, 413);
      framed(big);
      assert.equal((await errorOf(big)).code, "payload_too_large");
    });
    await t.step("two answers never share an id", async () => {
      const [a, b] = await Promise.all([s.chat(), s.chat()]);
      assert.notEqual(a.headers.get("x-request-id"), b.headers.get("x-request-id"));
      await drain(a);
      await drain(b);
    });
  } finally {
    await s.close();
  }
});

Deno.test("an upstream error body that echoes the master key reaches the user without it", async () => {
  const upstream = Deno.serve(
    { hostname: "127.0.0.1", port: 0, onListen: () => {} },
    (req) =>
      Response.json(
        { error: { code: "1214", message: `bad request for ${req.headers.get("authorization")}` } },
        { status: 400 },
      ),
  );
  const s = await setup({ GLM_BASE_URL: `http://127.0.0.1:${upstream.addr.port}` });
  try {
    const res = await s.chat();
    assert.equal(res.status, 400);
    const text = await res.text();
    assert.ok(!text.includes(MASTER_KEY), text);
    assert.match(JSON.parse(text).error.message, /\[redacted\]/);
    assert.equal(JSON.parse(text).error.code, "1214", "the rest relayed as GLM sent it");
  } finally {
    await s.close();
    await upstream.shutdown();
  }
});

Deno.test("an upstream redirect is not followed: the master key stays, 502, nothing counted", async () => {
  const elsewhere: Array<Record<string, string>> = [];
  const other = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen: () => {} }, (req) => {
    elsewhere.push(Object.fromEntries(req.headers));
    return Response.json({ usage: { prompt_tokens: 1, completion_tokens: 1 } });
  });
  const upstream = Deno.serve(
    { hostname: "127.0.0.1", port: 0, onListen: () => {} },
    () =>
      new Response(null, {
        status: 307,
        headers: { location: `http://127.0.0.1:${other.addr.port}/steal?k=1` },
      }),
  );
  const s = await setup({ GLM_BASE_URL: `http://127.0.0.1:${upstream.addr.port}` });
  try {
    const res = await s.chat();
    assert.equal(res.status, 502);
    assert.equal((await errorOf(res)).code, "upstream_unavailable");
    assert.equal(elsewhere.length, 0, "the redirect was not followed");
    assert.deepEqual(await s.usage(), { requests: 0, promptTokens: 0, completionTokens: 0 });
    assert.ok(s.app.logs.some((l) => l.includes("upstream redirected")));
    assert.ok(!s.app.logs.some((l) => l.includes("k=1")), "no query string in the log");
  } finally {
    await s.close();
    await upstream.shutdown();
    await other.shutdown();
  }
});

Deno.test("a compressed JSON answer is metered from its usage, not estimated", async () => {
  const usage = { prompt_tokens: 1234, completion_tokens: 567, total_tokens: 1801 };
  const body = JSON.stringify({
    id: "gz",
    choices: [{ index: 0, message: { role: "assistant", content: "squeezed ".repeat(1000) } }],
    usage,
  });
  const gzipped = new Uint8Array(
    await new Response(
      new Blob([body]).stream().pipeThrough(new CompressionStream("gzip")),
    ).arrayBuffer(),
  );
  // As a proxy in front of GLM might answer: gzip, with the compressed length declared.
  const upstream = Deno.serve(
    { hostname: "127.0.0.1", port: 0, onListen: () => {} },
    () =>
      new Response(gzipped, {
        headers: {
          "content-type": "application/json",
          "content-encoding": "gzip",
          "content-length": String(gzipped.length),
        },
      }),
  );
  const s = await setup({ GLM_BASE_URL: `http://127.0.0.1:${upstream.addr.port}` });
  try {
    const res = await s.chat();
    assert.equal(res.status, 200);
    assert.equal(await res.text(), body, "relayed decompressed, whole");
    assert.deepEqual(await s.usage(), { requests: 1, promptTokens: 1234, completionTokens: 567 });
  } finally {
    await s.close();
    await upstream.shutdown();
  }
});

Deno.test("large answers are relayed byte for byte and metered: a 3 MiB JSON and a 2,000-event stream", async (t) => {
  const usage = { prompt_tokens: 5, completion_tokens: 4000, total_tokens: 4005 };
  const text = "Grüße, 世界! ".repeat(200_000); // multi-byte characters across read boundaries
  const json = new TextEncoder().encode(JSON.stringify({
    id: "big",
    choices: [{ index: 0, message: { role: "assistant", content: text } }],
    usage,
  }));
  const events = Array.from(
    { length: 2000 },
    (_, i) => `data: ${JSON.stringify({ choices: [{ delta: { content: `ü${i}世` } }] })}\n\n`,
  );
  events.push(`data: ${JSON.stringify({ choices: [], usage })}\n\n`, "data: [DONE]\n\n");
  const sse = new TextEncoder().encode(events.join(""));
  const upstream = Deno.serve(
    { hostname: "127.0.0.1", port: 0, onListen: () => {} },
    async (req) => {
      const stream = (await req.json()).stream === true;
      if (!stream) return new Response(json, { headers: { "content-type": "application/json" } });
      let i = 0;
      return new Response(
        new ReadableStream({
          pull(c) {
            // Uneven pieces, so events and characters are split across reads.
            if (i >= sse.length) return c.close();
            c.enqueue(sse.slice(i, i += 997));
          },
        }),
        { headers: { "content-type": "text/event-stream" } },
      );
    },
  );
  const s = await setup({ GLM_BASE_URL: `http://127.0.0.1:${upstream.addr.port}` });
  try {
    await t.step("JSON", async () => {
      const res = await s.chat();
      assert.equal(res.status, 200);
      assert.deepEqual(new Uint8Array(await res.arrayBuffer()), json);
      assert.deepEqual(await s.usage(), { requests: 1, promptTokens: 5, completionTokens: 4000 });
    });
    await t.step("SSE", async () => {
      const res = await s.chat({ ...CHAT, stream: true });
      assert.equal(res.status, 200);
      assert.deepEqual(new Uint8Array(await res.arrayBuffer()), sse);
      assert.deepEqual(await s.usage(), { requests: 2, promptTokens: 10, completionTokens: 8000 });
    });
  } finally {
    await s.close();
    await upstream.shutdown();
  }
});

Deno.test("upstream failures", async (t) => {
  const s = await setup({ UPSTREAM_TIMEOUT_MS: "300" });
  try {
    await t.step("500 is relayed with its status and body, and not counted", async () => {
      s.fake.mode = "error500";
      const res = await s.chat();
      assert.equal(res.status, 500);
      assert.match(res.headers.get("content-type") ?? "", /application\/json/);
      assertRateHeaders(res);
      assert.equal(
        (await json<{ error: { message: string } }>(res)).error.message,
        "upstream exploded",
      );
      // Not the user's doing: no request, token or cost recorded, the request allowance given back
      // (and the answer's headers say so: nothing else was used yet).
      assert.equal(
        res.headers.get("x-ratelimit-remaining-requests"),
        res.headers.get("x-ratelimit-limit-requests"),
      );
      assert.deepEqual(await s.usage(), { requests: 0, promptTokens: 0, completionTokens: 0 });
      assert.ok(s.app.logs.some((l) => l.includes('"level":"warn"') && l.includes('"status":500')));
      const next = await s.chat();
      assert.equal(
        next.headers.get("x-ratelimit-remaining-requests"),
        res.headers.get("x-ratelimit-remaining-requests"),
      );
      await next.body?.cancel();
    });
    await t.step("no response headers within the timeout → 504 upstream_timeout", async () => {
      s.fake.mode = "slow_headers";
      const res = await s.chat();
      assert.equal(res.status, 504);
      assertRateHeaders(res);
      assert.equal((await errorOf(res)).code, "upstream_timeout");
      // The upstream had the prompt: charged its estimate ("user" + "hi" + 4 per message).
      assert.deepEqual(await s.usage(), { requests: 1, promptTokens: 6, completionTokens: 0 });
    });
    await t.step("a stream cut mid-way still records the request", async () => {
      s.fake.mode = "cut";
      s.fake.holdAfterFirstChunk = true;
      const res = await s.chat({ ...CHAT, stream: true });
      assert.equal(res.status, 200);
      const reader = res.body!.getReader();
      assert.match(new TextDecoder().decode((await reader.read()).value), /Hel/);
      s.fake.release(); // now the upstream cuts the connection
      await assert.rejects(async () => {
        for (;;) if ((await reader.read()).done) break;
      });
      // No usage chunk arrived: the prompt estimate and the relayed "Hel" (1 token).
      assert.deepEqual(await s.usage(), { requests: 2, promptTokens: 12, completionTokens: 1 });
      assert.ok(
        s.app.logs.some((l) => l.includes('"outcome":"cut"') && l.includes('"estimated":true')),
      );
    });
    await t.step(
      "a stream that stalls mid-way is cut after the timeout, upstream call cancelled",
      async () => {
        s.fake.mode = "sse";
        s.fake.holdAfterFirstChunk = true; // and never released
        const cancelledBefore = s.fake.streamsCancelled;
        const res = await s.chat({ ...CHAT, stream: true });
        assert.equal(res.status, 200);
        const reader = res.body!.getReader();
        assert.match(new TextDecoder().decode((await reader.read()).value), /Hel/);
        const waited = performance.now();
        let rest = "";
        for (;;) {
          const { done, value } = await reader.read();
          if (done) break;
          rest += new TextDecoder().decode(value);
        }
        assert.ok(performance.now() - waited >= 250, "not cut before the timeout");
        // The stream ends with an error event the SDKs report, not a silent truncation.
        const last = JSON.parse(rest.trim().replace(/^data: /, ""));
        assert.match(last.error.message, /cut: upstream sent nothing for 300 ms/);
        assert.equal((await s.usage()).requests, 3);
        assert.ok(
          s.app.logs.some((l) =>
            l.includes('"outcome":"cut"') && l.includes("upstream sent nothing for 300 ms")
          ),
        );
        // The upstream notices the cancelled call when its connection closes (asynchronously).
        await eventually(() => s.fake.streamsCancelled === cancelledBefore + 1);
        s.fake.holdAfterFirstChunk = false;
      },
    );
    await t.step(
      "a client that stops reading is cut after the timeout: upstream cancelled, usage settled",
      async () => {
        // 6 MiB: more than the sockets buffer, so the relay stops reading while the client rests.
        s.fake.mode = "sse";
        s.fake.sseChunks = Array.from({ length: 400 }, () => "x".repeat(16 * 1024));
        const cancelledBefore = s.fake.streamsCancelled;
        const res = await s.chat({ ...CHAT, stream: true });
        assert.equal(res.status, 200);
        // The upstream call is cancelled while the client still reads nothing.
        await eventually(() => s.fake.streamsCancelled === cancelledBefore + 1);
        // The log line follows the settlement's commit.
        await eventually(
          () =>
            s.app.logs.some((l) =>
              l.includes('"outcome":"cancelled"') &&
              l.includes("the client read nothing for 300 ms")
            ),
          5000,
          () => s.app.logs.filter((l) => l.includes('"gateway"')).slice(-3),
        );
        // What it finally reads is a cut answer, and it was charged its estimate.
        const text = await res.text().catch(() => "");
        assert.doesNotMatch(text, /data: \[DONE\]/);
        const usage = await s.usage();
        assert.equal(usage.requests, 4);
        assert.ok(usage.completionTokens > 1000, "the relayed part is charged");
        s.fake.sseChunks = ["Hel", "lo", "!"];
      },
    );
    assert.ok(!s.app.logs.some((l) => l.includes(MASTER_KEY)));
  } finally {
    await s.close();
  }
});

Deno.test("a disable or a limit change holds for every request after it, for users with quotas too", async (t) => {
  // With a quota, each admission reads the user's counters, and a refusal read fresh must not
  // leave the user record remembered from before the change in use for the next request.
  const s = await setup({ TOKEN_LIMIT_DAILY: "1000000" });
  const statuses = async (n: number) => {
    const got: number[] = [];
    for (let i = 0; i < n; i++) {
      const res = await s.chat();
      got.push(res.status);
      await res.body?.cancel();
    }
    return got;
  };
  try {
    await t.step("disabled: 403 every time, not just the first", async () => {
      assert.deepEqual(await statuses(2), [200, 200]);
      await s.app.services.users.setStatus(s.userId, "disabled");
      assert.deepEqual(await statuses(4), [403, 403, 403, 403]);
      await s.app.services.users.setStatus(s.userId, "active");
      assert.deepEqual(await statuses(2), [200, 200]);
    });
    await t.step("rpd lowered below today's count: 429 every time", async () => {
      await s.app.services.users.setLimits(s.userId, { rpd: 1 });
      assert.deepEqual(await statuses(3), [429, 429, 429]);
      await s.app.services.users.setLimits(s.userId, { rpd: null });
    });
    await t.step("a budget spent: 429 every time", async () => {
      assert.deepEqual(await statuses(1), [200]);
      await s.app.services.users.setLimits(s.userId, { budgetUsdMonthly: 0.000001 });
      assert.deepEqual(await statuses(3), [429, 429, 429]);
    });
  } finally {
    await s.close();
  }
});

Deno.test("a disable holds after another user's request has seen the change first", async () => {
  // Without quotas nothing is read per request: the commit's check of the cache epoch finds the
  // change. Here another user's request meets the moved epoch first; the disabled user's record,
  // remembered from before, must not then pass as current.
  const s = await setup();
  try {
    const other = await s.app.services.users.provision("user_other");
    const ok = async (key?: string) => {
      const res = await s.chat(CHAT, key ? { key } : undefined);
      await res.body?.cancel();
      return res.status;
    };
    assert.deepEqual([await ok(), await ok(other.apiKey)], [200, 200]);
    await s.app.services.users.setStatus(s.userId, "disabled");
    assert.equal(await ok(other.apiKey), 200);
    assert.deepEqual([await ok(), await ok(), await ok()], [403, 403, 403]);
  } finally {
    await s.close();
  }
});

Deno.test("unreachable upstream → 502 upstream_unavailable, not counted, warned", async () => {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = listener.addr.port;
  listener.close();
  const s = await setup({ GLM_BASE_URL: `http://127.0.0.1:${port}/v4` });
  try {
    const res = await s.chat();
    assert.equal(res.status, 502);
    assertRateHeaders(res);
    assert.equal(
      res.headers.get("x-ratelimit-remaining-requests"),
      res.headers.get("x-ratelimit-limit-requests"),
      "given back, and the answer says so",
    );
    assert.equal((await errorOf(res)).code, "upstream_unavailable");
    // It never reached the upstream: nothing counted.
    assert.deepEqual(await s.usage(), { requests: 0, promptTokens: 0, completionTokens: 0 });
    assert.ok(s.app.logs.some((l) => l.includes("upstream_unavailable") && l.includes('"warn"')));
    assert.ok(!s.app.logs.some((l) => l.includes(MASTER_KEY)));
  } finally {
    await s.close();
  }
});

Deno.test("no GLM_API_KEY → 503 not_configured", async () => {
  const app = await testApp({ GLM_API_KEY: "" });
  try {
    const res = await app.request("/v1/chat/completions", {
      method: "POST",
      headers: bearer("kw_" + "A".repeat(43)),
      body: JSON.stringify(CHAT),
    });
    assert.equal(res.status, 503);
    assert.equal((await errorOf(res)).code, "not_configured");
    assert.ok(app.logs.some((l) => l.includes('"level":"warn"') && l.includes("GLM_API_KEY")));
  } finally {
    await app.close();
  }
});

Deno.test("over a real port: streaming works and a client disconnect cancels the upstream", async () => {
  const s = await setup();
  const server = Deno.serve(
    { hostname: "127.0.0.1", port: 0, onListen: () => {} },
    createApp(s.app.services).fetch,
  );
  try {
    s.fake.mode = "sse";
    s.fake.holdAfterFirstChunk = true;
    const abort = new AbortController();
    const res = await fetch(`http://127.0.0.1:${server.addr.port}/v1/chat/completions`, {
      method: "POST",
      headers: { ...bearer(s.apiKey), "content-type": "application/json" },
      body: JSON.stringify({ ...CHAT, stream: true }),
      signal: abort.signal,
    });
    assert.equal(res.status, 200);
    const reader = res.body!.getReader();
    assert.match(new TextDecoder().decode((await reader.read()).value), /Hel/);
    assert.equal(s.fake.streamsFinished, 0);
    abort.abort();
    await reader.cancel().catch(() => {});
    // The gateway sees the disconnect and cancels its upstream request.
    for (let i = 0; i < 200 && s.fake.streamsCancelled === 0; i++) {
      await new Promise((r) => setTimeout(r, 10));
    }
    assert.equal(s.fake.streamsCancelled, 1);
    assert.equal(s.fake.streamsFinished, 0);
    assert.equal((await s.usage()).requests, 1);
    assert.ok(s.app.logs.some((l) => l.includes('"outcome":"cancelled"')));
  } finally {
    await server.shutdown();
    await s.close();
  }
});

Deno.test("GET /v1/models lists the allowed models for a valid key", async () => {
  const s = await setup({ ALLOWED_MODELS: "glm-4.6,glm-4.5-air" });
  try {
    const res = await s.app.request("/v1/models", { headers: bearer(s.apiKey) });
    assert.equal(res.status, 200);
    assert.match(res.headers.get("content-type") ?? "", /application\/json/);
    const body = await json<{ object: string; data: Array<{ id: string; object: string }> }>(res);
    assert.equal(body.object, "list");
    assert.deepEqual(body.data.map((m) => [m.id, m.object]), [
      ["glm-4.6", "model"],
      ["glm-4.5-air", "model"],
    ]);
    const anon = await s.app.request("/v1/models");
    assert.equal(anon.status, 401);
    assert.equal((await errorOf(anon)).code, "invalid_api_key");
    const other = await s.chat({ ...CHAT, model: "glm-4.5" });
    assert.equal(other.status, 400);
    assert.equal((await errorOf(other)).code, "model_not_allowed");
  } finally {
    await s.close();
  }
});

Deno.test("ALLOWED_MODELS=* lets any model through", async () => {
  const s = await setup({ ALLOWED_MODELS: "*" });
  try {
    const res = await s.chat({ ...CHAT, model: "glm-5-experimental" });
    assert.equal(res.status, 200);
    await res.text();
    assert.equal(JSON.parse(s.fake.requests[0].body).model, "glm-5-experimental");
  } finally {
    await s.close();
  }
});

/** A KV whose next atomic commit first runs `before` (to land a write between read and commit). */
/** A KV that runs `hook.before` (once) just before its next atomic commit. */
function kvWithHook(kv: Deno.Kv) {
  const hook = { before: null as null | (() => Promise<unknown>) };
  const proxy = interceptCommits(kv, async (commit) => {
    const before = hook.before;
    hook.before = null;
    if (before) await before();
    return await commit();
  });
  return { kv: proxy, hook };
}

Deno.test("a change landing while the admission commits: the upstream call, begun at once, is cancelled and the refusal answered", async (t) => {
  const s = await setup();
  try {
    const { kv, hook } = kvWithHook(s.app.kv);
    const { config, log } = s.app.services;
    const ledger = new Ledger(kv, config, { log });
    const slots = new UpstreamSlots(kv, config, ledger, log);
    const gateway = new Gateway({ config, kv, log, ledger, slots });
    const call = () =>
      gateway.handle(
        openaiChat,
        new Request("http://localhost/v1/chat/completions", {
          method: "POST",
          headers: bearer(s.apiKey),
          body: JSON.stringify(CHAT),
        }),
      ).then(async (r) => (await r.text(), r.status), (e) => e.code);
    await t.step(
      "an admitted request goes through (and this process remembers the user)",
      async () => {
        assert.equal(await call(), 200);
        assert.equal(s.fake.count, 1);
      },
    );
    // The upstream now takes its time: an optimistic call is still waiting when it is cancelled.
    s.fake.mode = "slow_headers";
    await t.step("disable → 403", async () => {
      hook.before = () => s.app.services.users.setStatus(s.userId, "disabled");
      assert.equal(await call(), "user_disabled");
      assert.equal(s.fake.count, 2, "the call began while the admission committed");
      await eventually(() => s.fake.requestsAborted === 1);
      await s.app.services.users.setStatus(s.userId, "active");
    });
    await t.step(
      "rotation → 401; after a conflict the next call waits for the commit",
      async () => {
        // The disable's conflict marked the user contended: no call starts before the commit.
        hook.before = () => s.app.services.users.rotate(s.userId);
        assert.equal(await call(), "invalid_api_key");
        assert.equal(s.fake.count, 2);
      },
    );
    await t.step("only the admitted request counted", async () => {
      assert.equal((await s.usage()).requests, 1);
    });
    await ledger.close();
  } finally {
    await s.close();
  }
});

Deno.test("over a real port: a client leaving before the upstream answers cancels it", async () => {
  // An upstream that never answers, and notices when the caller gives up.
  let upstreamAborted: () => void;
  const aborted = new Promise<void>((r) => upstreamAborted = r);
  const upstream = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen: () => {} }, (req) => {
    return new Promise<Response>((resolve) => {
      req.signal.addEventListener("abort", () => {
        upstreamAborted();
        resolve(new Response("too late"));
      });
      setTimeout(() => resolve(new Response("gave up waiting", { status: 500 })), 8000);
    });
  });
  const app = await testApp({ GLM_BASE_URL: `http://127.0.0.1:${upstream.addr.port}` });
  const server = Deno.serve(
    { hostname: "127.0.0.1", port: 0, onListen: () => {} },
    createApp(app.services).fetch,
  );
  try {
    const { apiKey } = await app.services.users.provision("user_leaver");
    const client = new AbortController();
    const call = fetch(`http://127.0.0.1:${server.addr.port}/v1/chat/completions`, {
      method: "POST",
      headers: { ...bearer(apiKey), "content-type": "application/json" },
      body: JSON.stringify(CHAT),
      signal: client.signal,
    }).catch((err) => err);
    await new Promise((r) => setTimeout(r, 200));
    client.abort();
    assert.ok((await call) instanceof Error);
    const gaveUp = await Promise.race([
      aborted.then(() => true),
      new Promise((r) => setTimeout(() => r(false), 5000)),
    ]);
    assert.equal(gaveUp, true, "the upstream request was cancelled");
    const line = await eventually(() => app.logs.find((l) => l.includes("client disconnected")));
    assert.ok(line, "the cancellation is logged");
    // Not an upstream failure: an info line with nginx's 499, and no warning.
    assert.match(line, /"level":"info".*"status":499,"outcome":"cancelled"/);
    assert.ok(!app.logs.some((l) => l.includes('"level":"warn"')));
  } finally {
    await server.shutdown();
    await upstream.shutdown();
    await app.close();
  }
});

Deno.test("another process takes the last of the allowance while this one commits: cancelled upstream, 429", async () => {
  const dir = await Deno.makeTempDir();
  const fake = new FakeGlm();
  const env = {
    GLM_BASE_URL: fake.baseUrl,
    DENO_KV_PATH: `${dir}/kv.sqlite3`,
    RATE_LIMIT_RPD: "3",
  };
  const a = await testApp(env);
  const b = await testApp(env);
  try {
    const { apiKey } = await a.services.users.provision("user_race");
    const chat = (app: TestApp) =>
      app.request("/v1/chat/completions", {
        method: "POST",
        headers: { ...bearer(apiKey), "content-type": "application/json" },
        body: JSON.stringify(CHAT),
      });
    const first = await chat(a); // A now remembers the user's rate entry (1 of 3 used today)
    assert.equal(first.status, 200);
    await first.text();
    for (let i = 0; i < 2; i++) { // B takes the other two
      const res = await chat(b);
      assert.equal(res.status, 200);
      await res.text();
    }
    fake.mode = "slow_headers";
    // A decides on what it remembers (1 used: admitted, with one to spare), starts the upstream
    // call, and its commit fails on B's writes: decided again on fresh reads, refused, and the
    // call cancelled.
    const third = await chat(a);
    assert.equal(third.status, 429);
    assert.equal(
      (await json<{ error: { code: string } }>(third)).error.code,
      "rate_limit_exceeded",
    );
    assert.equal(third.headers.get("x-should-retry"), "false");
    assert.equal(fake.count, 4, "the call began while the admission committed");
    await eventually(() => fake.requestsAborted === 1);
    const usage = await userUsage(a.kv, a.services.config.pricing, "user_race", 1);
    assert.equal(usage.today.requests, 3);
  } finally {
    await a.close();
    await b.close();
    await fake.close();
    await Deno.remove(dir, { recursive: true });
  }
});
