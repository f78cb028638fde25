/** The per-process user cache stays correct across processes (two KV handles on one file). */
import assert from "node:assert/strict";
import { CacheEpoch } from "../../lib/identity/cache_epoch.ts";
import { KeyVault } from "../../lib/identity/api_keys.ts";
import { Users } from "../../lib/identity/users.ts";
import { ENCRYPTION_SECRET } from "../support/helpers.ts";

Deno.test("cached keys follow rotations, status changes and deletions in another process", async (t) => {
  const dir = await Deno.makeTempDir();
  const kvA = await Deno.openKv(`${dir}/kv.sqlite3`);
  const kvB = await Deno.openKv(`${dir}/kv.sqlite3`);
  try {
    const vault = await KeyVault.fromSecret(ENCRYPTION_SECRET);
    const a = new Users(kvA, vault);
    const b = new Users(kvB, vault, new CacheEpoch(kvB, 100));

    const first = await a.provision("user_1");
    assert.equal(first.created, true);
    assert.equal((await b.provision("user_1")).apiKey, first.apiKey);

    await t.step("the writing process sees its own rotation at once", async () => {
      const rotated = await a.rotate("user_1");
      assert.equal((await a.provision("user_1")).apiKey, rotated.apiKey);
    });

    await t.step("another process sees it within the epoch interval", async () => {
      const current = (await a.provision("user_1")).apiKey;
      await new Promise((r) => setTimeout(r, 120));
      assert.equal((await b.provision("user_1")).apiKey, current);
      assert.equal((await b.provision("user_1")).created, false);
    });

    await t.step("limit overrides and deletion propagate the same way", async () => {
      await a.setLimits("user_1", { rpm: 3 });
      await new Promise((r) => setTimeout(r, 120));
      assert.deepEqual((await b.provision("user_1")).user.limits, { rpm: 3 });
      await a.markDeleted("user_1");
      await new Promise((r) => setTimeout(r, 120));
      await assert.rejects(() => b.provision("user_1"), /deleted/);
    });
  } finally {
    kvA.close();
    kvB.close();
    await Deno.remove(dir, { recursive: true });
  }
});
