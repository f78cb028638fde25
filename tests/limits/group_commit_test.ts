/**
 * GroupCommitter alone, with a fake commit: the test decides when each batch's attempt ends, so
 * every flush is deterministic (no KV, no timers).
 */
import assert from "node:assert/strict";
import { GroupCommitter, type GroupOp } from "../../lib/limits/group_commit.ts";

interface TestOp extends GroupOp {
  name: string;
  failed?: unknown;
}

const op = (name: string, key: string, checks: string[] = [], mutations = 1): TestOp => ({
  name,
  key,
  checks,
  mutations,
});

/** A fake commit function: each attempt waits until the test answers it. */
class ManualCommit {
  readonly batches: string[][] = [];
  private answers: Array<(ok: boolean | Error) => void> = [];

  attempt = (batch: TestOp[]): Promise<boolean> => {
    this.batches.push(batch.map((o) => o.name));
    return new Promise((resolve, reject) => {
      this.answers.push((ok) => ok instanceof Error ? reject(ok) : resolve(ok));
    });
  };

  /** Ends the oldest attempt still open. */
  async answer(ok: boolean | Error = true) {
    const next = this.answers.shift();
    assert.ok(next, "no attempt is waiting");
    next(ok);
    // Let the committer react (its promise chains).
    for (let i = 0; i < 10; i++) await Promise.resolve();
  }

  get open(): number {
    return this.answers.length;
  }
}

function committer(
  fake: ManualCommit,
  extra: Partial<ConstructorParameters<typeof GroupCommitter<TestOp>>[0]> = {},
) {
  return new GroupCommitter<TestOp>({
    attempt: fake.attempt,
    fail: (batch, err) => {
      for (const o of batch) o.failed = err;
    },
    baseChecks: 1,
    sleep: () => Promise.resolve(),
    ...extra,
  });
}

Deno.test("group commit: operations arriving while a commit is in flight go together into the next", async () => {
  const fake = new ManualCommit();
  const gc = committer(fake, { maxBatches: 1 });
  gc.submit(op("first", "z"));
  assert.deepEqual(fake.batches, [["first"]], "nothing in flight: it starts at once");
  gc.submit(op("a1", "a"));
  gc.submit(op("b1", "b"));
  gc.submit(op("c1", "c"));
  assert.equal(fake.batches.length, 1, "nothing starts while the only batch slot is taken");
  await fake.answer(true);
  assert.deepEqual(fake.batches[1], ["a1", "b1", "c1"]);
  await fake.answer(true);
  await gc.drain();
});

Deno.test("group commit: one key's operations never share batches in flight, and keep their order", async () => {
  const fake = new ManualCommit();
  const gc = committer(fake, { maxBatches: 2 });
  gc.submit(op("a1", "a"));
  gc.submit(op("a2", "a"));
  gc.submit(op("b1", "b"));
  gc.submit(op("a3", "a"));
  // A second batch starts at once, but without key a (held by the first).
  assert.deepEqual(fake.batches, [["a1"], ["b1"]]);
  await fake.answer(true); // a1
  assert.deepEqual(fake.batches[2], ["a2", "a3"], "a's next operations, in order");
  await fake.answer(true);
  await fake.answer(true);
  await gc.drain();
  assert.equal(fake.open, 0);
});

Deno.test("group commit: a batch takes at most 10 checks, a shared check counting once", async () => {
  const fake = new ManualCommit();
  const gc = committer(fake, { maxBatches: 1 });
  gc.submit(op("hold", "z")); // keeps the batch slot while the rest queue up
  for (let i = 0; i < 12; i++) gc.submit(op(`u${i}`, `u${i}`, ["epoch", `rate:u${i}`]));
  await fake.answer(true);
  // 1 base + "epoch" + 8 users' own checks = 10.
  assert.deepEqual(fake.batches[1], ["u0", "u1", "u2", "u3", "u4", "u5", "u6", "u7"]);
  await fake.answer(true);
  assert.deepEqual(fake.batches[2], ["u8", "u9", "u10", "u11"]);
  await fake.answer(true);
  await gc.drain();
});

Deno.test("group commit: a batch stays within its mutations", async () => {
  const fake = new ManualCommit();
  const gc = committer(fake, { maxBatches: 1, maxMutations: 25 });
  gc.submit(op("hold", "z"));
  for (let i = 0; i < 5; i++) gc.submit(op(`m${i}`, `m${i}`, [], 10));
  await fake.answer(true);
  assert.deepEqual(fake.batches[1], ["m0", "m1"]);
  await fake.answer(true);
  assert.deepEqual(fake.batches[2], ["m2", "m3"]);
  await fake.answer(true);
  await fake.answer(true);
  await gc.drain();
});

Deno.test("group commit: a conflict is tried again; one that persists goes key by key", async () => {
  const fake = new ManualCommit();
  const gc = committer(fake, { maxBatches: 1, batchAttempts: 3 });
  gc.submit(op("hold", "z"));
  gc.submit(op("a1", "a"));
  gc.submit(op("b1", "b"));
  await fake.answer(true);
  assert.deepEqual(fake.batches[1], ["a1", "b1"]);
  await fake.answer(false);
  assert.deepEqual(fake.batches[2], ["a1", "b1"], "tried again whole");
  await fake.answer(false);
  await fake.answer(false);
  // Three conflicts: split, each key on its own (both in flight at once).
  assert.deepEqual(fake.batches.slice(4).sort(), [["a1"], ["b1"]]);
  await fake.answer(true);
  await fake.answer(true);
  await gc.drain();
});

Deno.test("group commit: a throw fails the batch's operations, and the queue goes on", async () => {
  const fake = new ManualCommit();
  const gc = committer(fake, { maxBatches: 1 });
  const a = op("a1", "a");
  gc.submit(a);
  const b = op("b1", "b");
  gc.submit(b);
  await fake.answer(new Error("kv down"));
  assert.equal((a.failed as Error).message, "kv down");
  assert.equal(b.failed, undefined);
  assert.deepEqual(fake.batches[1], ["b1"]);
  await fake.answer(true);
  await gc.drain();
});

Deno.test("group commit: one key that keeps conflicting gives up after maxAttempts", async () => {
  let attempts = 0;
  const failed: unknown[] = [];
  const gc = new GroupCommitter<TestOp>({
    attempt: () => {
      attempts++;
      return Promise.resolve(false);
    },
    fail: (_batch, err) => failed.push(err),
    sleep: () => Promise.resolve(),
    batchAttempts: 3,
    maxAttempts: 7,
  });
  gc.submit(op("a1", "a"));
  await gc.drain();
  assert.equal(attempts, 3 + 7);
  assert.match(String(failed[0]), /kept conflicting after 7 attempts/);
});

Deno.test("group commit: exclusive() waits for batches in flight and keeps new ones out", async () => {
  const fake = new ManualCommit();
  const gc = committer(fake, { maxBatches: 2 });
  const order: string[] = [];
  gc.submit(op("a1", "a"));
  let release!: () => void;
  const ran = gc.exclusive(() => {
    order.push("exclusive start");
    return new Promise<void>((r) => release = r);
  });
  gc.submit(op("b1", "b"));
  assert.deepEqual(fake.batches, [["a1"]], "b waits behind the exclusive run");
  assert.deepEqual(order, []);
  await fake.answer(true);
  assert.deepEqual(order, ["exclusive start"], "runs once nothing is in flight");
  assert.equal(fake.batches.length, 1);
  release();
  await ran;
  for (let i = 0; i < 10; i++) await Promise.resolve();
  assert.deepEqual(fake.batches[1], ["b1"]);
  await fake.answer(true);
  await gc.drain();
});

Deno.test("group commit: hold() keeps new batches out without waiting for those in flight", async () => {
  const fake = new ManualCommit();
  const gc = committer(fake, { maxBatches: 2 });
  gc.submit(op("a1", "a"));
  let release!: () => void;
  const held = gc.hold(new Promise<void>((r) => release = r));
  gc.submit(op("b1", "b"));
  assert.deepEqual(fake.batches, [["a1"]]);
  release();
  await held;
  for (let i = 0; i < 10; i++) await Promise.resolve();
  assert.deepEqual(fake.batches[1], ["b1"]);
  await fake.answer(true);
  await fake.answer(true);
  await gc.drain();
});
