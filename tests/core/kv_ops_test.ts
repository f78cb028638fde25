import assert from "node:assert/strict";
import {
  backoffMs,
  BoundedMap,
  getManyChunked,
  KV_GET_MANY_MAX,
  retry,
} from "../../lib/core/kv_ops.ts";
import { sha256Base64url, sha256Hex } from "../../lib/core/hash.ts";

Deno.test("getManyChunked: any number of keys, calls of at most 10, results in key order", async (t) => {
  const kv = await Deno.openKv(":memory:");
  try {
    for (let i = 0; i < 25; i += 2) await kv.set(["n", i], i);
    const calls: number[] = [];
    const getMany = kv.getMany.bind(kv);
    kv.getMany = ((ks: Deno.KvKey[]) => {
      calls.push(ks.length);
      return getMany(ks);
    }) as Deno.Kv["getMany"];

    await t.step("none: no call", async () => {
      assert.deepEqual(await getManyChunked(kv, []), []);
      assert.deepEqual(calls, []);
    });
    await t.step("25 keys: 10 + 10 + 5, present and absent in order", async () => {
      const keys = Array.from({ length: 25 }, (_, i) => ["n", i]);
      const entries = await getManyChunked<number>(kv, keys);
      assert.deepEqual(calls, [10, 10, 5]);
      assert.deepEqual(entries.map((e) => e.key), keys);
      assert.deepEqual(
        entries.map((e) => e.value),
        keys.map((_, i) => i % 2 === 0 ? i : null),
      );
      assert.ok(calls.every((n) => n <= KV_GET_MANY_MAX));
    });
  } finally {
    kv.close();
  }
});

Deno.test("backoffMs: attempt 1 waits nothing; later attempts jitter below a capped exponential", () => {
  assert.equal(backoffMs(1), 0);
  assert.equal(backoffMs(1, { baseMs: 1_000 }), 0);
  for (let i = 0; i < 200; i++) {
    const a2 = backoffMs(2, { baseMs: 100, capMs: 10_000 });
    assert.ok(a2 >= 0 && a2 < 200, `attempt 2: ${a2}`);
    const a10 = backoffMs(10, { baseMs: 100, capMs: 1_000 });
    assert.ok(a10 >= 0 && a10 < 1_000, `attempt 10 capped: ${a10}`);
    const d = backoffMs(30);
    assert.ok(d >= 0 && d < 25, `default cap: ${d}`);
  }
});

Deno.test("retry: until it resolves, at most `attempts` tries, shouldRetry false rethrows at once", async (t) => {
  await t.step("resolves on the third try", async () => {
    const seen: number[] = [];
    const out = await retry((n) => {
      seen.push(n);
      return n < 3 ? Promise.reject(new Error(`fail ${n}`)) : Promise.resolve("ok");
    }, { attempts: 5, capMs: 1 });
    assert.equal(out, "ok");
    assert.deepEqual(seen, [1, 2, 3]);
  });
  await t.step("attempts run out: the last error", async () => {
    let tries = 0;
    await assert.rejects(
      retry(() => Promise.reject(new Error(`fail ${++tries}`)), { attempts: 3, capMs: 1 }),
      /fail 3/,
    );
    assert.equal(tries, 3);
  });
  await t.step("shouldRetry false: no second try", async () => {
    let tries = 0;
    await assert.rejects(
      retry(() => {
        tries++;
        return Promise.reject(new TypeError("permanent"));
      }, { attempts: 5, capMs: 1, shouldRetry: (err) => !(err instanceof TypeError) }),
      TypeError,
    );
    assert.equal(tries, 1);
  });
});

Deno.test("BoundedMap: a full map evicts the least recently used entry only", async (t) => {
  await t.step("set beyond max evicts one, oldest first", () => {
    const m = new BoundedMap<string, number>(3);
    m.set("a", 1).set("b", 2).set("c", 3).set("d", 4);
    assert.equal(m.size, 3);
    assert.deepEqual([...m.keys()], ["b", "c", "d"]);
  });
  await t.step("get refreshes recency; has does not", () => {
    const m = new BoundedMap<string, number>(3);
    m.set("a", 1).set("b", 2).set("c", 3);
    assert.equal(m.get("a"), 1);
    assert.ok(m.has("b"));
    m.set("d", 4);
    assert.deepEqual([...m], [["c", 3], ["a", 1], ["d", 4]]);
    assert.equal(m.get("b"), undefined);
  });
  await t.step("set of a present key updates it without evicting", () => {
    const m = new BoundedMap<string, number>(2);
    m.set("a", 1).set("b", 2).set("a", 10);
    assert.deepEqual([...m.entries()], [["b", 2], ["a", 10]]);
    m.set("c", 3);
    assert.deepEqual([...m.values()], [10, 3]);
  });
  await t.step("undefined values, delete, clear", () => {
    const m = new BoundedMap<string, number | undefined>(2);
    m.set("u", undefined);
    assert.ok(m.has("u"));
    assert.equal(m.delete("u"), true);
    assert.equal(m.delete("u"), false);
    m.set("a", 1);
    m.clear();
    assert.equal(m.size, 0);
  });
  await t.step("max must be a positive integer", () => {
    assert.throws(() => new BoundedMap(0), RangeError);
    assert.throws(() => new BoundedMap(1.5), RangeError);
  });
});

Deno.test("sha256Hex and sha256Base64url: text as UTF-8, bytes as they are", async () => {
  const abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
  assert.equal(await sha256Hex("abc"), abc);
  assert.equal(await sha256Hex(new TextEncoder().encode("abc")), abc);
  // Unpadded base64url: "+" and "/" of the standard alphabet become "-" and "_", no "=".
  assert.equal(await sha256Base64url("abc"), "ungWv48Bz-pBQUDeXa4iI7ADYaOWF3qctBD_YfIAFa0");
});
