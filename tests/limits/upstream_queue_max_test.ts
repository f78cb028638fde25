/**
 * CONTRACT §2 UPSTREAM_QUEUE_MAX, §5 "Upstream capacity is shared fairly": at most that many
 * requests wait for upstream slots at once, across all processes; beyond it 503 `upstream_busy`
 * at once, nothing counted. Requests a dead process left waiting do not fill the queue.
 */
import assert from "node:assert/strict";
import { keys, u64 } from "../../lib/core/kv.ts";
import { bearer, eventually, serveGateway } from "../support/helpers.ts";

const CHAT = { model: "glm-4.6", stream: true, messages: [{ role: "user", content: "hi" }] };

function ask(url: string, key: string) {
  return fetch(`${url}/v1/chat/completions`, {
    method: "POST",
    headers: { ...bearer(key), "content-type": "application/json" },
    body: JSON.stringify(CHAT),
  });
}

async function waiting(kv: Deno.Kv): Promise<number> {
  const [i, o] = await kv.getMany([keys.upstreamQueueCount("in"), keys.upstreamQueueCount("out")]);
  return u64(i.value) - u64(o.value);
}

Deno.test("UPSTREAM_QUEUE_MAX exceeded → 503 upstream_busy at once with Retry-After, nothing counted; those in line are served", async () => {
  const s = await serveGateway({
    UPSTREAM_CONCURRENCY: '{"glm-4.6": 1}',
    UPSTREAM_QUEUE_MAX: "2",
    UPSTREAM_QUEUE_MS: "10000",
    UPSTREAM_USER_SHARE: "1",
    RATE_LIMIT_RPM: "1000",
  }, "user_queue_max");
  const answers: Promise<Response>[] = [];
  try {
    s.fake.mode = "sse";
    s.fake.holdAfterFirstChunk = true;
    const holder = await ask(s.url, s.apiKey);
    assert.equal(holder.status, 200);
    answers.push(ask(s.url, s.apiKey), ask(s.url, s.apiKey));
    await eventually(async () => await waiting(s.app.kv) === 2);
    const started = performance.now();
    const refused = await ask(s.url, s.apiKey);
    const ms = performance.now() - started;
    assert.equal(refused.status, 503);
    assert.match(refused.headers.get("content-type") ?? "", /application\/json/);
    const body = await refused.json();
    assert.equal(body.error.code, "upstream_busy");
    assert.match(body.error.message, /Nothing was counted/);
    assert.match(refused.headers.get("retry-after") ?? "", /^\d+$/);
    assert.ok(ms < 1000, `refused after ${Math.round(ms)} ms, not after a wait`);
    // Given back: as many left as after the holder (the two waiting are admitted too).
    assert.equal(
      Number(refused.headers.get("x-ratelimit-remaining-requests")),
      Number(holder.headers.get("x-ratelimit-remaining-requests")) - 2,
    );
    assert.equal(s.fake.count, 1);
    // The holder ends; the two in line are served one after the other.
    s.fake.release();
    await holder.text();
    const first = await answers[0];
    assert.equal(first.status, 200);
    s.fake.release();
    await first.text();
    const second = await answers[1];
    assert.equal(second.status, 200);
    s.fake.release();
    await second.text();
    assert.equal(s.fake.count, 3);
    assert.equal((await s.today()).requests, 3, "the refused request is not counted");
    assert.equal(await waiting(s.app.kv), 0, "every ticket counted out");
  } finally {
    s.fake.holdAfterFirstChunk = false;
    s.fake.release();
    await Promise.allSettled(answers);
    await s.close();
  }
});

Deno.test("requests a dead process left waiting do not fill the queue: their tickets are swept and counted out", async () => {
  const s = await serveGateway({
    UPSTREAM_CONCURRENCY: '{"glm-4.6": 1}',
    UPSTREAM_QUEUE_MAX: "2",
    UPSTREAM_QUEUE_MS: "10000",
    RATE_LIMIT_RPM: "1000",
  }, "user_queue_dead");
  let waiter: Promise<Response> | undefined;
  try {
    // Two waiters of a process that died a minute ago: counted in, never counted out.
    const long = Date.now() - 60_000;
    const op = s.app.kv.atomic().sum(keys.upstreamQueueCount("in"), 2n);
    for (let i = 0; i < 2; i++) {
      op.set(keys.upstreamTicket("glm-4.6", `${String(long).padStart(15, "0")}-dead-${i}`), {
        deadline: long + 10_000,
        user: "user_gone",
        round: 0,
        counted: true,
      });
    }
    await op.commit();
    assert.equal(await waiting(s.app.kv), 2);
    s.fake.mode = "sse";
    s.fake.holdAfterFirstChunk = true;
    const holder = await ask(s.url, s.apiKey);
    assert.equal(holder.status, 200);
    waiter = ask(s.url, s.apiKey);
    await eventually(async () => await waiting(s.app.kv) === 1);
    s.fake.release();
    await holder.text();
    const served = await waiter;
    assert.equal(served.status, 200, "the queue was not full: the dead process's tickets went");
    s.fake.release();
    await served.text();
    assert.equal(await waiting(s.app.kv), 0);
  } finally {
    s.fake.holdAfterFirstChunk = false;
    s.fake.release();
    await waiter?.then((r) => r.body?.cancel()).catch(() => {});
    await s.close();
  }
});
