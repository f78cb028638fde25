/**
 * MAX_REQUEST_BYTES (CONTRACT §2): the largest /v1/* body. Over it, declared or chunked, is 413
 * payload_too_large in the endpoint's own error shape, saying the limit in MiB; under it is served.
 */
import assert from "node:assert/strict";
import { json } from "../support/helpers.ts";
import { CHAT, type Setup, setup } from "../support/gateway_setup.ts";

const LIMIT = 200_000;

/** A JSON body of exactly `size` bytes for the endpoint (padding in an extra field). */
function bodyOf(path: string, size: number): Uint8Array<ArrayBuffer> {
  const base = path === "/v1/messages" ? { ...CHAT, max_tokens: 8 } : CHAT;
  const empty = JSON.stringify({ ...base, pad: "" }).length;
  const text = JSON.stringify({ ...base, pad: "x".repeat(size - empty) });
  assert.equal(text.length, size);
  return new TextEncoder().encode(text);
}

/** The body as a stream of 16 KiB chunks: no content-length, so it is read until the limit. */
function chunked(bytes: Uint8Array<ArrayBuffer>): ReadableStream<Uint8Array<ArrayBuffer>> {
  return new ReadableStream({
    start(c) {
      for (let i = 0; i < bytes.length; i += 16 * 1024) c.enqueue(bytes.subarray(i, i + 16384));
      c.close();
    },
  });
}

/** Sends the bytes with their content-length, or a stream without one. */
function send(
  s: Setup,
  path: string,
  body: Uint8Array<ArrayBuffer> | ReadableStream<Uint8Array<ArrayBuffer>>,
) {
  const headers: Record<string, string> = {
    authorization: `Bearer ${s.apiKey}`,
    "content-type": "application/json",
  };
  if (body instanceof Uint8Array) headers["content-length"] = String(body.byteLength);
  return s.app.request(path, { method: "POST", headers, body });
}

Deno.test("MAX_REQUEST_BYTES: a body just over it is 413 in each endpoint's shape", async (t) => {
  const s = await setup({ MAX_REQUEST_BYTES: String(LIMIT) });
  try {
    for (const path of ["/v1/chat/completions", "/v1/messages"]) {
      const over = bodyOf(path, LIMIT + 1);
      for (const [how, body] of [["declared", over], ["chunked", chunked(over)]] as const) {
        await t.step(`${path}, ${how}`, async () => {
          const res = await send(s, path, body);
          assert.equal(res.status, 413);
          assert.match(res.headers.get("content-type") ?? "", /application\/json/);
          const got = await json<{ type?: string; error: Record<string, string> }>(res);
          assert.equal(got.error.code, "payload_too_large");
          assert.equal(got.error.message, "Request body is larger than 0.19 MiB.");
          if (path === "/v1/messages") {
            assert.equal(got.type, "error");
            assert.equal(got.error.type, "request_too_large");
          } else {
            assert.equal(got.error.type, undefined, "OpenAI shape: code and message only");
          }
        });
      }
    }
    assert.equal(s.fake.count, 0);
    assert.equal((await s.usage()).requests, 0, "refused bodies count against nothing");
  } finally {
    await s.close();
  }
});

Deno.test("MAX_REQUEST_BYTES: a body at the limit is served, declared or chunked", async (t) => {
  const s = await setup({ MAX_REQUEST_BYTES: String(LIMIT) });
  try {
    for (const path of ["/v1/chat/completions", "/v1/messages"]) {
      const exact = bodyOf(path, LIMIT);
      for (const [how, body] of [["declared", exact], ["chunked", chunked(exact)]] as const) {
        await t.step(`${path}, ${how}`, async () => {
          const res = await send(s, path, body);
          assert.equal(res.status, 200);
          await res.text();
        });
      }
    }
    assert.equal(s.fake.count, 4);
  } finally {
    await s.close();
  }
});
