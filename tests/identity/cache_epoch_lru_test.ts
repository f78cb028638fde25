import assert from "node:assert/strict";
import { CacheEpoch } from "../../lib/identity/cache_epoch.ts";

Deno.test("CacheEpoch: a user's drop pushed out of the bounded map still discards fills that raced it", async () => {
  const kv = await Deno.openKv(":memory:");
  try {
    const epoch = new CacheEpoch(kv);
    const before = epoch.generationOf("user_first");
    epoch.invalidate(["user_first"]);
    const dropped = epoch.generationOf("user_first");
    assert.ok(dropped > before);
    // Enough other users' drops to evict user_first's entry from the per-user map.
    for (let i = 0; i < 100_000; i++) epoch.invalidate([`user_${i}`]);
    assert.ok(epoch.generationOf("user_first") >= dropped, "the evicted drop is still seen");
    // Users dropped recently keep their own generation.
    assert.equal(epoch.generationOf("user_99999"), epoch.generation);
  } finally {
    kv.close();
  }
});
