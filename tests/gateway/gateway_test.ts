/**
 * The gateway's front door: bad requests refused before the upstream and counted against nothing,
 * a request id and nosniff on every answer, and the models a key may use.
 */
import assert from "node:assert/strict";
import { bearer, json } from "../support/helpers.ts";
import { assertRateHeaders, CHAT, drain, errorOf, setup } from "../support/gateway_setup.ts";

Deno.test("bad requests are refused before the upstream and count against nothing", async (t) => {
  const s = await setup({ RATE_LIMIT_RPM: "3", MAX_REQUEST_BYTES: String(1024 * 1024) });
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
  const s = await setup({ RATE_LIMIT_RPM: "1", MAX_REQUEST_BYTES: String(1024 * 1024) });
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
