/**
 * The Ledger driven directly: admissions exact under concurrency and across two KV connections,
 * within KV Connect's limits, and counted once through lost commit answers, failed settlements,
 * midnight and the reaper.
 */
import assert from "node:assert/strict";
import { loadConfig } from "../../lib/core/config.ts";
import { keys, u64 } from "../../lib/core/kv.ts";
import { Ledger } from "../../lib/limits/admission.ts";
import type { RateState } from "../../lib/limits/gcra.ts";
import { interceptCommits, usageTotalsOf } from "../support/helpers.ts";
import { codeOf, NOON, request, seedUser } from "../support/ledger_fixtures.ts";

Deno.test("Ledger: 50 concurrent against rpm 20 admit exactly 20; refusals write nothing", async () => {
  const kv = await Deno.openKv(":memory:");
  const config = loadConfig({
    DENO_KV_PATH: ":memory:",
    RATE_LIMIT_RPM: "20",
    CONCURRENCY_LIMIT: "50",
  });
  const ledger = new Ledger(kv, config, { clock: () => NOON });
  try {
    await seedUser(kv, "u1");
    const attempt = () => ledger.admit(request("u1")).then(() => "ok", codeOf);
    const results = await Promise.all(Array.from({ length: 50 }, attempt));
    assert.equal(results.filter((r) => r === "ok").length, 20);
    assert.equal(results.filter((r) => r === "rate_limit_exceeded").length, 30);
    const before = await kv.get<RateState>(keys.rate("u1"));
    assert.equal(await attempt(), "rate_limit_exceeded");
    const after = await kv.get<RateState>(keys.rate("u1"));
    assert.equal(after.versionstamp, before.versionstamp);
    assert.equal(after.value?.dayCount, 20);
    assert.equal((await kv.get<Deno.KvU64>(keys.leaseHeld("u1", "count"))).value?.value, 20n);
  } finally {
    await ledger.close();
    kv.close();
  }
});

Deno.test("Ledger: per-user overrides win over the defaults", async () => {
  const kv = await Deno.openKv(":memory:");
  const config = loadConfig({ DENO_KV_PATH: ":memory:", RATE_LIMIT_RPM: "2" });
  const ledger = new Ledger(kv, config, { clock: () => NOON });
  try {
    await seedUser(kv, "u2", { rpm: 4 });
    const ok = [];
    for (let i = 0; i < 6; i++) {
      ok.push(
        await ledger.admit(request("u2")).then(
          (lease) => lease.headers["x-ratelimit-limit-requests"],
          () => null,
        ),
      );
    }
    assert.deepEqual(ok, ["4", "4", "4", "4", null, null]);
  } finally {
    await ledger.close();
    kv.close();
  }
});

Deno.test("Ledger: slots are exact, and a settled lease gives its slot back", async () => {
  const kv = await Deno.openKv(":memory:");
  const config = loadConfig({ DENO_KV_PATH: ":memory:", CONCURRENCY_LIMIT: "3" });
  const ledger = new Ledger(kv, config);
  try {
    await seedUser(kv, "u4");
    const results = await Promise.all(
      Array.from({ length: 10 }, () => ledger.admit(request("u4")).then((l) => l, codeOf)),
    );
    const leases = results.filter((r) => typeof r !== "string");
    assert.equal(leases.length, 3);
    const refused = results.filter((r) => r === "concurrency_limit_exceeded");
    assert.equal(refused.length, 7);
    const err = await ledger.admit(request("u4")).catch((e) => e);
    assert.equal(err.headers["retry-after"], "1");
    assert.equal(err.headers["x-should-retry"], undefined);
    await leases[0].settle({ promptTokens: 1, completionTokens: 1 }, "complete");
    const again = await ledger.admit(request("u4"));
    assert.equal(again.user.id, "u4");
  } finally {
    await ledger.close();
    kv.close();
  }
});

Deno.test("Ledger: two KV connections on one file (two processes) share the limits exactly", async () => {
  const dir = await Deno.makeTempDir();
  const a = await Deno.openKv(`${dir}/kv.sqlite3`);
  const b = await Deno.openKv(`${dir}/kv.sqlite3`);
  const config = loadConfig({
    DENO_KV_PATH: ":memory:",
    RATE_LIMIT_RPM: "7",
    CONCURRENCY_LIMIT: "5",
  });
  const ledgers = [
    new Ledger(a, config, { clock: () => NOON }),
    new Ledger(b, config, { clock: () => NOON }),
  ];
  try {
    for (const id of ["x", "y", "z"]) await seedUser(a, id);
    await seedUser(a, "w", { rpm: 2 });
    const users = ["x", "y", "z", "w"];
    const results = await Promise.all(
      Array.from({ length: 80 }, (_, i) => {
        const userId = users[i % 4];
        return ledgers[(i >> 2) % 2].admit(request(userId)).then(() => userId, codeOf);
      }),
    );
    const count = (v: string) => results.filter((r) => r === v).length;
    // rpm 7 but 5 slots; "w" has rpm 2.
    assert.deepEqual(users.map(count), [5, 5, 5, 2]);
    assert.equal(count("concurrency_limit_exceeded") + count("rate_limit_exceeded"), 80 - 17);
  } finally {
    await Promise.all(ledgers.map((l) => l.close()));
    a.close();
    b.close();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("Ledger: a busy batch of 40 users stays within 10 checks per commit", async () => {
  const kv = await Deno.openKv(":memory:");
  const config = loadConfig({ DENO_KV_PATH: ":memory:", RATE_LIMIT_RPM: "3" });
  const ledger = new Ledger(kv, config);
  try {
    const users = Array.from({ length: 40 }, (_, i) => `many${i}`);
    for (const id of users) await seedUser(kv, id);
    // tests/support/kv_limits.ts fails any commit over KV Connect's limits, so this would throw.
    const results = await Promise.all(
      Array.from(
        { length: 160 },
        (_, i) => ledger.admit(request(users[i % 40])).then((l) => l, codeOf),
      ),
    );
    const leases = results.filter((r) => typeof r !== "string");
    assert.equal(leases.length, 120);
    assert.equal(results.filter((r) => r === "rate_limit_exceeded").length, 40);
    await Promise.all(
      leases.map((l) => l.settle({ promptTokens: 2, completionTokens: 3 }, "complete")),
    );
    let requests = 0;
    for await (const e of kv.list<Deno.KvU64>({ prefix: ["usage_daily"] })) {
      if (e.key[4] === "requests") requests += Number(e.value.value);
    }
    assert.equal(requests, 120);
  } finally {
    await ledger.close();
    kv.close();
  }
});

Deno.test("Ledger: an admission whose commit landed but whose answer was lost gives its slot and request back", async () => {
  const kv = await Deno.openKv(":memory:");
  let loseNextAnswer = false;
  const flaky = interceptCommits(kv, async (commit) => {
    const res = await commit();
    if (!loseNextAnswer) return res;
    loseNextAnswer = false;
    throw new Error("connection reset"); // landed, but the caller never hears so
  });
  const config = loadConfig({ DENO_KV_PATH: ":memory:" });
  const ledger = new Ledger(flaky, config);
  try {
    await seedUser(kv, "u6", { rpm: 2 });
    await ledger.admit(request("u6")).then((l) => l.settle(null, "complete"));
    loseNextAnswer = true;
    await assert.rejects(ledger.admit(request("u6")), /connection reset/);
    // Its lease entry was written, holding a slot: it is found and given back.
    const deadline = Date.now() + 5000;
    let held = 1n;
    while (Date.now() < deadline) {
      held = (await kv.get<Deno.KvU64>(keys.leaseHeld("u6", "count"))).value?.value ?? 0n;
      if (held === 0n) break;
      await new Promise((r) => setTimeout(r, 20));
    }
    assert.equal(held, 0n, "the slot is free again");
    let leases = 0;
    for await (const _ of kv.list({ prefix: ["leases"] })) leases++;
    assert.equal(leases, 0);
    // Not counted: one request recorded, and rpm 2 still has room for one more.
    assert.equal((await usageTotalsOf(kv, "u6")).requests, 1);
    const next = await ledger.admit(request("u6"));
    await next.settle(null, "complete");
  } finally {
    await ledger.close();
    kv.close();
  }
});

Deno.test("Ledger: a held sum that wrapped below zero does not refuse the user for good", async () => {
  const kv = await Deno.openKv(":memory:");
  const ledger = new Ledger(kv, loadConfig({ DENO_KV_PATH: ":memory:", CONCURRENCY_LIMIT: "2" }));
  try {
    await seedUser(kv, "u7");
    // One more subtraction than additions, as a lease given back twice would leave it.
    await kv.atomic().sum(keys.leaseHeld("u7", "count"), (1n << 64n) - 1n).commit();
    // Read as 18446744073709551615 requests in flight, it refused every request from then on.
    const a = await ledger.admit(request("u7"));
    const b = await ledger.admit(request("u7"));
    await Promise.all([a.settle(null, "complete"), b.settle(null, "complete")]);
  } finally {
    await ledger.close();
    kv.close();
  }
});

Deno.test("Ledger: a request given back after midnight does not come off the new day's count", async () => {
  const kv = await Deno.openKv(":memory:");
  let now = Date.UTC(2026, 10, 25, 23, 59, 59, 500);
  const ledger = new Ledger(kv, loadConfig({ DENO_KV_PATH: ":memory:", RATE_LIMIT_RPD: "2" }), {
    clock: () => now,
  });
  try {
    await seedUser(kv, "u10");
    const late = await ledger.admit(request("u10")); // waits for a slot across midnight
    now += 1_000; // 00:00:00.5, the next UTC day
    const first = await ledger.admit(request("u10"));
    await late.settle(null, "not_served"); // given back, but it was yesterday's request
    const second = await ledger.admit(request("u10"));
    await assert.rejects(ledger.admit(request("u10")), /Daily request limit of 2/);
    await Promise.all([first, second].map((l) => l.settle(null, "complete")));
  } finally {
    await ledger.close();
    kv.close();
  }
});

Deno.test("Ledger: a settlement whose commit fails is retried, and counted once", async () => {
  const kv = await Deno.openKv(":memory:");
  let failNext = false;
  const flaky = interceptCommits(kv, (commit) => {
    if (!failNext) return commit();
    failNext = false;
    return Promise.reject(new Error("KV unreachable"));
  });
  const config = loadConfig({ DENO_KV_PATH: ":memory:" });
  const ledger = new Ledger(flaky, config);
  try {
    await seedUser(kv, "u5");
    const lease = await ledger.admit(request("u5"));
    failNext = true;
    await assert.rejects(
      lease.settle({ promptTokens: 3, completionTokens: 4 }, "complete"),
      /KV unreachable/,
    );
    // Retried in the background (after a second): the slot comes back, the usage is counted once.
    const deadline = Date.now() + 5000;
    let held = 1n;
    while (Date.now() < deadline) {
      held = (await kv.get<Deno.KvU64>(keys.leaseHeld("u5", "count"))).value?.value ?? 0n;
      if (held === 0n) break;
      await new Promise((r) => setTimeout(r, 100));
    }
    assert.equal(held, 0n);
    let requests = 0;
    for await (const e of kv.list<Deno.KvU64>({ prefix: ["usage_daily"] })) {
      if (e.key[2] === "u5" && e.key[4] === "requests") requests += Number(e.value.value);
    }
    assert.equal(requests, 1);
  } finally {
    await ledger.close();
    kv.close();
  }
});

Deno.test("Ledger: a reaper racing a stalled process's settlement counts its lease once", async () => {
  const kv = await Deno.openKv(":memory:");
  const config = loadConfig({ DENO_KV_PATH: ":memory:", CONCURRENCY_LIMIT: "3" });
  const a = new Ledger(kv, config);
  let raced = false;
  let lease: Awaited<ReturnType<Ledger["admit"]>> | undefined;
  // Process B's clock is a minute ahead: A's heartbeat looks expired to it. Right before B's
  // first commit (after it has looked at A's heartbeat), A — which was only stalled — settles.
  const b = new Ledger(
    interceptCommits(kv, async (commit) => {
      if (!raced && lease) {
        raced = true;
        await lease.settle({ promptTokens: 5, completionTokens: 5 }, "complete");
      }
      return await commit();
    }),
    config,
    { clock: () => Date.now() + 60_000 },
  );
  try {
    await seedUser(kv, "u9");
    lease = await a.admit(request("u9"));
    await b.reap();
    assert.ok(raced);
    await b.reap();
    const held = await kv.get(keys.leaseHeld("u9", "count"));
    assert.equal(u64(held.value), 0, "the slot is given back once (a KvU64 below 0 wraps)");
    const usage = await usageTotalsOf(kv, "u9");
    assert.equal(usage.requests, 1, "counted once");
    assert.equal(usage.prompt, 5);
  } finally {
    await a.close();
    await b.close();
    kv.close();
  }
});
