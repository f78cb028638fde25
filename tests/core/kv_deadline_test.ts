/** lib/core/kv_deadline.ts: a KV Connect call that hangs fails, and the breaker behind it. */
import assert from "node:assert/strict";
import { KvUnavailableError, withDeadline } from "../../lib/core/kv_deadline.ts";

/** A KV whose calls hang while `down` is set, and answer once it is cleared. */
function flakyKv() {
  const kv = { down: false, waiting: [] as Array<() => void>, reads: 0, writes: 0 };
  const answer = <T>(value: T) =>
    new Promise<T>((resolve) => {
      if (!kv.down) return resolve(value);
      kv.waiting.push(() => resolve(value));
    });
  const fake = {
    get: (key: Deno.KvKey) => {
      kv.reads++;
      return answer({ key, value: null, versionstamp: null });
    },
    atomic: () => ({
      commit: () => {
        kv.writes++;
        return answer({ ok: true, versionstamp: "1" });
      },
    }),
    close: () => {},
  };
  const up = () => {
    kv.down = false;
    for (const w of kv.waiting.splice(0)) w();
  };
  return { state: kv, up, kv: fake as unknown as Deno.Kv };
}

Deno.test("kv deadline: a hanging call fails; later calls fail at once until KV answers and the abandoned writes finish", async () => {
  const { state, up, kv } = flakyKv();
  const wrapped = withDeadline(kv, { ms: 50, probeKey: ["probe"] });
  try {
    assert.equal((await wrapped.get(["a"])).versionstamp, null, "passes calls through");
    state.down = true;
    const started = performance.now();
    await assert.rejects(wrapped.atomic().commit(), KvUnavailableError);
    assert.ok(performance.now() - started < 1000);
    // Open: nothing reaches the client, every call fails at once.
    const writes = state.writes;
    await assert.rejects(wrapped.atomic().commit(), /KV is unreachable/);
    await assert.rejects(wrapped.get(["a"]), /KV is unreachable/);
    assert.equal(state.writes, writes);
    up(); // the server answers: the probe and the abandoned commit finish
    for (let i = 0; i < 100; i++) {
      try {
        await wrapped.get(["a"]);
        break;
      } catch {
        await new Promise((r) => setTimeout(r, 20));
      }
    }
    assert.equal((await wrapped.atomic().commit()).ok, true, "closed again");
  } finally {
    wrapped.close();
    up();
  }
});
