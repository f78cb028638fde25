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

Deno.test("the suite's KV wrapper refuses the reads KV Connect refuses", async () => {
  const kv = await Deno.openKv(":memory:");
  try {
    const eleven = Array.from({ length: 11 }, (_, i) => ["k", i]);
    await assert.rejects(kv.getMany(eleven), /getMany of 11 keys \(max 10\)/);
    assert.equal((await kv.getMany(eleven.slice(0, 10))).length, 10);
    assert.throws(() => kv.watch(eleven), /watch of 11 keys \(max 10\)/);
    kv.watch(eleven.slice(0, 10)).cancel();
    assert.throws(() => kv.list({ prefix: ["k"] }, { batchSize: 1001 }), /page of 1001 entries/);
    for (const from of [0, 500]) {
      const op = kv.atomic();
      for (let i = from; i < Math.min(from + 500, 1001); i++) op.set(["n", i], i);
      await op.commit();
    }
    await kv.set(["n", 1000], 1000);
    // A page of 1000 is allowed; a limit beyond it reads in pages of 500 (Deno's default).
    let n = 0;
    for await (const _ of kv.list({ prefix: ["n"] }, { batchSize: 1000 })) n++;
    assert.equal(n, 1001);
    n = 0;
    for await (const _ of kv.list({ prefix: ["n"] }, { limit: 5000 })) n++;
    assert.equal(n, 1001);
  } finally {
    kv.close();
  }
});
