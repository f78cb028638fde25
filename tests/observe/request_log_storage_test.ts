/**
 * How the request log is stored: each entry once (per user, packed), its key by time holding
 * nothing; the operator's listing reads the entries its keys name, and entries written whole by an
 * earlier version are listed alike.
 */
import assert from "node:assert/strict";
import { addEntry, admittedEntry } from "../../lib/observe/request_log.ts";
import { listRequests } from "../../lib/observe/log_store.ts";
import { keys } from "../../lib/core/kv.ts";

const pricing = { "glm-4.6": { input: 0.6, output: 2.2 } };
const T = Date.UTC(2026, 11, 6, 12);

function entry(id: string, userId: string, now: number, client = "claude-cli/2.1.332") {
  return admittedEntry(
    {
      id,
      endpoint: "/v1/messages",
      requestedModel: "claude-sonnet-4",
      stream: true,
      status: 200,
      code: null,
      durationMs: 1234,
      ttfbMs: 321.04,
      queueMs: 0,
      userAgent: client,
    },
    { userId, keyId: "k_app", model: "glm-4.6", now, pricing },
    { promptTokens: 1000, completionTokens: 50, cachedTokens: 10, estimated: false },
  );
}

Deno.test("request log storage: one copy of each entry, a key-only index by time, earlier whole copies still listed", async () => {
  const kv = await Deno.openKv(":memory:");
  try {
    const op = kv.atomic();
    for (let i = 0; i < 25; i++) {
      addEntry(op, entry(`r${i}`, `user_${i % 3}`, T + i * 1000), 86_400_000);
    }
    assert.ok((await op.commit()).ok);
    // As an earlier version wrote one: the entry whole under both keys.
    const old = entry("r-old", "user_0", T - 60_000).value;
    const at = Date.parse(old.at);
    await kv.atomic()
      .set(keys.requestLog(at, "user_0", "r-old"), old)
      .set(keys.requestLogOfUser("user_0", at, "r-old"), old)
      .commit();

    for await (const e of kv.list({ prefix: keys.requestLogs() })) {
      assert.equal(e.value === null, e.key.at(-1) !== "r-old", `${e.key.join("/")}: key only`);
    }
    const everyone = await listRequests(kv, { limit: 200 });
    assert.equal(everyone.requests.length, 26);
    assert.deepEqual(everyone.requests.slice(0, 3).map((r) => [r.id, r.userId]), [
      ["r24", "user_0"],
      ["r23", "user_2"],
      ["r22", "user_1"],
    ]);
    const r24 = everyone.requests[0];
    assert.deepEqual({ ...r24, costUsd: undefined }, {
      id: "r24",
      at: new Date(T + 24_000 - 1234).toISOString(),
      userId: "user_0",
      keyId: "k_app",
      endpoint: "/v1/messages",
      model: "glm-4.6",
      requestedModel: "claude-sonnet-4",
      stream: true,
      status: 200,
      code: null,
      promptTokens: 1000,
      completionTokens: 50,
      cachedTokens: 10,
      costUsd: undefined,
      estimated: false,
      durationMs: 1234,
      ttfbMs: 321,
      queueMs: 0,
      client: "claude-cli/2.1.332",
      count: 1,
    });
    assert.ok(r24.costUsd > 0);
    assert.deepEqual(everyone.requests.at(-1), { ...old });
    // Paged by time across users: pages of 10 join up to the whole listing, in order.
    const seen: string[] = [];
    let cursor: string | undefined;
    do {
      const page = await listRequests(kv, { limit: 10, cursor });
      seen.push(...page.requests.map((r) => r.id));
      cursor = page.next ?? undefined;
    } while (cursor);
    assert.deepEqual(seen, everyone.requests.map((r) => r.id));
    // One user's listing reads their own entries, the earlier whole one included.
    const own = await listRequests(kv, { userId: "user_0", limit: 200 });
    assert.deepEqual(
      own.requests.map((r) => r.id),
      everyone.requests.filter((r) => r.userId === "user_0").map((r) => r.id),
    );
    assert.equal(own.requests.at(-1)!.id, "r-old");
    // A filter on everyone's listing sees the entries' fields.
    const filtered = await listRequests(kv, { limit: 200, status: 200, keyId: "k_app" });
    assert.equal(filtered.requests.length, 26);
    assert.equal((await listRequests(kv, { limit: 200, model: "glm-4.5" })).requests.length, 0);
  } finally {
    kv.close();
  }
});
