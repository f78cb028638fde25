/**
 * Refusals in the request log: at most one entry per user, code and minute, its `count` summed
 * across processes (each process writes its own part; listings merge them, pages never split
 * one), and written by at most one commit a second per process however many refusals arrive.
 */
import assert from "node:assert/strict";
import { type CommitChange, observeCommits } from "../support/kv_limits.ts";
import { loadConfig } from "../../lib/core/config.ts";
import { type Refusal, RequestLog } from "../../lib/observe/request_log.ts";

const config = loadConfig({ DENO_KV_PATH: ":memory:", REQUEST_LOG_DAYS: "2" });
const MINUTE = 60_000;
const T0 = Date.parse("2026-12-06T14:02:00Z");

const refusal = (code: string, status: number, n: number): Refusal => ({
  id: `req-${code}-${n}`,
  keyId: "default",
  endpoint: "/v1/chat/completions",
  model: "glm-4.6",
  requestedModel: "glm-4.6",
  stream: false,
  status,
  code,
  durationMs: 1,
  userAgent: "curl/8.5.0",
});

Deno.test("refusals of two processes: one entry per user, code and minute, counts summed, never split by a page", async () => {
  const kv = await Deno.openKv(":memory:");
  let now = T0 + 5_000;
  const clock = () => now;
  const a = new RequestLog(kv, config, { clock });
  const b = new RequestLog(kv, config, { clock });
  try {
    for (let i = 0; i < 3; i++) a.refused("user_r", refusal("rate_limit_exceeded", 429, i));
    for (let i = 0; i < 2; i++) b.refused("user_r", refusal("rate_limit_exceeded", 429, 10 + i));
    a.refused("user_r", refusal("quota_exceeded", 403, 0));
    b.refused("user_other", refusal("rate_limit_exceeded", 429, 20));
    await Promise.all([a.flush(), b.flush()]);
    now = T0 + MINUTE + 1_000;
    a.refused("user_r", refusal("rate_limit_exceeded", 429, 30));
    await Promise.all([a.close(), b.close()]);

    const page = await a.list({ userId: "user_r", limit: 50 });
    const shape = page.requests.map((r) => [r.at, r.code, r.status, r.count]);
    assert.deepEqual(shape, [
      [new Date(T0 + MINUTE).toISOString(), "rate_limit_exceeded", 429, 1],
      [new Date(T0).toISOString(), "rate_limit_exceeded", 429, 5],
      [new Date(T0).toISOString(), "quota_exceeded", 403, 1],
    ]);
    assert.equal(page.next, null);
    const group = page.requests[1];
    assert.equal(group.client, "curl/8.5.0");
    assert.equal(group.userId, "user_r");
    assert.equal(group.promptTokens + group.completionTokens + group.costUsd, 0);

    // Pages of one: the group of five, written by two processes, is one entry on one page.
    const seen: Array<[string | null, number]> = [];
    let cursor: string | undefined;
    do {
      const one = await a.list({ userId: "user_r", limit: 1, cursor });
      seen.push(...one.requests.map((r): [string | null, number] => [r.code, r.count]));
      cursor = one.next ?? undefined;
    } while (cursor);
    assert.deepEqual(seen, [
      ["rate_limit_exceeded", 1],
      ["rate_limit_exceeded", 5],
      ["quota_exceeded", 1],
    ]);
    // Everyone's log: the same groups, and the other user's apart.
    const all = await a.list({ limit: 50 });
    assert.deepEqual(all.requests.map((r) => [r.userId, r.code, r.count]), [
      ["user_r", "rate_limit_exceeded", 1],
      ["user_r", "rate_limit_exceeded", 5],
      ["user_r", "quota_exceeded", 1],
      ["user_other", "rate_limit_exceeded", 1],
    ]);
  } finally {
    await a.close();
    await b.close();
    kv.close();
  }
});

Deno.test("a refusal storm costs one commit a second: 500 refusals, one write of their group", async () => {
  const kv = await Deno.openKv(":memory:");
  const log = new RequestLog(kv, config);
  const commits: CommitChange[][] = [];
  const stop = observeCommits((changes) => {
    if (changes.some((m) => m.key[0] === "request_log")) commits.push([...changes]);
  });
  try {
    const started = Date.now();
    for (let i = 0; i < 500; i++) log.refused("user_storm", refusal("rate_limit_exceeded", 429, i));
    assert.equal(commits.length, 0, "no commit on the refusal's path");
    const page = await (async () => {
      for (;;) {
        const p = await log.list({ userId: "user_storm", limit: 10 });
        if (p.requests.length) return p;
        await new Promise((r) => setTimeout(r, 50));
      }
    })();
    assert.ok(Date.now() - started >= 900, "written after about a second");
    assert.equal(page.requests.length, 1);
    assert.equal(page.requests[0].count, 500);
    assert.equal(commits.length, 1);
    assert.equal(commits[0].length, 2, "the group's two index keys");
    assert.ok(commits[0].every((m) => m.type === "set" && m.expireIn === 2 * 86_400_000));
  } finally {
    stop();
    await log.close();
    kv.close();
  }
});

Deno.test("REQUEST_LOG_DAYS=0: refusals are not kept either", async () => {
  const kv = await Deno.openKv(":memory:");
  const log = new RequestLog(kv, loadConfig({ DENO_KV_PATH: ":memory:", REQUEST_LOG_DAYS: "0" }));
  try {
    log.refused("user_off", refusal("rate_limit_exceeded", 429, 0));
    await log.close();
    assert.deepEqual(await log.list({ limit: 10 }), { requests: [], next: null });
  } finally {
    kv.close();
  }
});
