/**
 * Several real app processes on one KV file: limits stay exact across them, and a SIGKILL in
 * the middle of load loses or doubles nothing beyond the requests in flight.
 */
import assert from "node:assert/strict";
import { keys, u64 } from "../../../lib/core/kv.ts";
import type { RateState } from "../../../lib/limits/gcra.ts";
import { eventually, processEnv, usageTotalsOf } from "../../support/helpers.ts";
import { ClerkIssuer } from "../../../testing/fakes/clerk_issuer.ts";
import { FakeGlm } from "../../../testing/fakes/glm.ts";
import { type RunningMain, startMain } from "../../support/subprocess.ts";

const issuer = await ClerkIssuer.create();

const env = (kvPath: string, glm: FakeGlm, extra: Record<string, string> = {}) =>
  processEnv(kvPath, glm, issuer, extra);

async function provision(app: RunningMain, userId: string): Promise<string> {
  const res = await fetch(`${app.url}/api/key`, {
    headers: { authorization: `Bearer ${await issuer.token(userId, { ttlSeconds: 600 })}` },
  });
  assert.equal(res.status, 200);
  return (await res.json()).apiKey;
}

function chat(app: RunningMain, key: string): Promise<Response> {
  return fetch(`${app.url}/v1/chat/completions`, {
    method: "POST",
    headers: { authorization: `Bearer ${key}`, "content-type": "application/json" },
    body: JSON.stringify({ model: "glm-4.6", messages: [{ role: "user", content: "hi" }] }),
  });
}

/** A streamed chat request (held by the fake when it holds streams). */
function streamChat(app: RunningMain, key: string): Promise<Response> {
  return fetch(`${app.url}/v1/chat/completions`, {
    method: "POST",
    headers: { authorization: `Bearer ${key}`, "content-type": "application/json" },
    body: JSON.stringify({
      model: "glm-4.6",
      messages: [{ role: "user", content: "hi" }],
      stream: true,
      max_tokens: 50,
    }),
  });
}

/** Today's usage as GET /api/usage tells the key's owner. */
async function todayUsage(app: RunningMain, key: string) {
  const res = await fetch(`${app.url}/api/usage?days=1`, {
    headers: { authorization: `Bearer ${key}` },
  });
  assert.equal(res.status, 200);
  const { requests, promptTokens, completionTokens } = (await res.json()).today;
  return { requests, promptTokens, completionTokens };
}

async function countUsage(kvPath: string, userId: string) {
  const kv = await Deno.openKv(kvPath);
  try {
    const rate = (await kv.get<RateState>(keys.rate(userId))).value;
    // The limit counts one UTC day: compare it with that day's usage (the run may span 00:00).
    const requestsThatDay = rate ? (await usageTotalsOf(kv, userId, rate.day)).requests : 0;
    return { ...await usageTotalsOf(kv, userId), admitted: rate?.dayCount ?? 0, requestsThatDay };
  } finally {
    kv.close();
  }
}

Deno.test("limits are exact across three processes sharing one KV file", async () => {
  const dir = await Deno.makeTempDir();
  const glm = new FakeGlm();
  // Answers take a moment, as GLM's do: a call a process began while its admission committed,
  // and that a concurrent admission elsewhere then refused, is seen cancelled, not answered.
  glm.jsonDelayMs = 150;
  const apps: RunningMain[] = [];
  try {
    const kvPath = `${dir}/kv.sqlite3`;
    for (let i = 0; i < 3; i++) {
      apps.push(
        await startMain(env(kvPath, glm, { RATE_LIMIT_RPM: "7", RATE_LIMIT_RPD: "1000" }), dir),
      );
    }
    const key = await provision(apps[0], "user_multi");
    const responses = await Promise.all(
      Array.from({ length: 30 }, (_, i) => chat(apps[i % 3], key)),
    );
    const statuses = responses.map((r) => r.status);
    await Promise.all(responses.map((r) => r.body?.cancel()));
    if (statuses.some((s) => s >= 500)) {
      console.error(apps.map((a) => a.output().stderr).join("\n"));
    }
    assert.equal(statuses.filter((s) => s === 200).length, 7, String(statuses));
    assert.equal(statuses.filter((s) => s === 429).length, 23, String(statuses));
    // Exactly the 7 admitted calls were answered upstream; any other was cancelled at once.
    await eventually(() => glm.count - glm.requestsAborted === 7, 5000, () => glm);
    assert.ok(glm.count <= 10, `few calls began before their admission was refused (${glm.count})`);
  } finally {
    await Promise.all(apps.map((a) => a.stop()));
    await glm.close();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("SIGKILL during load: nothing lost or doubled beyond the requests in flight", async () => {
  const dir = await Deno.makeTempDir();
  const glm = new FakeGlm();
  let app: RunningMain | undefined;
  try {
    const kvPath = `${dir}/kv.sqlite3`;
    const limits = { RATE_LIMIT_RPM: "100000", RATE_LIMIT_RPD: "1000000" };
    app = await startMain(env(kvPath, glm, limits), dir);
    const users = Array.from({ length: 8 }, (_, i) => `user_crash_${i}`);
    const keys = new Map<string, string>();
    for (const id of users) keys.set(id, await provision(app, id));

    // Load: 8 workers (one per user), each sending requests back to back until the kill.
    const sent = new Map(users.map((u) => [u, 0]));
    const completed = new Map(users.map((u) => [u, 0]));
    let stop = false;
    const running = app;
    const workers = users.map(async (id) => {
      while (!stop) {
        sent.set(id, sent.get(id)! + 1);
        try {
          const res = await chat(running, keys.get(id)!);
          await res.arrayBuffer();
          if (res.status === 200) completed.set(id, completed.get(id)! + 1);
        } catch {
          return; // the server died under us
        }
      }
    });
    await new Promise((r) => setTimeout(r, 1500));
    await app.stop("SIGKILL");
    stop = true;
    await Promise.all(workers);

    app = await startMain(env(kvPath, glm, limits), dir);
    for (const id of users) {
      assert.equal(await provision(app, id), keys.get(id), `${id} kept its key`);
      const usage = await countUsage(kvPath, id);
      // A response ends only after its usage is committed: every completed request is recorded.
      assert.ok(
        usage.requests >= completed.get(id)! && usage.requests <= sent.get(id)!,
        `${id}: recorded ${usage.requests}, completed ${completed.get(id)}, sent ${sent.get(id)}`,
      );
      // The day's request counter (the limit's, written before the upstream call) survived too:
      // every request it admitted was sent, and every metered request was admitted first.
      assert.ok(
        usage.admitted >= usage.requestsThatDay && usage.admitted <= sent.get(id)!,
        `${id}: admitted ${usage.admitted}, recorded ${usage.requestsThatDay}, sent ${
          sent.get(id)
        }`,
      );
      // Every recorded request carries the fake's usage exactly once: no half or double writes.
      assert.equal(usage.prompt, usage.requests * glm.usage.prompt_tokens);
      assert.equal(usage.completion, usage.requests * glm.usage.completion_tokens);
    }
    const total = [...completed.values()].reduce((a, b) => a + b, 0);
    assert.ok(total > 20, `the load really ran (${total} completed)`);
    const kv = await Deno.openKv(kvPath);
    let indexed = 0;
    for await (const _ of kv.list({ prefix: ["keys_by_hash"] })) indexed++;
    kv.close();
    assert.equal(indexed, users.length);
    // The restarted server serves.
    const res = await chat(app, keys.get(users[0])!);
    assert.equal(res.status, 200);
    await res.arrayBuffer();
  } finally {
    await app?.stop();
    await glm.close();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("two processes: slots are exact across them; a SIGKILLed process's slots free within 60 s, its reservations charged once", async () => {
  const dir = await Deno.makeTempDir();
  const glm = new FakeGlm();
  glm.mode = "sse";
  glm.holdAfterFirstChunk = true; // admitted streams stay in flight until released
  const apps: RunningMain[] = [];
  try {
    const kvPath = `${dir}/kv.sqlite3`;
    const extra = {
      CONCURRENCY_LIMIT: "4",
      RATE_LIMIT_RPM: "1000",
      TOKEN_LIMIT_DAILY: "100000",
      // The upstream slots A held die with it too, and are freed with its leases.
      UPSTREAM_CONCURRENCY: "4",
      // One user holds all four (the per-user share would keep it to two).
      UPSTREAM_USER_SHARE: "1",
    };
    const [a, b] = [
      await startMain(env(kvPath, glm, extra), dir),
      await startMain(env(kvPath, glm, extra), dir),
    ];
    apps.push(a, b);
    const key = await provision(a, "user_slots");

    // Two streams through A and one through B, then seven at once through both: exactly 4 in
    // flight in all, at least 2 of them held by A and 1 by B (whose stream must finish after A dies).
    const first = [await streamChat(a, key), await streamChat(a, key)];
    const rest = [await streamChat(b, key)];
    rest.push(
      ...await Promise.all(Array.from({ length: 7 }, (_, i) => streamChat(i % 2 ? b : a, key))),
    );
    const all = [...first, ...rest];
    const admitted = all.filter((r) => r.status === 200);
    const refused = all.filter((r) => r.status === 429);
    assert.equal(admitted.length, 4, all.map((r) => r.status).join(","));
    assert.equal(refused.length, 6);
    for (const r of refused) {
      assert.equal((await r.json()).error.code, "concurrency_limit_exceeded");
      assert.equal(r.headers.get("retry-after"), "1");
    }
    assert.equal(first.filter((r) => r.status === 200).length, 2);
    assert.equal(rest[0].status, 200);
    const onB = rest.filter((r, i) => i % 2 === 0 && r.status === 200);
    const onA = admitted.length - onB.length;
    // Everything admitted has started to stream (so the upstream processed it). The reader that
    // read the first chunk reads the rest: a body read once cannot be read again with text().
    const readers = new Map<
      Response,
      { reader: ReadableStreamDefaultReader<Uint8Array>; text: string }
    >();
    for (const r of admitted) {
      const reader = r.body!.getReader();
      const { value } = await reader.read();
      readers.set(r, { reader, text: new TextDecoder().decode(value ?? new Uint8Array()) });
    }
    const readRest = async (r: Response) => {
      const { reader } = readers.get(r)!;
      let { text } = readers.get(r)!;
      const decoder = new TextDecoder();
      for (let c = await reader.read(); !c.done; c = await reader.read()) {
        text += decoder.decode(c.value, { stream: true });
      }
      return text;
    };

    // Another user's request on A is admitted and waits in line for an upstream slot (all 4 are
    // taken) when A dies: the upstream never saw it, so it is charged nothing.
    const waitingKey = await provision(b, "user_waiting");
    // (A streamed request that waits is answered at once — its headers, then its answer — so
    // whether it was answered is its body's end, not its status.)
    const waiting = streamChat(a, waitingKey)
      .then((r) => r.text())
      .then((text) => /\[DONE\]/.test(text) ? "answered" : "refused", () => "died with A");
    await eventually(async () => {
      const kv = await Deno.openKv(kvPath);
      try {
        return u64((await kv.get(keys.leaseHeld("user_waiting", "count"))).value) === 1 ||
          undefined;
      } finally {
        kv.close();
      }
    });

    const killedAt = performance.now();
    await a.stop("SIGKILL");
    assert.equal(await waiting, "died with A");
    glm.release(); // B's streams finish; A's died with A
    for (const r of onB) assert.match(await readRest(r), /\[DONE\]/);
    for (const r of admitted) {
      if (!onB.includes(r)) await readers.get(r)!.reader.cancel().catch(() => {});
    }
    let completed = onB.length;

    // A's leases hold their slots until they expire: B admits only what is left, then all 4.
    let freed = false;
    while (performance.now() - killedAt < 60_000) {
      const probe = await Promise.all(Array.from({ length: 4 }, () => streamChat(b, key)));
      const ok = probe.filter((r) => r.status === 200).length;
      // Released until every answer has ended: one that waited for a slot (answered at once, its
      // stream starting when the slot frees) is held like the others.
      let ended = false;
      const bodies = Promise.all(probe.map((r) => r.text())).finally(() => ended = true);
      while (!ended) {
        glm.release();
        await Promise.race([bodies, new Promise((r) => setTimeout(r, 50))]);
      }
      completed += ok;
      if (ok === 4) {
        freed = true;
        break;
      }
      assert.ok(ok <= 4 - onA, `only the free slots are admitted (${ok})`);
      await new Promise((r) => setTimeout(r, 2000));
    }
    assert.ok(freed, "A's slots were freed within 60 s");
    const seconds = (performance.now() - killedAt) / 1000;
    assert.ok(seconds >= 10, `not before the leases could expire (${seconds.toFixed(1)} s)`);

    // Each completed stream was metered (11 + 7 tokens) before it ended. A's requests are charged
    // once, by whichever process reaps them: their prompt estimate (6 tokens each) and what they
    // had relayed by their last renewal.
    const expected = { requests: completed + onA, promptTokens: completed * 11 + onA * 6 };
    const charged = await eventually(
      async () => {
        const u = await todayUsage(b, key);
        return u.requests === expected.requests ? u : undefined;
      },
      15_000,
      async () => ({ expected, got: await todayUsage(b, key) }),
    );
    assert.equal(charged.promptTokens, expected.promptTokens);
    await new Promise((r) => setTimeout(r, 6000)); // more than one reaper cycle
    assert.deepEqual(await todayUsage(b, key), charged, "not charged twice");
    assert.deepEqual(
      await todayUsage(b, waitingKey),
      { requests: 0, promptTokens: 0, completionTokens: 0 },
      "the request that died waiting for a slot is not charged",
    );
    const kv = await Deno.openKv(kvPath);
    try {
      assert.equal(u64((await kv.get(keys.upstreamHeld("glm-4.6"))).value), 0, "slots all free");
      assert.equal(u64((await kv.get(keys.leaseHeld("user_waiting", "count"))).value), 0);
      assert.equal(
        u64((await kv.get(keys.rateRefunds("user_waiting"))).value),
        1,
        "and given back to its rate limits",
      );
    } finally {
      kv.close();
    }
  } finally {
    await Promise.all(apps.map((a) => a.stop()));
    await glm.close();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("a process stalled past its leases' lifetime: reaped once, then settled without counting twice", async () => {
  const dir = await Deno.makeTempDir();
  const glm = new FakeGlm();
  glm.mode = "sse";
  glm.holdAfterFirstChunk = true;
  const apps: RunningMain[] = [];
  let key = "";
  let stopped: RunningMain | undefined;
  try {
    const kvPath = `${dir}/kv.sqlite3`;
    const extra = { CONCURRENCY_LIMIT: "2", TOKEN_LIMIT_DAILY: "100000" };
    const a = await startMain(env(kvPath, glm, extra), dir);
    apps.push(a);
    const b = await startMain(env(kvPath, glm, extra), dir);
    apps.push(b);
    key = await provision(a, "user_stalled");
    const held = [await streamChat(a, key), await streamChat(a, key)];
    for (const r of held) assert.equal(r.status, 200);
    const readers = held.map((r) => r.body!.getReader());
    for (const r of readers) await r.read(); // "Hel"

    Deno.kill(a.pid, "SIGSTOP"); // A stalls with both slots
    stopped = a;
    // B's reaper takes A for dead: both requests charged their estimate (6 prompt tokens each),
    // and A's slots are free for B.
    const reaped = await eventually(async () => {
      const u = await todayUsage(b, key);
      return u.requests === 2 ? u : undefined;
    }, 45_000);
    assert.equal(reaped.promptTokens, 12);
    const onB = await streamChat(b, key);
    assert.equal(onB.status, 200, "A's slots were freed");

    Deno.kill(a.pid, "SIGCONT"); // A comes back and finishes its answers
    stopped = undefined;
    glm.release();
    for (const r of readers) {
      for (;;) if ((await r.read()).done) break;
    }
    await onB.text();
    // A's two requests end with their metered usage, counted once; B's one as usual.
    const final = await eventually(
      async () => {
        const u = await todayUsage(b, key);
        return u.promptTokens === 33 ? u : undefined;
      },
      10_000,
      () => todayUsage(b, key),
    );
    assert.deepEqual(final, { requests: 3, promptTokens: 33, completionTokens: 21 });
    // Every slot is free again: two streams at once are admitted.
    const again = await Promise.all([streamChat(b, key), streamChat(b, key)]);
    assert.deepEqual(again.map((r) => r.status), [200, 200]);
    glm.release();
    await Promise.all(again.map((r) => r.text()));
  } finally {
    if (stopped) Deno.kill(stopped.pid, "SIGCONT");
    await Promise.all(apps.map((app) => app.stop()));
    await glm.close();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("SIGTERM with an answer still streaming after the grace period: it ends with an error event and is charged before the process exits", async () => {
  const dir = await Deno.makeTempDir();
  const glm = new FakeGlm();
  glm.mode = "sse";
  glm.holdAfterFirstChunk = true; // the answer never finishes on its own
  try {
    const kvPath = `${dir}/kv.sqlite3`;
    const app = await startMain(env(kvPath, glm), dir);
    const key = await provision(app, "user_sigterm");
    const res = await streamChat(app, key);
    assert.equal(res.status, 200);
    const reader = res.body!.getReader();
    await reader.read(); // "Hel"
    const stopped = app.stop("SIGTERM");
    let rest = "";
    const decoder = new TextDecoder();
    for (let c = await reader.read(); !c.done; c = await reader.read()) {
      rest += decoder.decode(c.value, { stream: true });
    }
    await stopped;
    // Past the 10 s grace: an error event the SDKs report, not a dropped connection.
    assert.match(rest, /"code":"upstream_unavailable"/);
    assert.match(rest, /the server is restarting/);
    // Settled by the process itself before it exited: charged once, nothing left held.
    const usage = await countUsage(kvPath, "user_sigterm");
    assert.equal(usage.requests, 1);
    assert.ok(usage.prompt > 0);
    const kv = await Deno.openKv(kvPath);
    try {
      assert.equal(u64((await kv.get(keys.leaseHeld("user_sigterm", "count"))).value), 0);
      let leases = 0;
      for await (const _ of kv.list({ prefix: ["leases"] })) leases++;
      assert.equal(leases, 0, "no lease left for a reaper");
    } finally {
      kv.close();
    }
  } finally {
    glm.release();
    await glm.close();
    await Deno.remove(dir, { recursive: true });
  }
});
