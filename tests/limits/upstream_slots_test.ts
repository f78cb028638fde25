/**
 * The operator's GLM account as a shared, limited resource (CONTRACT §5 "Upstream refusals",
 * "Limits are exact…", §2 UPSTREAM_CONCURRENCY / UPSTREAM_QUEUE_MS / STREAM_MAX_MS): GLM's
 * account refusals answered as Keyway's own and not counted, per-model upstream slots with a
 * queue in arrival order, and answers cut when they run too long.
 */
import assert from "node:assert/strict";
import { keys, u64 } from "../../lib/core/kv.ts";
import { loadConfig } from "../../lib/core/config.ts";
import { Ledger } from "../../lib/limits/admission.ts";
import { UpstreamSlots } from "../../lib/limits/upstream_slots.ts";
import { request, seedUser } from "../support/ledger_fixtures.ts";
import { type RunningMain, startMain } from "../support/subprocess.ts";
import { ClerkIssuer } from "../../testing/fakes/clerk_issuer.ts";
import { FakeGlm, GLM_REFUSALS, type GlmRefusal } from "../../testing/fakes/glm.ts";
import { bearer, eventually, processEnv, serveGateway } from "../support/helpers.ts";

const CHAT = { model: "glm-4.6", messages: [{ role: "user", content: "hi" }] };

function post(url: string, key: string, body: unknown = CHAT, path = "/v1/chat/completions") {
  return fetch(`${url}${path}`, {
    method: "POST",
    headers: { ...bearer(key), "content-type": "application/json" },
    body: JSON.stringify(body),
  });
}

Deno.test("GLM's refusals of the operator's account: Keyway's own 503, nothing counted, GLM's words kept from users", async (t) => {
  const s = await serveGateway({ RATE_LIMIT_RPM: "3" }, "user_refusals");
  try {
    const cases: Array<[GlmRefusal, number, string]> = [
      ["balance", 503, "upstream_unavailable"],
      ["key_rejected", 503, "upstream_unavailable"],
      ["concurrency", 503, "upstream_busy"],
      ["frequency", 503, "upstream_busy"],
    ];
    for (const [refusal, status, code] of cases) {
      await t.step(`GLM ${GLM_REFUSALS[refusal].code} → ${status} ${code}`, async () => {
        s.fake.refusal = refusal;
        const res = await post(s.url, s.apiKey);
        assert.equal(res.status, status);
        assert.match(res.headers.get("content-type") ?? "", /application\/json/);
        const text = await res.text();
        const body = JSON.parse(text);
        assert.equal(body.error.code, code);
        assert.match(body.error.message, /Nothing was counted/);
        // GLM's own message ("recharge your account") never reaches the user.
        assert.ok(!text.includes(GLM_REFUSALS[refusal].message), text);
        assert.ok(!text.includes(GLM_REFUSALS[refusal].code), text);
        if (code === "upstream_busy") assert.match(res.headers.get("retry-after") ?? "", /^\d+$/);
        // The account's refusals need the operator: SDKs are told not to retry them at once.
        assert.equal(
          res.headers.get("x-should-retry"),
          code === "upstream_unavailable" ? "false" : null,
        );
        // Given back to rpm 3, and the answer's headers say so.
        assert.equal(res.headers.get("x-ratelimit-remaining-requests"), "3");
        // The operator's log has GLM's code and words.
        assert.ok(
          s.app.logs.some((l) =>
            l.includes(`"upstreamCode":"${GLM_REFUSALS[refusal].code}"`) &&
            l.includes(GLM_REFUSALS[refusal].message)
          ),
        );
      });
    }
    await t.step(
      "none of those counted: not a request, not a token, not against rpm 3",
      async () => {
        assert.deepEqual(await s.today(), {
          requests: 0,
          promptTokens: 0,
          completionTokens: 0,
          totalTokens: 0,
          costUsd: 0,
        });
        s.fake.refusal = null;
        const statuses = [];
        for (let i = 0; i < 4; i++) {
          const res = await post(s.url, s.apiKey);
          await res.body?.cancel();
          statuses.push(res.status);
        }
        assert.deepEqual(statuses, [200, 200, 200, 429]);
      },
    );
    await t.step("the Anthropic endpoint answers in Anthropic's shape", async () => {
      s.fake.refusal = "balance";
      // The minute's allowance is spent by now: a fresh user.
      const { apiKey } = await s.app.services.users.provision("user_anthropic");
      const res = await post(s.url, apiKey, {
        model: "glm-4.6",
        max_tokens: 10,
        messages: [{ role: "user", content: "hi" }],
      }, "/v1/messages");
      assert.equal(res.status, 503);
      const body = await res.json();
      assert.equal(body.type, "error");
      assert.equal(body.error.type, "overloaded_error");
      assert.equal(body.error.code, "upstream_unavailable");
    });
    await t.step(
      "the user's own mistake (1214) is relayed with GLM's status and body",
      async () => {
        s.fake.refusal = "bad_parameter";
        // The minute's allowance is spent by now: a fresh user.
        const { apiKey } = await s.app.services.users.provision("user_mistake");
        const res = await post(s.url, apiKey);
        assert.equal(res.status, 400);
        assert.equal((await res.json()).error.code, "1214");
      },
    );
  } finally {
    await s.close();
  }
});

Deno.test("upstream slots in one process: arrival order, 503 upstream_busy after the wait, freed at the last byte and when the client leaves", async (t) => {
  const s = await serveGateway(
    { UPSTREAM_CONCURRENCY: '{"glm-4.6": 1}', UPSTREAM_QUEUE_MS: "600", RATE_LIMIT_RPM: "1000" },
    "user_slots_one",
  );
  const ask = (content: string, stream = true) =>
    post(s.url, s.apiKey, { ...CHAT, messages: [{ role: "user", content }], stream });
  try {
    s.fake.mode = "sse";
    s.fake.holdAfterFirstChunk = true;
    await t.step("waiters are served in arrival order", async () => {
      const first = await ask("first");
      assert.equal(first.status, 200);
      const waiting: Promise<Response>[] = [];
      for (const name of ["second", "third", "fourth"]) {
        waiting.push(ask(name));
        await new Promise((r) => setTimeout(r, 50));
      }
      assert.equal(s.fake.count, 1, "the others wait for the slot");
      const served = [first];
      for (let i = 0; i < 3; i++) {
        s.fake.release();
        await served[i].text();
        served.push(await waiting[i]);
        assert.equal(served[i + 1].status, 200);
      }
      s.fake.release();
      await served[3].text();
      assert.deepEqual(
        s.fake.requests.map((r) => JSON.parse(r.body).messages[0].content),
        ["first", "second", "third", "fourth"],
      );
    });
    await t.step("no slot within UPSTREAM_QUEUE_MS → 503 upstream_busy, not counted", async () => {
      const before = (await s.today()).requests;
      const holder = await ask("holder");
      const started = performance.now();
      const late = await ask("late");
      const waited = performance.now() - started;
      assert.equal(late.status, 503);
      assert.equal((await late.json()).error.code, "upstream_busy");
      assert.match(late.headers.get("retry-after") ?? "", /^\d+$/);
      // Given back: one fewer left than the limit (the holder's), not two.
      assert.equal(
        Number(late.headers.get("x-ratelimit-remaining-requests")),
        Number(holder.headers.get("x-ratelimit-remaining-requests")),
      );
      assert.ok(waited >= 550, `waited ${waited} ms`);
      assert.ok(
        s.app.logs.some((l) => l.includes('"outcome":"not_served"') && l.includes("queueMs")),
      );
      s.fake.release();
      await holder.text();
      assert.equal((await s.today()).requests, before + 1);
    });
    await t.step("a client leaving mid-answer frees the slot at once", async () => {
      const holder = await ask("leaves");
      const reader = holder.body!.getReader();
      await reader.read();
      await reader.cancel();
      s.fake.mode = "json";
      const next = await ask("next", false);
      assert.equal(next.status, 200);
      await next.text();
      s.fake.mode = "sse";
    });
    await t.step(
      "a client leaving while it waits is out of line, and counted as nothing used",
      async () => {
        const holder = await ask("holder2");
        const gone = new AbortController();
        const leaving = ask("impatient");
        const leavingReq = fetch(`${s.url}/v1/chat/completions`, {
          method: "POST",
          headers: { ...bearer(s.apiKey), "content-type": "application/json" },
          body: JSON.stringify({ ...CHAT, messages: [{ role: "user", content: "gone" }] }),
          signal: gone.signal,
        }).catch(() => null);
        await new Promise((r) => setTimeout(r, 100));
        gone.abort();
        await leavingReq;
        s.fake.release();
        await holder.text();
        const next = await leaving;
        s.fake.release();
        await next.text();
        await eventually(() => s.app.logs.some((l) => l.includes('"outcome":"left"')));
        assert.ok(
          !s.fake.requests.some((r) => r.body.includes('"gone"')),
          "the request that left never went upstream",
        );
      },
    );
    await t.step("tickets left by a process that died do not hold the line", async () => {
      // 60 waiters of a dead process, their deadlines long past, still in KV.
      const op = s.app.kv.atomic();
      const old = String(Date.now() - 5_000).padStart(15, "0");
      for (let i = 0; i < 60; i++) {
        op.set(keys.upstreamTicket("glm-4.6", `${old}-dead-${String(i).padStart(8, "0")}`), {
          deadline: Date.now() - 4_400,
        }, { expireIn: 600_000 });
      }
      await op.commit();
      const holder = await ask("holder3");
      const waiting = ask("behind the dead");
      await new Promise((r) => setTimeout(r, 100));
      s.fake.release();
      await holder.text();
      const next = await waiting;
      assert.equal(next.status, 200, "the live waiter gets the freed slot");
      s.fake.release();
      await next.text();
    });
    const kv = s.app.kv;
    assert.equal(u64((await kv.get(keys.upstreamHeld("glm-4.6"))).value), 0, "no slot left held");
  } finally {
    s.fake.holdAfterFirstChunk = false;
    s.fake.release();
    await s.close();
  }
});

Deno.test("STREAM_MAX_MS: an answer that never ends is cut end to end, its upstream call cancelled, usage charged, slot freed", async () => {
  const s = await serveGateway(
    { STREAM_MAX_MS: "700", UPSTREAM_CONCURRENCY: "1", UPSTREAM_TIMEOUT_MS: "5000" },
    "user_endless",
  );
  try {
    s.fake.mode = "endless";
    s.fake.sseDelayMs = 20;
    const started = performance.now();
    const res = await post(s.url, s.apiKey, { ...CHAT, stream: true });
    assert.equal(res.status, 200);
    const text = await res.text();
    const took = performance.now() - started;
    assert.ok(took >= 650 && took < 5000, `cut after ${took} ms`);
    const last = JSON.parse(text.trim().split("\n\n").at(-1)!.replace(/^data: /, ""));
    assert.match(last.error.message, /STREAM_MAX_MS \(700 ms\)/);
    await eventually(() => s.fake.streamsCancelled === 1);
    const usage = await s.today();
    assert.equal(usage.requests, 1);
    assert.ok(usage.completionTokens > 5, "what was relayed is charged");
    s.fake.mode = "json";
    const next = await post(s.url, s.apiKey);
    assert.equal(next.status, 200, "the slot was freed");
    await next.text();
  } finally {
    await s.close();
  }
});

const issuer = await ClerkIssuer.create();

Deno.test("100 concurrent requests over two processes against GLM's cap: no 1302 reaches a client, never more than the cap in flight", async () => {
  const dir = await Deno.makeTempDir();
  const glm = new FakeGlm();
  const CAP = 4;
  glm.concurrencyCap = CAP;
  glm.jsonDelayMs = 100;
  const apps: RunningMain[] = [];
  try {
    const kvPath = `${dir}/kv.sqlite3`;
    const extra = {
      UPSTREAM_CONCURRENCY: String(CAP),
      UPSTREAM_QUEUE_MS: "1500",
      CONCURRENCY_LIMIT: "64",
      RATE_LIMIT_RPM: "1000",
    };
    apps.push(
      await startMain(processEnv(kvPath, glm, issuer, extra), dir),
      await startMain(processEnv(kvPath, glm, issuer, extra), dir),
    );
    const keysOf: string[] = [];
    for (let u = 0; u < 5; u++) {
      const res = await fetch(`${apps[0].url}/api/key`, {
        headers: bearer(await issuer.token(`user_cap_${u}`, { ttlSeconds: 600 })),
      });
      keysOf.push((await res.json()).apiKey);
    }
    const results = await Promise.all(
      Array.from({ length: 100 }, async (_, i) => {
        const started = performance.now();
        const res = await post(apps[i % 2].url, keysOf[i % 5]);
        const body = await res.json();
        return { status: res.status, body, ms: performance.now() - started, res };
      }),
    );
    const ok = results.filter((r) => r.status === 200);
    const busy = results.filter((r) => r.status === 503);
    assert.equal(ok.length + busy.length, 100, results.map((r) => r.status).join(","));
    console.log(
      `  ${ok.length} answered, ${busy.length} × 503 upstream_busy; GLM saw at most ` +
        `${glm.maxInFlight} in flight, answered 1302 ${glm.rejectedOverCap} times`,
    );
    assert.equal(glm.rejectedOverCap, 0, "GLM never had to answer 1302");
    assert.ok(glm.maxInFlight <= CAP, `GLM saw ${glm.maxInFlight} in flight`);
    assert.equal(glm.maxInFlight, CAP, "the slots are used");
    for (const r of busy) {
      assert.equal(r.body.error.code, "upstream_busy");
      assert.match(r.res.headers.get("retry-after") ?? "", /^\d+$/);
      assert.ok(r.ms >= 1400, `503 only after the wait (${r.ms} ms)`);
    }
    // 100 ms answers, 4 at a time, 1.5 s of patience: some of each.
    assert.ok(ok.length >= 20 && busy.length >= 10, `${ok.length} ok, ${busy.length} busy`);
    assert.equal(glm.count, ok.length, "exactly the answered requests went upstream");
    // Only what was served is counted.
    let counted = 0;
    for (const key of keysOf) {
      const res = await fetch(`${apps[1].url}/api/usage?days=1`, { headers: bearer(key) });
      counted += (await res.json()).today.requests;
    }
    assert.equal(counted, ok.length);
  } finally {
    await Promise.all(apps.map((a) => a.stop()));
    await glm.close();
  }
  const kv = await Deno.openKv(`${dir}/kv.sqlite3`);
  try {
    assert.equal(u64((await kv.get(keys.upstreamHeld("glm-4.6"))).value), 0, "every slot freed");
  } finally {
    kv.close();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("a shutdown past its grace period: a streamed answer ends with an error event and is charged once, a call still waiting for GLM answers 503 and counts nothing", async () => {
  const s = await serveGateway({}, "user_shutdown");
  try {
    s.fake.mode = "sse";
    s.fake.holdAfterFirstChunk = true;
    const streaming = await post(s.url, s.apiKey, { ...CHAT, stream: true });
    assert.equal(streaming.status, 200);
    const reader = streaming.body!.getReader();
    await reader.read(); // the answer has begun
    s.fake.mode = "slow_headers";
    const waiting = post(s.url, s.apiKey);
    await eventually(() => s.fake.count === 2 || undefined); // GLM has the second request

    await s.app.services.gateway.shutdown();

    let rest = "";
    const decoder = new TextDecoder();
    for (let c = await reader.read(); !c.done; c = await reader.read()) {
      rest += decoder.decode(c.value, { stream: true });
    }
    const event = JSON.parse(rest.trim().replace(/^data: /, ""));
    assert.equal(event.error.code, "upstream_unavailable");
    assert.match(event.error.message, /the server is restarting/);
    const refused = await waiting;
    assert.equal(refused.status, 503);
    assert.equal(refused.headers.get("retry-after"), "1");
    assert.equal((await refused.json()).error.code, "upstream_unavailable");
    // The cut answer is charged what it had used (its prompt estimate; usage came in no chunk);
    // the one GLM had not answered counts nothing. Nothing is left held.
    const today = await s.today();
    assert.equal(today.requests, 1);
    assert.ok(today.promptTokens > 0);
    const kv = s.app.kv;
    assert.equal(
      u64(
        (await kv.get(keys.leaseHeld(
          (await s.app.services.users.resolveKey(s.apiKey))!.id,
          "count",
        ))).value,
      ),
      0,
    );
  } finally {
    s.fake.release();
    await s.close();
  }
});

Deno.test("an Anthropic stream the client hangs up on after message_start is charged its estimate, not 0", async () => {
  const s = await serveGateway({}, "user_hangup");
  try {
    s.fake.mode = "sse";
    s.fake.holdAfterFirstChunk = true; // message_start, with GLM's 0 input tokens, then a pause
    const res = await post(s.url, s.apiKey, {
      model: "glm-4.6",
      max_tokens: 100,
      stream: true,
      messages: [{ role: "user", content: "Tell me a long story about a lighthouse keeper." }],
    }, "/v1/messages");
    assert.equal(res.status, 200);
    const reader = res.body!.getReader();
    assert.match(new TextDecoder().decode((await reader.read()).value), /message_start/);
    await reader.cancel(); // Claude Code's Esc
    const today = await eventually(async () => {
      const t = await s.today();
      return t.requests === 1 ? t : undefined;
    });
    assert.ok(today.promptTokens > 0, `charged ${today.promptTokens} prompt tokens`);
  } finally {
    s.fake.release();
    await s.close();
  }
});

Deno.test("Upstream slots: a slot commit that landed with its answer and read-back lost frees the slot once", async () => {
  const kv = await Deno.openKv(":memory:");
  const faults = { loseNextCommitAnswer: false, failGets: 0 };
  const flaky = new Proxy(kv, {
    get(target, prop) {
      if (prop === "atomic") {
        return () => {
          const op = target.atomic();
          const commit = op.commit.bind(op);
          op.commit = async () => {
            const res = await commit();
            if (!faults.loseNextCommitAnswer) return res;
            faults.loseNextCommitAnswer = false;
            faults.failGets = 1; // and the read-back that follows fails too
            throw new Error("connection reset");
          };
          return op;
        };
      }
      if (prop === "get") {
        return (key: Deno.KvKey) =>
          faults.failGets-- > 0 ? Promise.reject(new Error("KV unreachable")) : target.get(key);
      }
      const value = Reflect.get(target, prop);
      return typeof value === "function" ? value.bind(target) : value;
    },
  });
  const config = loadConfig({ DENO_KV_PATH: ":memory:", UPSTREAM_CONCURRENCY: "1" });
  const ledger = new Ledger(flaky, config);
  const slots = new UpstreamSlots(flaky, config, ledger);
  try {
    await seedUser(kv, "u8");
    const lease = await ledger.admit(request("u8"));
    faults.loseNextCommitAnswer = true;
    await assert.rejects(slots.acquire(lease, new AbortController().signal), /connection reset/);
    // The commit did land: the slot is taken in KV. The gateway settles the lease, which frees
    // what its entry says (one slot), not what this process believed (none).
    assert.equal(u64((await kv.get(keys.upstreamHeld("glm-4.6"))).value), 1);
    await lease.settle(null, "not_served");
    assert.equal(u64((await kv.get(keys.upstreamHeld("glm-4.6"))).value), 0, "freed once");
    assert.equal(u64((await kv.get(keys.leaseHeld("u8", "count"))).value), 0);
  } finally {
    slots.close();
    await ledger.close();
    kv.close();
  }
});
