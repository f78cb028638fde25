/**
 * CONTRACT §5 "Upstream capacity is shared fairly": a client that leaves while its request waits
 * for an upstream slot is never sent upstream and is charged nothing, whatever the size of its
 * body. Deno.serve misses a hang-up before the response headers when the request body is over
 * about 400 bytes (README "Known limitations"), so these bodies are 2.4 KB: a streamed request
 * that waits is answered at once (lib/gateway/waiting_stream.ts) and its hang-up is seen.
 */
import assert from "node:assert/strict";
import { keys, u64 } from "../../lib/core/kv.ts";
import { bearer, eventually, serveGateway } from "../support/helpers.ts";

const LONG = "a sentence of a real conversation, long enough to matter. ".repeat(45); // 2.6 KB

/** A streamed chat request with a 2.6 KB body. */
function ask(url: string, key: string, signal?: AbortSignal): Promise<Response> {
  return fetch(`${url}/v1/chat/completions`, {
    method: "POST",
    headers: { ...bearer(key), "content-type": "application/json" },
    body: JSON.stringify({
      model: "glm-4.6",
      stream: true,
      messages: [{ role: "user", content: LONG }],
    }),
    signal,
  });
}

Deno.test("5 clients with 2.4 KB streamed bodies give up while waiting for a slot: none reaches GLM, none is charged", async () => {
  const s = await serveGateway(
    {
      UPSTREAM_CONCURRENCY: '{"glm-4.6": 1}',
      UPSTREAM_QUEUE_MS: "30000",
      RATE_LIMIT_RPM: "1000",
    },
    "user_ghost_holder",
  );
  try {
    s.fake.mode = "sse";
    s.fake.holdAfterFirstChunk = true;
    const holder = await ask(s.url, s.apiKey);
    assert.equal(holder.status, 200);
    await eventually(() => s.fake.count === 1);

    const users: string[] = [];
    for (let i = 0; i < 5; i++) {
      users.push((await s.app.services.users.provision(`user_ghost_${i}`)).apiKey);
    }
    assert.ok(new TextEncoder().encode(LONG).byteLength > 2400);
    const outcomes = await Promise.all(users.map(async (key) => {
      try {
        const res = await ask(s.url, key, AbortSignal.timeout(2_000));
        await res.text();
        return `answered ${res.status}`;
      } catch (err) {
        return (err as Error).name;
      }
    }));
    assert.deepEqual(outcomes, Array(5).fill("TimeoutError"));

    // The waits ended when the clients left: no ticket in line, nothing held for them.
    await eventually(async () => {
      let tickets = 0;
      for await (const _ of s.app.kv.list({ prefix: keys.upstreamTickets("glm-4.6") })) tickets++;
      return tickets === 0;
    });
    // The slot frees: nobody is left in line, so GLM gets nothing more.
    s.fake.release();
    await holder.text();
    await new Promise((r) => setTimeout(r, 500));
    assert.equal(s.fake.count, 1, "only the holder's request reached GLM");
    for (let i = 0; i < 5; i++) {
      const held = await s.app.kv.get(keys.leaseHeld(`user_ghost_${i}`, "count"));
      assert.equal(u64(held.value), 0, `user ${i} holds nothing`);
      const res = await fetch(`${s.url}/api/usage?days=1`, { headers: bearer(users[i]) });
      const today = (await res.json()).today;
      // Counted as a request the client sent, with nothing used: no token, no cost.
      assert.deepEqual(
        [today.promptTokens, today.completionTokens, today.costUsd],
        [0, 0, 0],
        `user ${i} was charged nothing: ${JSON.stringify(today)}`,
      );
    }
  } finally {
    s.fake.release();
    await s.close();
  }
});

Deno.test("a streamed request that waits gets its answer through the early stream, charged once", async () => {
  const s = await serveGateway(
    { UPSTREAM_CONCURRENCY: '{"glm-4.6": 1}', UPSTREAM_QUEUE_MS: "30000" },
    "user_wait_holder",
  );
  try {
    s.fake.mode = "sse";
    s.fake.holdAfterFirstChunk = true;
    const holder = await ask(s.url, s.apiKey);
    await eventually(() => s.fake.count === 1);
    const other = (await s.app.services.users.provision("user_wait_other")).apiKey;
    const waiting = await ask(s.url, other);
    assert.equal(waiting.status, 200);
    assert.match(waiting.headers.get("content-type") ?? "", /text\/event-stream/);
    s.fake.holdAfterFirstChunk = false;
    s.fake.release();
    await holder.text();
    const text = await waiting.text();
    assert.match(text, /^: waiting for an upstream slot/);
    assert.match(text, /data: \[DONE\]/);
    const res = await fetch(`${s.url}/api/usage?days=1`, { headers: bearer(other) });
    assert.equal((await res.json()).today.requests, 1);
  } finally {
    s.fake.release();
    await s.close();
  }
});
