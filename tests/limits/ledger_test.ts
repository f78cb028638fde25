import assert from "node:assert/strict";
import { loadConfig } from "../../lib/core/config.ts";
import { AppError } from "../../lib/core/errors.ts";
import { keys, u64 } from "../../lib/core/kv.ts";
import { type AdmitRequest, Ledger, quotaRefusal } from "../../lib/limits/admission.ts";
import { decideRate, type RateState, rateView } from "../../lib/limits/gcra.ts";
import { UpstreamSlots } from "../../lib/limits/upstream_slots.ts";
import { type EffectiveLimits, formatDuration } from "../../lib/limits/policy.ts";
import type { UserRecord } from "../../lib/identity/users.ts";
import { interceptCommits, usageTotalsOf } from "../support/helpers.ts";

const limits = (rpm: number, rpd = 1000): EffectiveLimits => ({
  rpm,
  rpd,
  tokensPerDay: null,
  budgetUsdMonthly: null,
});
const NOON = Date.UTC(2026, 10, 25, 12, 0, 0);

Deno.test("GCRA: a fresh allowance of rpm admits exactly rpm, then one per interval", () => {
  for (const rpm of [1, 5, 7, 13, 60, 997]) {
    let state: RateState | null = null;
    let admitted = 0;
    for (let i = 0; i < rpm + 5; i++) {
      const d = decideRate(state, limits(rpm), NOON);
      if (d.allowed) {
        admitted++;
        state = d.next;
      }
    }
    assert.equal(admitted, rpm, `rpm ${rpm}`);
  }
  // rpm 5: interval 12 s. Full at NOON; the next slot opens 12 s later, not before.
  let state: RateState | null = null;
  for (let i = 0; i < 5; i++) state = decideRate(state, limits(5), NOON).next;
  const refused = decideRate(state, limits(5), NOON);
  assert.equal(refused.allowed, false);
  assert.equal(refused.retryAfter, 12);
  assert.equal(decideRate(state, limits(5), NOON + 11_999).allowed, false);
  const later = decideRate(state, limits(5), NOON + 12_000);
  assert.equal(later.allowed, true);
  assert.equal(later.after.remainingMinute, 0);
  // A minute of quiet refills the whole allowance, and no more.
  assert.equal(rateView(state, limits(5), NOON + 60_000).remainingMinute, 5);
  assert.equal(rateView(state, limits(5), NOON + 600_000).remainingMinute, 5);
});

Deno.test("GCRA: an operator's rpm change applies at once, the requests already made still count", () => {
  const after = (rpm: number, n: number) => {
    let state: RateState | null = null;
    for (let i = 0; i < n; i++) state = decideRate(state, limits(rpm), NOON).next;
    return state;
  };
  // Raised from 2 to 60 after 2 requests: 58 left now, not the 3 the old pace refilled.
  const slow = after(2, 2);
  assert.equal(rateView(slow, limits(60), NOON + 1_000).remainingMinute, 58);
  assert.equal(decideRate(slow, limits(60), NOON + 1_000).after.remainingMinute, 57);
  // Lowered from 60 to 10 after 30 requests: none left, and a full minute to wait at most.
  const busy = after(60, 30);
  const lowered = decideRate(busy, limits(10), NOON);
  assert.equal(lowered.allowed, false);
  assert.ok(lowered.retryAfter <= 6, `retry after ${lowered.retryAfter} s`);
  assert.equal(rateView(busy, limits(10), NOON + 60_000).remainingMinute, 10);
  // The same rpm: nothing changes.
  assert.equal(rateView(after(5, 5), limits(5), NOON).remainingMinute, 0);
});

Deno.test("day counter: exact, and starts over at 00:00 UTC", () => {
  let state: RateState | null = null;
  const lim = limits(1000, 3);
  for (let i = 0; i < 3; i++) {
    const d = decideRate(state, lim, NOON);
    assert.equal(d.allowed, true);
    state = d.next;
  }
  const refused = decideRate(state, lim, NOON);
  assert.equal(refused.allowed, false);
  assert.equal(refused.retryAfter, 12 * 3600);
  const tomorrow = decideRate(state, lim, NOON + 12 * 3600_000);
  assert.equal(tomorrow.allowed, true);
  assert.equal(tomorrow.next.dayCount, 1);
});

Deno.test("formatDuration is OpenAI-style", () => {
  assert.equal(formatDuration(0), "0s");
  assert.equal(formatDuration(20), "20ms");
  assert.equal(formatDuration(1000), "1s");
  assert.equal(formatDuration(1500), "1.5s");
  assert.equal(formatDuration(12_000), "12s");
  assert.equal(formatDuration(60_000), "1m0s");
  assert.equal(formatDuration(90_500), "1m31s");
  assert.equal(formatDuration(5 * 3600_000 + 3 * 60_000), "5h3m0s");
});

Deno.test("quotas: a reservation must fit what is left; in-flight reservations only delay", () => {
  const lim: EffectiveLimits = { rpm: 1, rpd: 1, tokensPerDay: 100, budgetUsdMonthly: 2 };
  const at = (f: Partial<Parameters<typeof quotaRefusal>[3]>) =>
    quotaRefusal(lim, NOON, {}, {
      usedTokens: 0,
      usedNano: 0,
      heldTokens: 0,
      heldNano: 0,
      reserveTokens: 0,
      reserveNano: 0,
      reserveOutput: 0,
      ...f,
    });
  assert.equal(at({ usedTokens: 99 }), null, "nothing reserved: refused only once reached");
  assert.equal(at({ usedTokens: 60, reserveTokens: 40 }), null, "fits exactly");
  const spent = at({ usedTokens: 100 });
  assert.equal(spent?.code, "quota_exceeded");
  assert.equal(spent?.headers["retry-after"], String(12 * 3600));
  assert.equal(spent?.headers["x-should-retry"], "false");
  const tooBig = at({ usedTokens: 60, reserveTokens: 41, reserveOutput: 30 });
  assert.equal(tooBig?.headers["x-should-retry"], "false");
  assert.match(tooBig!.message, /reserves 41 tokens .*up to 30 output tokens.* 40 tokens of/);
  // Fits alone, not beside requests in flight: they settle soon, so retry in a second.
  const busy = at({ usedTokens: 50, heldTokens: 30, reserveTokens: 30 });
  assert.equal(busy?.code, "quota_exceeded");
  assert.equal(busy?.headers["retry-after"], "1");
  assert.equal(busy?.headers["x-should-retry"], undefined);
  assert.equal(at({ usedNano: 1_999_999_999 }), null);
  const budget = at({ usedNano: 2_000_000_000 });
  assert.equal(budget?.code, "quota_exceeded");
  // Nov 25 12:00 → Dec 1 00:00 = 5.5 days.
  assert.equal(budget?.headers["retry-after"], String(5.5 * 86_400));
});

async function seedUser(kv: Deno.Kv, id: string, overrides: UserRecord["limits"] = {}) {
  const user: UserRecord = {
    id,
    email: null,
    firstName: null,
    lastName: null,
    status: "active",
    createdAt: new Date(NOON).toISOString(),
    updatedAt: new Date(NOON).toISOString(),
    key: null,
    limits: overrides,
    profileKnown: false,
  };
  await kv.set(keys.user(id), user);
}

const request = (userId: string, reserve = { prompt: 0, output: 0 }): AdmitRequest => ({
  userId,
  model: "glm-4.6",
  reserve,
  validate: (user) => user!,
});

const codeOf = (err: unknown) => err instanceof AppError ? err.code : String(err);

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

Deno.test("the suite's KV wrapper refuses what KV Connect refuses", async () => {
  const kv = await Deno.openKv(":memory:");
  try {
    const op = kv.atomic();
    for (let i = 0; i < 11; i++) op.check({ key: ["k", i], versionstamp: null });
    await assert.rejects(op.commit(), /11 checks \(max 10\)/);
    await assert.rejects(kv.atomic().set(["big"], "x".repeat(70_000)).commit(), /max 64 KiB/);
    const many = kv.atomic();
    for (let i = 0; i < 1001; i++) many.sum(["n", i], 1n);
    await assert.rejects(many.commit(), /1001 mutations/);
    assert.equal((await kv.get(["big"])).value, null, "nothing written");
    assert.throws(() => kv.enqueue("job"), /KV queues do not exist over KV Connect/);
    assert.throws(() => kv.listenQueue(() => {}), /KV queues do not exist over KV Connect/);
    assert.throws(() => kv.atomic().enqueue("job"), /KV queues do not exist over KV Connect/);
  } finally {
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
