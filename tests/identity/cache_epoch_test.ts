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

Deno.test("an invalidating write drops only that user's cached values in other processes", async () => {
  const dir = await Deno.makeTempDir();
  const a = await Deno.openKv(`${dir}/kv.sqlite3`);
  const b = await Deno.openKv(`${dir}/kv.sqlite3`);
  try {
    const writer = new CacheEpoch(a, 0);
    const reader = new CacheEpoch(b, 0);
    const dropped: Array<string[] | null> = [];
    reader.onChange((ids) => dropped.push(ids));
    await reader.fresh(); // first look: nothing to drop
    await writer.bump(a.atomic(), "user_rotated").commit();
    await reader.fresh();
    assert.deepEqual(dropped, [["user_rotated"]]);
    assert.ok(reader.generationOf("user_rotated") > reader.generationOf("user_other"));
  } finally {
    a.close();
    b.close();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("a process away longer than the change log is kept drops everything, not just the changes still logged", async () => {
  const dir = await Deno.makeTempDir();
  const a = await Deno.openKv(`${dir}/kv.sqlite3`);
  const b = await Deno.openKv(`${dir}/kv.sqlite3`);
  try {
    // Records kept 400 ms here (10 minutes in the product).
    const writer = new CacheEpoch(a, 0, 400);
    const reader = new CacheEpoch(b, 0, 400);
    const dropped: Array<string[] | null> = [];
    reader.onChange((ids) => dropped.push(ids));
    await reader.fresh();
    // While the reader is away: a user is disabled, its record is gone (expired), and another
    // user's change is still in the log.
    await writer.bump(a.atomic(), "user_disabled_meanwhile").commit();
    for await (const e of a.list({ prefix: ["cache_changes"] })) await a.delete(e.key);
    await new Promise((r) => setTimeout(r, 300));
    await writer.bump(a.atomic(), "user_profile_updated").commit();
    await reader.fresh();
    assert.deepEqual(dropped, [null], "everything dropped: the log cannot say who else changed");
  } finally {
    a.close();
    b.close();
    await Deno.remove(dir, { recursive: true });
  }
});
