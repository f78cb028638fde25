/**
 * Per-model upstream slots (CONTRACT §2 UPSTREAM_CONCURRENCY / UPSTREAM_QUEUE_MS): a queue in
 * arrival order, 503 upstream_busy after the wait, slots freed at the last byte, when the client
 * leaves, and once when a slot commit's answer is lost.
 */
import assert from "node:assert/strict";
import { keys, u64 } from "../../lib/core/kv.ts";
import { loadConfig } from "../../lib/core/config.ts";
import { Ledger } from "../../lib/limits/admission.ts";
import { UpstreamSlots } from "../../lib/limits/upstream/slots.ts";
import { request, seedUser } from "../support/ledger_fixtures.ts";
import { bearer, eventually, serveGateway } from "../support/helpers.ts";
import { CHAT, post } from "../support/gateway_setup.ts";

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
      // Not streamed: a streamed request that waits is answered at once, and its wait's end is
      // its stream's error event (tests/gateway/waiting_clients_test.ts).
      const late = await ask("late", false);
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
  const config = loadConfig({
    DENO_KV_PATH: ":memory:",
    UPSTREAM_CONCURRENCY: "1",
    GLM_API_KEY: "glm-key-for-the-slots-0001",
  });
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
