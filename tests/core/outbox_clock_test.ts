import assert from "node:assert/strict";
import { Outbox } from "../../lib/core/outbox.ts";
import { captureLogger } from "../support/helpers.ts";

Deno.test("Outbox: due times, claims and retries follow the injected clock", async () => {
  const kv = await Deno.openKv(":memory:");
  let now = 1_000_000;
  const ran: string[] = [];
  const { log } = captureLogger([]);
  const outbox = new Outbox<{ fail: boolean }>(
    kv,
    "test_outbox",
    {
      name: "test job",
      run: (job) => {
        ran.push(`${job.id}@${now}`);
        return Promise.resolve(job.fail && job.attempts === 1 ? { error: "once" } : null);
      },
      retryInMs: () => 5_000,
      fields: (job) => ({ id: job.id }),
    },
    log,
    () => now,
  );
  try {
    const op = kv.atomic();
    const a = outbox.add(op, { id: "a", fail: true });
    assert.equal(a.createdAt, 1_000_000);
    outbox.add(op, { id: "later", fail: false }, now + 60_000);
    await op.commit();

    await outbox.flush();
    assert.deepEqual(ran, ["a@1000000"], "'later' is not due on the injected clock");
    assert.deepEqual(
      (await Array.fromAsync(kv.list({ prefix: ["test_outbox"] }))).map((e) => e.key.slice(1)),
      [[1_005_000, "a"], [1_060_000, "later"]],
      "the retry is due retryInMs after the injected now",
    );

    now += 60_000;
    await outbox.flush();
    // One pass runs its due jobs at once: their order is not the outbox's to keep.
    assert.deepEqual(ran.toSorted(), ["a@1000000", "a@1060000", "later@1060000"]);
    assert.equal(await outbox.pending(), 0);
  } finally {
    await outbox.close();
    kv.close();
  }
});
