import assert from "node:assert/strict";
import type { Config } from "../../lib/core/config.ts";
import { keys } from "../../lib/core/kv.ts";
import type { Logger } from "../../lib/core/log.ts";
import { buildReport, reportJson } from "../../lib/reports/report.ts";
import {
  CHUNK_MAX_USERS,
  chunkRows,
  costSummaryJob,
  readDaySummary,
  summarizeCosts,
  type SummaryChunk,
  type SummaryMeta,
} from "../../lib/reports/summary.ts";
import { recordUsage } from "../../lib/usage/usage.ts";
import {
  dumpKv,
  EXPECTED_0308_0310,
  NOW,
  PRICING,
  seedUsage,
  seedUsers,
  tempKvPath,
} from "../support/cost_fixtures.ts";

/** Keeps log lines as the JSON the real logger writes (level, msg, fields). */
function captureLogger(): { log: Logger; lines: string[] } {
  const lines: string[] = [];
  const at = (level: string) => (msg: string, fields?: Record<string, unknown>) =>
    lines.push(JSON.stringify({ level, msg, ...fields }));
  return { log: { info: at("info"), warn: at("warn"), error: at("error") }, lines };
}

type JobConfig = Pick<Config, "pricing" | "limits">;
const config = (budgetUsdMonthly = 0): JobConfig => ({
  pricing: PRICING,
  limits: { rpm: 60, rpd: 1000, tokensPerDay: 0, budgetUsdMonthly },
});
const range = { from: "2026-03-08", to: "2026-03-10", now: NOW };

/** A fresh :memory: KV with the fixture's usage after `prepare`, and its dump. */
async function reference(prepare: (kv: Deno.Kv) => Promise<unknown>): Promise<string[]> {
  const kv = await Deno.openKv(":memory:");
  try {
    await seedUsage(kv);
    await prepare(kv);
    return await dumpKv(kv);
  } finally {
    kv.close();
  }
}

const onceRun = () => reference((kv) => summarizeCosts(kv, config(), { now: NOW }));

Deno.test("summaries: written per day, second run changes nothing", async (t) => {
  const kv = await Deno.openKv(":memory:");
  try {
    await seedUsage(kv);
    const first = await summarizeCosts(kv, config(), { now: NOW });
    await t.step("every day with usage is summarized, today included", () => {
      assert.deepEqual(first.days.map((d) => [d.day, d.version, d.users, d.requests, d.written]), [
        ["2026-03-07", 1, 1, 1, true],
        ["2026-03-08", 3, 2, 3, true],
        ["2026-03-09", 1, 1, 1, true],
        ["2026-03-10", 1, 1, 1, true],
      ]);
      assert.equal(first.upToDate, 0);
    });
    await t.step("meta and chunk hold the day's rows and cost", async () => {
      const meta = (await kv.get<SummaryMeta>(keys.costSummaryMeta("2026-03-08"))).value;
      assert.deepEqual(meta, {
        day: "2026-03-08",
        version: 3,
        chunks: 1,
        users: 2,
        rows: 2,
        requests: 3,
        promptTokens: 2_004_000,
        completionTokens: 1_002_000,
        costUsd: 1.5068,
        summarizedAt: "2026-03-10T12:00:00.000Z",
      });
      const chunk = (await kv.get<SummaryChunk>(keys.costSummary("2026-03-08", 3, 0))).value;
      assert.deepEqual(chunk?.rows, [
        ["user_alice", "glm-4.6", 2, 4000, 2000, 0.0068],
        ["user_bob", "glm-4.5-air", 1, 2_000_000, 1_000_000, 1.5],
      ]);
    });
    await t.step("a second run finds everything current and writes nothing", async () => {
      const before = await dumpKv(kv);
      const second = await summarizeCosts(kv, config(), { now: NOW + 3_600_000 });
      assert.deepEqual(second.days, []);
      assert.equal(second.upToDate, 4);
      assert.deepEqual(await dumpKv(kv), before);
      assert.deepEqual(before, await onceRun());
    });
  } finally {
    kv.close();
  }
});

Deno.test("summaries: concurrent runs give the same KV contents and report", async (t) => {
  const expected = await onceRun();
  await t.step("Promise.all of two runs on one handle", async () => {
    const dump = await reference((kv) =>
      Promise.all([
        summarizeCosts(kv, config(), { now: NOW }),
        summarizeCosts(kv, config(), { now: NOW }),
      ])
    );
    assert.deepEqual(dump, expected);
  });
  await t.step("two KV handles on one file (two processes' view)", async () => {
    const { path, cleanup } = await tempKvPath();
    const a = await Deno.openKv(path);
    const b = await Deno.openKv(path);
    try {
      await seedUsage(a);
      const [ra, rb] = await Promise.all([
        summarizeCosts(a, config(), { now: NOW }),
        summarizeCosts(b, config(), { now: NOW }),
      ]);
      // Every day got summarized by at least one of them.
      const days = new Set([...ra.days, ...rb.days].map((d) => d.day));
      assert.equal(days.size, 4);
      assert.deepEqual(await dumpKv(a), expected);
      assert.deepEqual(reportJson(await buildReport(b, PRICING, range)), EXPECTED_0308_0310);
    } finally {
      a.close();
      b.close();
      await cleanup();
    }
  });
});

Deno.test("summaries: usage added to a summarized day gets summarized again", async () => {
  const kv = await Deno.openKv(":memory:");
  try {
    await seedUsage(kv);
    await summarizeCosts(kv, config(), { now: NOW });
    await recordUsage(kv, PRICING, {
      userId: "user_bob",
      model: "glm-4.6",
      at: Date.parse("2026-03-09T10:00:00Z"),
      promptTokens: 1000,
      completionTokens: 1000,
    });
    // The old summary no longer matches the day's version: not trusted, the report reads live.
    const meta = (await kv.get<SummaryMeta>(keys.costSummaryMeta("2026-03-09"))).value;
    assert.equal(meta?.version, 1);
    assert.equal(await readDaySummary(kv, "2026-03-09", 2), null);
    const live = reportJson(await buildReport(kv, PRICING, range));
    assert.equal(live.totals.requests, 6);

    const again = await summarizeCosts(kv, config(), { now: NOW });
    assert.deepEqual(again.days.map((d) => [d.day, d.version, d.users]), [["2026-03-09", 2, 2]]);
    assert.equal(again.upToDate, 3);
    const summarized = await buildReport(kv, PRICING, range);
    assert.deepEqual(summarized.sources, { summary: 2, live: 1 });
    assert.deepEqual(reportJson(summarized), live);
    // The chunks of version 1 were cleaned up; only version 2's remain.
    const chunkKeys = [];
    for await (const e of kv.list({ prefix: keys.costSummaryDay("2026-03-09") })) {
      chunkKeys.push(e.key);
    }
    assert.deepEqual(chunkKeys, [["cost_summaries", "2026-03-09", 2, 0]]);
  } finally {
    kv.close();
  }
});

Deno.test("summaries: many users are split into chunks under the KV value limit", async () => {
  const kv = await Deno.openKv(":memory:");
  try {
    const day = "2026-03-05";
    const users = 700;
    for (let i = 0; i < users; i += 100) {
      await Promise.all(Array.from({ length: 100 }, (_, j) =>
        recordUsage(kv, PRICING, {
          userId: `user_${String(i + j).padStart(4, "0")}_${"x".repeat(24)}`,
          model: (i + j) % 3 ? "glm-4.6" : "mystery-model",
          at: Date.parse(`${day}T08:00:00Z`),
          promptTokens: 1000 + i + j,
          completionTokens: 10,
        })));
    }
    const result = await summarizeCosts(kv, config(), { now: NOW });
    assert.equal(result.days[0].chunks, 3);
    let seen = 0;
    for await (const e of kv.list<SummaryChunk>({ prefix: keys.costSummaryDay(day) })) {
      const chunkUsers = new Set(e.value.rows.map((r) => r[0])).size;
      assert.ok(chunkUsers <= CHUNK_MAX_USERS);
      assert.ok(JSON.stringify(e.value).length < 64 * 1024);
      seen += chunkUsers;
    }
    assert.equal(seen, users);
    const q = { from: day, to: day, now: NOW };
    const fromSummary = await buildReport(kv, PRICING, q);
    assert.deepEqual(fromSummary.sources, { summary: 1, live: 0 });
    const live = await buildReport(kv, PRICING, { ...q, userId: undefined, now: Date.parse(day) });
    assert.deepEqual(live.sources, { summary: 0, live: 1 });
    assert.deepEqual(reportJson(fromSummary), reportJson(live));
    assert.equal(fromSummary.users.length, users);

    // A summary missing a chunk (cleaned up under a reader's feet) is not trusted.
    await kv.delete(keys.costSummary(day, users, 1));
    const patched = await buildReport(kv, PRICING, q);
    assert.deepEqual(patched.sources, { summary: 0, live: 1 });
    assert.deepEqual(reportJson(patched), reportJson(live));
  } finally {
    kv.close();
  }
});

Deno.test("the cron handler runs the job and logs what it did", async () => {
  const kv = await Deno.openKv(":memory:");
  try {
    await seedUsage(kv);
    const { log, lines } = captureLogger();
    const handler = costSummaryJob({ kv, config: config(), log });
    await handler();
    const line = JSON.parse(lines.find((l) => l.includes('"cost summaries"'))!);
    assert.deepEqual(line.days, ["2026-03-07", "2026-03-08", "2026-03-09", "2026-03-10"]);
    assert.ok(await kv.get(keys.costSummaryMeta("2026-03-10")).then((e) => e.value));
    await handler();
    assert.equal(JSON.parse(lines.at(-1)!).upToDate, 4);
  } finally {
    kv.close();
  }
});

Deno.test("budget alerts: 80 % and 100 % logged once per user and month", async (t) => {
  const { path, cleanup } = await tempKvPath();
  const kv = await Deno.openKv(path);
  const other = await Deno.openKv(path);
  const { log, lines } = captureLogger();
  const alertLines = () => lines.filter((l) => l.includes("budget")).map((l) => JSON.parse(l));
  const spend = (userId: string, usd: number, at = "2026-03-09T10:00:00Z") =>
    // glm-4.6 output at 2.2 USD per million: usd / 2.2 × 1e6 completion tokens
    recordUsage(kv, PRICING, {
      userId,
      model: "glm-4.6",
      at: Date.parse(at),
      promptTokens: 0,
      completionTokens: Math.round((usd / 2.2) * 1e6),
    });
  try {
    await seedUsers(kv);
    const user = (await kv.get<Record<string, unknown>>(keys.user("user_bob"))).value!;
    await kv.set(keys.user("user_bob"), { ...user, limits: { budgetUsdMonthly: 0.5 } });
    const run = (db = kv) => summarizeCosts(db, config(1), { now: NOW, log });

    await t.step("under 80 %: nothing", async () => {
      await spend("user_alice", 0.7);
      assert.deepEqual((await run()).alerts, []);
    });
    await t.step("past 80 %: one alert, in two concurrent processes too", async () => {
      await spend("user_alice", 0.15);
      const [a, b] = await Promise.all([run(kv), run(other)]);
      assert.equal(a.alerts.length + b.alerts.length, 1);
      assert.deepEqual(alertLines().map((l) => [l.msg, l.userId, l.month, l.threshold]), [
        ["budget 80% reached", "user_alice", "2026-03", 80],
      ]);
      assert.equal(alertLines()[0].budgetUsd, 1);
      await spend("user_alice", 0.01);
      assert.deepEqual((await run()).alerts, []);
      assert.equal(alertLines().length, 1);
    });
    await t.step("past 100 %, and a user's own budget override", async () => {
      await spend("user_alice", 0.2);
      await spend("user_bob", 0.6);
      const result = await run();
      assert.deepEqual(result.alerts.map((a) => [a.userId, a.threshold, a.budgetUsd]), [
        ["user_alice", 100, 1],
        ["user_bob", 80, 0.5],
        ["user_bob", 100, 0.5],
      ]);
      assert.equal(alertLines().length, 4);
    });
    await t.step("a new month alerts again", async () => {
      await spend("user_alice", 0.9, "2026-04-01T00:30:00Z");
      const result = await run();
      assert.deepEqual(result.alerts.map((a) => [a.userId, a.month, a.threshold]), [
        ["user_alice", "2026-04", 80],
      ]);
      assert.equal((await run(other)).alerts.length, 0);
      assert.equal(alertLines().length, 5);
    });
  } finally {
    kv.close();
    other.close();
    await cleanup();
  }
});

Deno.test("chunks stay under 64 KiB with very long ids and model names", async () => {
  const kv = await Deno.openKv(":memory:");
  try {
    const rows = Array.from(
      { length: 200 },
      (_, i) =>
        [`user_${i}_${"é".repeat(400)}`, "m".repeat(1500), 1, 2, 3, 0.5] as [
          string,
          string,
          number,
          number,
          number,
          number,
        ],
    );
    const chunks = chunkRows(rows);
    assert.ok(chunks.length > 1);
    assert.equal(chunks.flatMap((c) => c.rows).length, 200);
    // KV itself refuses values over 64 KiB: every chunk must be accepted.
    for (const [i, chunk] of chunks.entries()) await kv.set(["chunk", i], chunk);
  } finally {
    kv.close();
  }
});

Deno.test("deno task summarize in two processes at once: same KV contents", async () => {
  const { path, cleanup } = await tempKvPath();
  try {
    const kv = await Deno.openKv(path);
    await seedUsage(kv);
    kv.close();
    const cwd = await Deno.makeTempDir({ prefix: "keyway_summarize_cwd_" });
    const run = () =>
      new Deno.Command(Deno.execPath(), {
        args: ["run", "-A", new URL("../../tasks/summarize.ts", import.meta.url).pathname],
        cwd,
        env: { DENO_KV_PATH: path, PRICING: JSON.stringify(PRICING), NO_COLOR: "1" },
        stdout: "piped",
        stderr: "piped",
      }).output();
    const outputs = await Promise.all([run(), run()]);
    await Deno.remove(cwd, { recursive: true });
    const text = outputs.map((o) => new TextDecoder().decode(o.stdout));
    for (const [i, o] of outputs.entries()) {
      assert.equal(o.code, 0, new TextDecoder().decode(o.stderr));
      assert.match(text[i], /^Summarized \d UTC days?\b|^Nothing to summarize/m);
    }
    // The processes stamp their own clock; everything else must match a single in-process run.
    const normalize = (lines: string[]) =>
      lines.map((l) => l.replace(/"summarizedAt":"[^"]+"/, '"summarizedAt":"…"'));
    const after = await Deno.openKv(path);
    try {
      assert.deepEqual(normalize(await dumpKv(after)), normalize(await onceRun()));
    } finally {
      after.close();
    }
  } finally {
    await cleanup();
  }
});
