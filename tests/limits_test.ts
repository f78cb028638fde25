import assert from "node:assert/strict";
import { loadConfig } from "../lib/core/config.ts";
import { AppError } from "../lib/core/errors.ts";
import { keys } from "../lib/core/kv.ts";
import {
  admit,
  Admitter,
  decideRate,
  type EffectiveLimits,
  formatDuration,
  quotaRefusal,
  type RateState,
  rateView,
} from "../lib/limits/limits.ts";
import type { UserRecord } from "../lib/identity/users.ts";

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

Deno.test("quotas refuse once the counter has reached the limit", () => {
  const lim: EffectiveLimits = { rpm: 1, rpd: 1, tokensPerDay: 100, budgetUsdMonthly: 2 };
  const at = (tokensToday: number, spendNanoMonth: number) =>
    quotaRefusal(lim, { tokensToday, spendNanoMonth, now: NOON }, {});
  assert.equal(at(99, 0), null);
  assert.equal(at(100, 0)?.code, "quota_exceeded");
  assert.equal(at(100, 0)?.headers["retry-after"], String(12 * 3600));
  assert.equal(at(0, 1_999_999_999), null);
  const budget = at(0, 2_000_000_000);
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

Deno.test("admit: 50 concurrent against rpm 20 admit exactly 20; refusals write nothing", async () => {
  const kv = await Deno.openKv(":memory:");
  try {
    const config = loadConfig({ DENO_KV_PATH: ":memory:", RATE_LIMIT_RPM: "20" });
    await seedUser(kv, "u1");
    const attempt = () =>
      admit(kv, config, {
        userId: "u1",
        clock: () => NOON,
        validate: (snap) => snap.userEntry.value!,
      }).then(() => "ok", (err) => err instanceof AppError ? err.code : String(err));
    const results = await Promise.all(Array.from({ length: 50 }, attempt));
    assert.equal(results.filter((r) => r === "ok").length, 20);
    assert.equal(results.filter((r) => r === "rate_limit_exceeded").length, 30);
    const before = await kv.get<RateState>(keys.rate("u1"));
    assert.equal(await attempt(), "rate_limit_exceeded");
    const after = await kv.get<RateState>(keys.rate("u1"));
    assert.equal(after.versionstamp, before.versionstamp);
    assert.equal(after.value?.dayCount, 20);
  } finally {
    kv.close();
  }
});

Deno.test("admit: per-user overrides win over the defaults", async () => {
  const kv = await Deno.openKv(":memory:");
  try {
    const config = loadConfig({ DENO_KV_PATH: ":memory:", RATE_LIMIT_RPM: "2" });
    await seedUser(kv, "u2", { rpm: 4 });
    const ok = [];
    for (let i = 0; i < 6; i++) {
      ok.push(
        await admit(kv, config, {
          userId: "u2",
          clock: () => NOON,
          validate: (snap) => snap.userEntry.value!,
        }).then((a) => a.headers["x-ratelimit-limit-requests"], () => null),
      );
    }
    assert.deepEqual(ok, ["4", "4", "4", "4", null, null]);
  } finally {
    kv.close();
  }
});

Deno.test("admit: two KV connections on one file (two processes) share the limits exactly", async () => {
  const dir = await Deno.makeTempDir();
  const a = await Deno.openKv(`${dir}/kv.sqlite3`);
  const b = await Deno.openKv(`${dir}/kv.sqlite3`);
  try {
    const config = loadConfig({ DENO_KV_PATH: ":memory:", RATE_LIMIT_RPM: "10" });
    await seedUser(a, "u3");
    const attempt = (kv: Deno.Kv) =>
      admit(kv, config, {
        userId: "u3",
        clock: () => NOON,
        validate: (snap) => snap.userEntry.value!,
      }).then(() => true, () => false);
    const results = await Promise.all(
      Array.from({ length: 30 }, (_, i) => attempt(i % 2 ? a : b)),
    );
    assert.equal(results.filter(Boolean).length, 10);
  } finally {
    a.close();
    b.close();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("Admitter (group commit): exact per user across two connections on one file", async () => {
  const dir = await Deno.makeTempDir();
  const a = await Deno.openKv(`${dir}/kv.sqlite3`);
  const b = await Deno.openKv(`${dir}/kv.sqlite3`);
  try {
    const config = loadConfig({ DENO_KV_PATH: ":memory:", RATE_LIMIT_RPM: "7" });
    for (const id of ["x", "y", "z"]) await seedUser(a, id);
    await seedUser(a, "w", { rpm: 2 });
    const admitters = [new Admitter(a, config, () => NOON), new Admitter(b, config, () => NOON)];
    const users = ["x", "y", "z", "w"];
    const results = await Promise.all(
      Array.from({ length: 80 }, (_, i) => {
        const userId = users[i % 4];
        return admitters[(i >> 2) % 2].admit({
          userId,
          validate: (snap) => snap.userEntry.value!,
        }).then(() => userId, (err) => err instanceof AppError ? err.code : String(err));
      }),
    );
    const count = (v: string) => results.filter((r) => r === v).length;
    assert.deepEqual(users.map(count), [7, 7, 7, 2]);
    assert.equal(count("rate_limit_exceeded"), 80 - 23);
  } finally {
    a.close();
    b.close();
    await Deno.remove(dir, { recursive: true });
  }
});
