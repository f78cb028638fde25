/** Seeded usage for the report and summary tests, with its hand-computed expectations. */
import { keys } from "../../lib/core/kv.ts";
import type { Pricing } from "../../lib/usage/pricing.ts";
import { recordUsage } from "../../lib/usage/usage.ts";
import type { UserRecord } from "../../lib/identity/users.ts";

/** "Now" of the fixture: 2026-03-10 is today (open), 03-07…03-09 are closed days. */
export const NOW = Date.parse("2026-03-10T12:00:00Z");
const at = (day: string, hour = 9) => Date.parse(`${day}T${String(hour).padStart(2, "0")}:00:00Z`);

/** "mystery" is unpriced here. */
export const PRICING: Pricing = {
  "glm-4.6": { input: 0.6, output: 2.2 },
  "glm-4.5-air": { input: 0.2, output: 1.1 },
};
/** The same with a "*" fallback, which prices "mystery". */
export const PRICING_WITH_FALLBACK: Pricing = { ...PRICING, "*": { input: 1, output: 2 } };

/** A quoted local part: valid e-mail, and a CSV field that needs quoting. */
export const ALICE_EMAIL = '"alice, ops"@example.com';

export async function seedUsers(kv: Deno.Kv): Promise<void> {
  const user = (id: string, email: string | null, limits = {}): UserRecord => ({
    id,
    email,
    firstName: null,
    lastName: null,
    status: "active",
    createdAt: "2026-01-01T00:00:00.000Z",
    updatedAt: "2026-01-01T00:00:00.000Z",
    key: null,
    limits,
    profileKnown: true,
  });
  await kv.set(keys.user("user_alice"), user("user_alice", ALICE_EMAIL));
  await kv.set(keys.user("user_bob"), user("user_bob", "bob@example.com"));
  // carol has usage but no user record (e.g. usage from before the user table existed).
}

/**
 * alice: 03-08 glm-4.6 1000/500 + 3000/1500, 03-09 mystery 10000/10000
 * bob:   03-08 glm-4.5-air 2,000,000/1,000,000, 03-10 (today) glm-4.6 100/100
 * carol: 03-07 glm-4.6 500/0
 */
export async function seedUsage(kv: Deno.Kv, pricing: Pricing = PRICING): Promise<void> {
  const use = (userId: string, model: string, day: string, p: number, c: number, hour = 9) =>
    recordUsage(kv, pricing, {
      userId,
      model,
      at: at(day, hour),
      promptTokens: p,
      completionTokens: c,
    });
  await seedUsers(kv);
  await use("user_alice", "glm-4.6", "2026-03-08", 1000, 500);
  await use("user_alice", "glm-4.6", "2026-03-08", 3000, 1500, 23);
  await use("user_alice", "mystery", "2026-03-09", 10000, 10000);
  await use("user_bob", "glm-4.5-air", "2026-03-08", 2_000_000, 1_000_000);
  await use("user_bob", "glm-4.6", "2026-03-10", 100, 100);
  await use("user_carol", "glm-4.6", "2026-03-07", 500, 0);
}

/** The JSON report for 2026-03-08…2026-03-10 under PRICING, computed by hand. */
export const EXPECTED_0308_0310 = {
  from: "2026-03-08",
  to: "2026-03-10",
  users: [
    {
      userId: "user_bob",
      email: "bob@example.com",
      requests: 2,
      promptTokens: 2_000_100,
      completionTokens: 1_000_100,
      totalTokens: 3_000_200,
      // 2e6 × 0.2 + 1e6 × 1.1 = 1.5 USD, + 100 × 0.6 + 100 × 2.2 = 280e-6 USD
      costUsd: 1.50028,
    },
    {
      userId: "user_alice",
      email: ALICE_EMAIL,
      requests: 3,
      promptTokens: 14_000,
      completionTokens: 12_000,
      totalTokens: 26_000,
      // 4000 × 0.6 + 2000 × 2.2 = 6800e-6; mystery is unpriced
      costUsd: 0.0068,
    },
  ],
  models: [
    {
      model: "glm-4.5-air",
      requests: 1,
      promptTokens: 2_000_000,
      completionTokens: 1_000_000,
      totalTokens: 3_000_000,
      costUsd: 1.5,
      priced: true,
    },
    {
      model: "glm-4.6",
      requests: 3,
      promptTokens: 4_100,
      completionTokens: 2_100,
      totalTokens: 6_200,
      costUsd: 0.00708,
      priced: true,
    },
    {
      model: "mystery",
      requests: 1,
      promptTokens: 10_000,
      completionTokens: 10_000,
      totalTokens: 20_000,
      costUsd: 0,
      priced: false,
    },
  ],
  totals: {
    requests: 5,
    promptTokens: 2_014_100,
    completionTokens: 1_012_100,
    totalTokens: 3_026_200,
    costUsd: 1.50708,
  },
};

/** Every KV entry as comparable text (values only; versionstamps differ between stores). */
export async function dumpKv(kv: Deno.Kv): Promise<string[]> {
  const out: string[] = [];
  for await (const e of kv.list({ prefix: [] })) {
    const value = e.value instanceof Deno.KvU64 ? `u64:${e.value.value}` : JSON.stringify(e.value);
    out.push(`${JSON.stringify(e.key)} = ${value}`);
  }
  return out;
}

export async function tempKvPath(): Promise<{ path: string; cleanup: () => Promise<void> }> {
  const dir = await Deno.makeTempDir({ prefix: "keyway_cost_" });
  return {
    path: `${dir}/kv.sqlite3`,
    cleanup: () => Deno.remove(dir, { recursive: true }),
  };
}
