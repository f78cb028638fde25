/** kv_limits.ts, preloaded into every test, refuses the commits KV Connect refuses. */
import assert from "node:assert/strict";

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
