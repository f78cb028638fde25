/** Usage per key: the day counters carry the key, priced when read like the totals. */
import assert from "node:assert/strict";
import { recordUsage, userUsage } from "../../lib/usage/usage.ts";
import { usageByKey } from "../../lib/usage/key_usage.ts";
import { keys } from "../../lib/core/kv.ts";
import { utcDay } from "../../lib/core/utc.ts";

const now = Date.UTC(2026, 10, 25, 10);
const before = {
  "glm-4.6": { input: 0.6, output: 2.2 },
  "glm-4.5-air": { input: 0.2, output: 1.1 },
};
/** The operator changed PRICING after the requests were made. */
const after = {
  "glm-4.6": { input: 1.2, output: 4.4 },
  "glm-4.5-air": { input: 0.4, output: 2.2 },
};

Deno.test("usage per key: every key's row, priced like the totals, adds up to them after a PRICING change", async () => {
  const kv = await Deno.openKv(":memory:");
  try {
    const uses = [
      { keyId: "default", model: "glm-4.6", promptTokens: 1000, completionTokens: 500 },
      { keyId: "k_app1", model: "glm-4.6", promptTokens: 200, completionTokens: 100 },
      { keyId: "k_app1", model: "glm-4.5-air", promptTokens: 3000, completionTokens: 50 },
      { keyId: undefined, model: "glm-4.5-air", promptTokens: 7, completionTokens: 3 },
    ];
    for (const u of uses) await recordUsage(kv, before, { userId: "u", at: now, ...u });
    await recordUsage(kv, before, {
      userId: "someone-else",
      model: "glm-4.6",
      promptTokens: 9,
      completionTokens: 9,
      at: now,
    });

    const byKey = await usageByKey(kv, after, "u", 30, now);
    assert.deepEqual([...byKey.keys()].sort(), ["default", "k_app1"]);
    assert.deepEqual(
      { ...byKey.get("default")!, costUsd: undefined },
      { requests: 2, totalTokens: 1510, costUsd: undefined },
    );
    assert.equal(byKey.get("k_app1")!.requests, 2);
    assert.equal(byKey.get("k_app1")!.totalTokens, 3350);
    // Priced at today's PRICING, as the totals are: the rows add up to them.
    const totals = (await userUsage(kv, after, "u", 30, now)).today;
    const keysCost = [...byKey.values()].reduce((s, k) => s + k.costUsd, 0);
    assert.ok(Math.abs(keysCost - totals.costUsd) < 1e-6, `${keysCost} vs ${totals.costUsd}`);
    assert.equal([...byKey.values()].reduce((s, k) => s + k.requests, 0), totals.requests);
    // (1000×1.2 + 500×4.4 + 7×0.4 + 3×2.2) / 10⁶ USD: the default key at today's prices.
    assert.equal(byKey.get("default")!.costUsd, 0.0034094);
  } finally {
    kv.close();
  }
});

Deno.test("usage per key: counters written per key before the day counters had a key part still count", async () => {
  const kv = await Deno.openKv(":memory:");
  try {
    const day = utcDay(now);
    // As an earlier version's settle commit wrote them: the day counters without a key part,
    // and the key's own requests, tokens and nano-USD as charged.
    await kv.atomic()
      .sum(["usage_daily", day, "u", "glm-4.6", "requests"], 3n)
      .sum(["usage_daily", day, "u", "glm-4.6", "prompt"], 300n)
      .sum(["usage_daily", day, "u", "glm-4.6", "completion"], 30n)
      .sum(keys.usageByKey("u", day, "k_old", "requests"), 3n)
      .sum(keys.usageByKey("u", day, "k_old", "tokens"), 330n)
      .sum(keys.usageByKey("u", day, "k_old", "nano"), 5_000_000n)
      .commit();
    await recordUsage(kv, before, {
      userId: "u",
      keyId: "k_old",
      model: "glm-4.6",
      promptTokens: 100,
      completionTokens: 10,
      at: now,
    });
    const byKey = await usageByKey(kv, before, "u", 30, now);
    assert.deepEqual(byKey.get("k_old"), { requests: 4, totalTokens: 440, costUsd: 0.005082 });
    const totals = (await userUsage(kv, before, "u", 30, now)).today;
    assert.equal(totals.requests, 4);
    assert.equal(totals.totalTokens, 440);
  } finally {
    kv.close();
  }
});
