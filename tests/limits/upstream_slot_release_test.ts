/**
 * A lease's upstream slot is given back to the model's count and to its user's part of it, in
 * the commit that settles the lease — and by the reaper when the lease's process died.
 */
import assert from "node:assert/strict";
import { loadConfig } from "../../lib/core/config.ts";
import { keys, u64 } from "../../lib/core/kv.ts";
import type { UserRecord } from "../../lib/identity/users.ts";
import { type AdmitRequest, Ledger } from "../../lib/limits/admission.ts";
import { UpstreamSlots } from "../../lib/limits/upstream/slots.ts";

const USER: UserRecord = {
  id: "u_slot",
  email: null,
  firstName: null,
  lastName: null,
  status: "active",
  createdAt: new Date().toISOString(),
  updatedAt: new Date().toISOString(),
  key: null,
  limits: {},
  profileKnown: false,
};

const request: AdmitRequest = {
  userId: USER.id,
  model: "glm-4.6",
  reserve: { prompt: 0, output: 0 },
  validate: (user) => user!,
  waitsForSlot: true,
};

/** The model's, the user's and the pool key's counts. */
async function counts(kv: Deno.Kv, keyId: string) {
  const [model, user, key] = await kv.getMany([
    keys.upstreamHeld("glm-4.6"),
    keys.upstreamUserHeld("glm-4.6", USER.id),
    keys.upstreamKeyHeld("glm-4.6", keyId),
  ]);
  return [u64(model.value), u64(user.value), u64(key.value)];
}

Deno.test("a lease's upstream slot goes back to the model and its user: when it settles, and by the reaper when its process died", async () => {
  const kv = await Deno.openKv(":memory:");
  const config = loadConfig({
    DENO_KV_PATH: ":memory:",
    UPSTREAM_CONCURRENCY: "2",
    GLM_API_KEY: "glm-key-release-test-0001",
  });
  const a = new Ledger(kv, config);
  const slots = new UpstreamSlots(kv, config, a);
  const [{ id: keyId }] = await slots.pool.inService();
  // Another process, whose clock is a minute ahead: A's heartbeat looks expired to it.
  const b = new Ledger(kv, config, { clock: () => Date.now() + 60_000 });
  try {
    await kv.set(keys.user(USER.id), USER);
    const settled = await a.admit(request);
    await slots.acquire(settled, new AbortController().signal);
    assert.deepEqual(await counts(kv, keyId), [1, 1, 1]);
    await settled.settle(null, "complete");
    assert.deepEqual(await counts(kv, keyId), [0, 0, 0], "settled: given back");

    const orphan = await a.admit(request);
    await slots.acquire(orphan, new AbortController().signal);
    assert.deepEqual(await counts(kv, keyId), [1, 1, 1]);
    await b.reap();
    assert.deepEqual(await counts(kv, keyId), [0, 0, 0], "reaped: given back");
  } finally {
    slots.close();
    await a.close();
    await b.close();
    kv.close();
  }
});
