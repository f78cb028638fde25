import assert from "node:assert/strict";
import { KeyVault } from "../../lib/identity/api_keys.ts";
import { CacheEpoch } from "../../lib/identity/cache_epoch.ts";
import { Users } from "../../lib/identity/users.ts";
import { keys } from "../../lib/core/kv.ts";

Deno.test("Users and CacheEpoch stamp records and change logs with the injected clock", async () => {
  const kv = await Deno.openKv(":memory:");
  try {
    const at = Date.UTC(2031, 4, 6, 7, 8, 9);
    const clock = () => at;
    const epoch = new CacheEpoch(kv, 250, undefined, clock);
    const users = new Users(kv, await KeyVault.fromSecret("x".repeat(40)), epoch, undefined, clock);
    const { user } = await users.provision("user_clock");
    assert.equal(user.createdAt, "2031-05-06T07:08:09.000Z");
    assert.equal(user.updatedAt, "2031-05-06T07:08:09.000Z");

    await epoch.bump(kv.atomic(), "user_clock").commit();
    const changes = await Array.fromAsync(kv.list({ prefix: keys.cacheChanges(at) }));
    assert.deepEqual(changes.map((c) => c.value), ["user_clock"]);
  } finally {
    kv.close();
  }
});
