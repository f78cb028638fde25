/**
 * The per-request log (CONTRACT §5 "Requests"): after JSON, streamed, cut, upstream-failed and
 * refused requests the log holds exactly the right entries, each admitted request's written in
 * the commit that settles it (the suite's KV wrapper reports every commit), refusals grouped per
 * user, code and minute, and every entry written to expire after REQUEST_LOG_DAYS.
 */
import assert from "node:assert/strict";
import { type CommitChange, observeCommits } from "../support/kv_limits.ts";
import { bearer, eventually, json, serveGateway } from "../support/helpers.ts";
import { CHAT, post } from "../support/gateway_setup.ts";
import { costUsd as priced, roundUsd } from "../../lib/usage/pricing.ts";
import { DAY_MS } from "../../lib/core/utc.ts";
import type { RequestEntryBody, RequestsBody } from "../../lib/api_types.ts";

const isLogKey = (k: Deno.KvKey) => k[0] === "request_log" || k[0] === "request_log_by_user";
const isLease = (k: Deno.KvKey) => k[0] === "leases";

/** The user's own log, through GET /api/requests with their key (as a client reads it). */
async function ownLog(url: string, apiKey: string, query = ""): Promise<RequestsBody> {
  const res = await fetch(`${url}/api/requests${query}`, { headers: bearer(apiKey) });
  assert.equal(res.status, 200, await res.clone().text());
  assert.match(res.headers.get("content-type") ?? "", /application\/json/);
  return await json<RequestsBody>(res);
}

Deno.test("after JSON, streamed, cut, upstream-failed and refused requests the log holds exactly the right entries, each written in its settlement's commit", async () => {
  const commits: CommitChange[][] = [];
  const stop = observeCommits((changes) => commits.push([...changes]));
  const s = await serveGateway({ REQUEST_LOG_DAYS: "3" }, "user_logged");
  try {
    const ua = "Keyway-Test/1.0 \tbell\u00e9 " + "x".repeat(100);
    const send = (body: unknown, path = "/v1/chat/completions", headers = {}) =>
      fetch(`${s.url}${path}`, {
        method: "POST",
        headers: {
          ...bearer(s.apiKey),
          "content-type": "application/json",
          "user-agent": ua,
          ...headers,
        },
        body: JSON.stringify(body),
      });
    const ids: Record<string, string> = {};

    // 1. JSON, asked for as an alias in another casing.
    let res = await send({ ...CHAT, model: "GLM-4.6" });
    assert.equal(res.status, 200);
    await res.text();
    ids.json = res.headers.get("x-request-id")!;

    // 2. Anthropic JSON for a Claude model name (an alias of glm-5.1).
    res = await send({
      model: "claude-sonnet-4-5",
      max_tokens: 50,
      messages: [{ role: "user", content: "hi" }],
    }, "/v1/messages");
    assert.equal(res.status, 200);
    await res.text();
    ids.messages = res.headers.get("x-request-id")!;

    // 3. Streamed to its end.
    s.fake.mode = "sse";
    res = await send({ ...CHAT, stream: true });
    assert.equal(res.status, 200);
    assert.match(await res.text(), /\[DONE\]/);
    ids.stream = res.headers.get("x-request-id")!;

    // 4. Cut: the client leaves mid-stream.
    s.fake.holdAfterFirstChunk = true;
    res = await send({ ...CHAT, stream: true });
    assert.equal(res.status, 200);
    ids.cut = res.headers.get("x-request-id")!;
    const reader = res.body!.getReader();
    await reader.read();
    await reader.cancel();
    s.fake.release();
    s.fake.holdAfterFirstChunk = false;

    // 5. The upstream fails (a 5xx, relayed; not counted).
    s.fake.mode = "error500";
    res = await send(CHAT);
    assert.equal(res.status, 500);
    await res.text();
    ids.failed = res.headers.get("x-request-id")!;

    // 6. Refused three times for a model that is not allowed (one entry, count 3), and once
    //    with a bad key (401: nobody to log it for).
    for (let i = 0; i < 3; i++) {
      res = await send({ ...CHAT, model: "not-a-model" });
      assert.equal(res.status, 400);
      await res.text();
    }
    res = await post(s.url, "kw_" + "A".repeat(43), CHAT);
    assert.equal(res.status, 401);
    await res.text();

    const log = await eventually(
      async () => {
        const page = await ownLog(s.url, s.apiKey);
        return page.requests.length === 6 && page.requests.some((r) => r.count === 3)
          ? page
          : undefined;
      },
      5000,
      async () => (await ownLog(s.url, s.apiKey)).requests.map((r) => [r.id, r.count]),
    );
    assert.equal(log.next, null);
    const at = log.requests.map((r) => Date.parse(r.at));
    assert.deepEqual(at, [...at].sort((a, b) => b - a), "newest first");
    const byId = new Map(log.requests.map((r) => [r.id, r]));
    const client = "Keyway-Test/1.0 bell " + "x".repeat(59);
    const pricing = s.app.services.config.pricing;
    /** What the pricing table says, rounded as the JSON shows money (to 1e-9 USD). */
    const costUsd = (...a: Parameters<typeof priced>) => roundUsd(priced(...a));
    const base = {
      userId: "user_logged",
      keyId: "default",
      endpoint: "/v1/chat/completions",
      model: "glm-4.6",
      requestedModel: "glm-4.6",
      stream: false,
      status: 200,
      code: null,
      cachedTokens: 0,
      estimated: false,
      queueMs: 0,
      client,
      count: 1,
    };
    /** An entry without the measured times, which are checked apart. */
    const fixed = (e: RequestEntryBody | undefined) => {
      assert.ok(e, "entry present");
      const { at, durationMs, ttfbMs, ...rest } = e;
      assert.ok(Number.isFinite(Date.parse(at)));
      assert.ok(Number.isInteger(durationMs) && durationMs >= 0);
      assert.ok(ttfbMs === null || (Number.isInteger(ttfbMs) && ttfbMs <= durationMs));
      return rest;
    };
    assert.deepEqual(fixed(byId.get(ids.json)), {
      ...base,
      id: ids.json,
      requestedModel: "GLM-4.6",
      promptTokens: 11,
      completionTokens: 7,
      costUsd: costUsd(pricing, "glm-4.6", 11, 7),
    });
    assert.deepEqual(fixed(byId.get(ids.messages)), {
      ...base,
      id: ids.messages,
      endpoint: "/v1/messages",
      model: "glm-5.1",
      requestedModel: "claude-sonnet-4-5",
      promptTokens: 11,
      completionTokens: 7,
      costUsd: costUsd(pricing, "glm-5.1", 11, 7),
    });
    assert.deepEqual(fixed(byId.get(ids.stream)), {
      ...base,
      id: ids.stream,
      stream: true,
      promptTokens: 11,
      completionTokens: 7,
      costUsd: costUsd(pricing, "glm-4.6", 11, 7),
    });
    // Cut: no usage came, so the estimate — the prompt's, and what was relayed.
    const cut = fixed(byId.get(ids.cut));
    assert.equal(cut.estimated, true);
    assert.ok(cut.promptTokens > 0, "the prompt estimate is charged");
    assert.deepEqual(cut, {
      ...base,
      id: ids.cut,
      stream: true,
      estimated: true,
      promptTokens: cut.promptTokens,
      completionTokens: cut.completionTokens,
      costUsd: costUsd(pricing, "glm-4.6", cut.promptTokens, cut.completionTokens),
    });
    assert.deepEqual(fixed(byId.get(ids.failed)), {
      ...base,
      id: ids.failed,
      status: 500,
      promptTokens: 0,
      completionTokens: 0,
      costUsd: 0,
    });
    assert.ok(byId.get(ids.json)!.ttfbMs !== null, "an answer's headers arrived");
    const refused = log.requests.find((r) => r.count === 3)!;
    assert.deepEqual({ ...refused, id: "", durationMs: 0 }, {
      ...base,
      id: "",
      at: new Date(Math.floor(Date.parse(refused.at) / 60_000) * 60_000).toISOString(),
      model: null,
      requestedModel: "not-a-model",
      status: 400,
      code: "model_not_allowed",
      promptTokens: 0,
      completionTokens: 0,
      costUsd: 0,
      durationMs: 0,
      ttfbMs: null,
      count: 3,
    });
    assert.ok(!JSON.stringify(log).includes(s.apiKey), "no key in the log");
    // Not even a key a client puts in its User-Agent.
    res = await send(CHAT, undefined, { "user-agent": `leaky/1.0 ${s.apiKey}` });
    assert.equal(res.status, 500);
    await res.text();
    const leaky = (await ownLog(s.url, s.apiKey)).requests[0];
    assert.equal(leaky.client, "leaky/1.0 kw_…");
    // Nor one it puts in the model it asks for (refused: no such model).
    res = await send({ ...CHAT, model: `m-${s.apiKey}` });
    assert.equal(res.status, 400);
    await res.text();
    // Refusals reach the log within a second or so (each process writes its groups at most once
    // a second); the group of this minute now shows the latest model asked for.
    let asked: string | null | undefined;
    for (let i = 0; i < 40 && !asked?.startsWith("m-"); i++) {
      await new Promise((r) => setTimeout(r, 100));
      asked = (await ownLog(s.url, s.apiKey)).requests
        .find((r) => r.code === "model_not_allowed")?.requestedModel;
    }
    assert.equal(asked, "m-kw_…");
    assert.ok(!JSON.stringify(log).includes("hi"), "no prompt in the log");
    assert.ok(!JSON.stringify(log).includes("Hello"), "no answer in the log");

    // Each admitted request's entry (both index keys) was set in exactly one commit, the one that
    // deleted its lease: no commit of its own. Each admitted request made two lease commits.
    for (const id of [ids.json, ids.messages, ids.stream, ids.cut, ids.failed]) {
      const writes = commits.filter((c) => c.some((m) => isLogKey(m.key) && m.key.at(-1) === id));
      assert.equal(writes.length, 1, `one commit wrote ${id}`);
      const [commit] = writes;
      assert.equal(commit.filter((m) => isLogKey(m.key) && m.key.at(-1) === id).length, 2);
      assert.ok(commit.some((m) => m.type === "delete" && isLease(m.key)), "the settlement");
    }
    assert.equal(
      commits.filter((c) => c.some((m) => isLease(m.key))).length,
      2 * 6,
      "two per admitted request",
    );
    // Log writes that settle nothing are the refusal groups' only.
    for (const c of commits.filter((c) => c.some((m) => isLogKey(m.key)))) {
      if (c.some((m) => isLease(m.key))) continue;
      assert.ok(c.every((m) => isLogKey(m.key) && String(m.key.at(-2)).startsWith("~")));
    }
    // Kept REQUEST_LOG_DAYS: every log write expires then.
    const logWrites = commits.flat().filter((m) => isLogKey(m.key));
    assert.ok(logWrites.length >= 12);
    for (const m of logWrites) {
      assert.equal(m.type, "set");
      assert.equal(m.expireIn, 3 * DAY_MS);
    }
  } finally {
    stop();
    s.fake.release();
    await s.close();
  }
});

Deno.test("REQUEST_LOG_DAYS=0: no log is written and the settlement commits are the same as with one", async () => {
  /** Commits of one JSON request after a first one (heartbeat written), and what they change. */
  const oneRequest = async (days: string) => {
    const s = await serveGateway({ REQUEST_LOG_DAYS: days }, `user_days_${days}`);
    const commits: CommitChange[][] = [];
    try {
      const warm = await post(s.url, s.apiKey);
      await warm.text();
      const stop = observeCommits((changes) => commits.push([...changes]));
      const res = await post(s.url, s.apiKey);
      assert.equal(res.status, 200);
      await res.text();
      stop();
      const page = await (await fetch(`${s.url}/api/requests`, { headers: bearer(s.apiKey) }))
        .json();
      return { commits: commits.filter((c) => c.some((m) => isLease(m.key))), page };
    } finally {
      await s.close();
    }
  };
  const off = await oneRequest("0");
  const on = await oneRequest("14");
  assert.deepEqual(off.page, { requests: [], next: null });
  assert.equal(on.page.requests.length, 2);
  assert.equal(off.commits.length, 2, "admission and settlement");
  assert.equal(on.commits.length, off.commits.length, "the log adds no commit");
  assert.ok(off.commits.flat().every((m) => !isLogKey(m.key)));
  // The settlement carries two sets more, nothing else changes.
  const settleOn = on.commits.find((c) => c.some((m) => m.type === "delete"))!;
  const settleOff = off.commits.find((c) => c.some((m) => m.type === "delete"))!;
  assert.equal(settleOn.length, settleOff.length + 2);
  assert.equal(settleOn.filter((m) => isLogKey(m.key)).length, 2);
});

Deno.test("refusals before the key is looked up (no GLM_API_KEY: 503 not_configured) are logged for the key's user", async () => {
  const s = await serveGateway({ GLM_API_KEY: "" }, "user_unconfigured");
  try {
    for (let i = 0; i < 2; i++) {
      const res = await post(s.url, s.apiKey);
      assert.equal(res.status, 503);
      assert.equal((await res.json()).error.code, "not_configured");
    }
    const bad = await post(s.url, "kw_" + "C".repeat(43));
    assert.equal(bad.status, 503, "refused before its key is read");
    await bad.text();
    const page = await eventually(
      async () => {
        const p = await ownLog(s.url, s.apiKey);
        return p.requests[0]?.count === 2 ? p : undefined;
      },
      5000,
      async () => (await ownLog(s.url, s.apiKey)).requests,
    );
    assert.equal(page.requests.length, 1);
    assert.equal(page.requests[0].code, "not_configured");
    assert.equal(page.requests[0].status, 503);
    assert.equal(page.requests[0].count, 2, "the unknown key's refusal is nobody's");
    await new Promise((r) => setTimeout(r, 1200)); // a later write would have come by now
    assert.deepEqual((await ownLog(s.url, s.apiKey)).requests.map((r) => r.count), [2]);
  } finally {
    await s.close();
  }
});
