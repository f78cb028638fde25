import assert from "node:assert/strict";
import { keys } from "../../lib/core/kv.ts";
import {
  buildReport,
  parseReportFlags,
  reportCsv,
  reportJson,
  reportTable,
} from "../../lib/reports/report.ts";
import { UsageError } from "../../lib/core/cli.ts";
import { summarizeCosts } from "../../lib/reports/summary.ts";
import { recordUsage } from "../../lib/usage/usage.ts";
import {
  ALICE_EMAIL,
  EXPECTED_0308_0310,
  NOW,
  PRICING,
  PRICING_WITH_FALLBACK,
  seedUsage,
  tempKvPath,
} from "../support/cost_fixtures.ts";
import { runReport as runReportTask } from "../support/helpers.ts";

const config = { pricing: PRICING, limits: { budgetUsdMonthly: 0 } };

async function withKv(fn: (kv: Deno.Kv) => Promise<void>) {
  const kv = await Deno.openKv(":memory:");
  try {
    await fn(kv);
  } finally {
    kv.close();
  }
}

const range = { from: "2026-03-08", to: "2026-03-10", now: NOW };

Deno.test("report totals match hand-computed values, with and without summaries", async (t) => {
  await withKv(async (kv) => {
    await seedUsage(kv);
    await t.step("live counters only (the job has not run)", async () => {
      const report = await buildReport(kv, PRICING, range);
      assert.deepEqual(reportJson(report), EXPECTED_0308_0310);
      assert.deepEqual(report.sources, { summary: 0, live: 3 });
    });
    await t.step("after the job: closed days from summaries, today live, same answer", async () => {
      await summarizeCosts(kv, config, { now: NOW });
      const report = await buildReport(kv, PRICING, range);
      assert.deepEqual(report.sources, { summary: 2, live: 1 });
      assert.deepEqual(reportJson(report), EXPECTED_0308_0310);
    });
    await t.step("usage added after the job is in the report at once", async () => {
      await recordUsage(kv, PRICING, {
        userId: "user_alice",
        model: "glm-4.6",
        at: Date.parse("2026-03-08T15:00:00Z"),
        promptTokens: 1_000_000,
        completionTokens: 0,
      });
      const report = await buildReport(kv, PRICING, range);
      assert.deepEqual(report.sources, { summary: 1, live: 2 });
      const alice = report.users.find((u) => u.userId === "user_alice");
      assert.equal(alice?.requests, 4);
      assert.equal(alice?.promptTokens, 1_014_000);
      assert.equal(alice?.costUsd, 0.6068);
      assert.equal(report.totals.costUsd, 2.10708);
    });
  });
});

Deno.test("a '*' pricing entry prices models without their own entry", async () => {
  await withKv(async (kv) => {
    await seedUsage(kv);
    const json = reportJson(await buildReport(kv, PRICING_WITH_FALLBACK, range));
    const mystery = json.models.find((m) => m.model === "mystery");
    // 10000 × 1 + 10000 × 2 per million
    assert.deepEqual(mystery, {
      model: "mystery",
      requests: 1,
      promptTokens: 10_000,
      completionTokens: 10_000,
      totalTokens: 20_000,
      costUsd: 0.03,
      priced: true,
    });
    assert.equal(json.users.find((u) => u.userId === "user_alice")?.costUsd, 0.0368);
    assert.equal(json.totals.costUsd, 1.53708);
  });
});

Deno.test("--user, date ranges and empty ranges", async (t) => {
  await withKv(async (kv) => {
    await seedUsage(kv);
    await summarizeCosts(kv, config, { now: NOW });
    await t.step("one user", async () => {
      const json = reportJson(
        await buildReport(kv, PRICING, { ...range, from: "2026-03-01", userId: "user_alice" }),
      );
      assert.deepEqual(json.users, [EXPECTED_0308_0310.users[1]]);
      assert.deepEqual(json.models.map((m) => [m.model, m.requests, m.costUsd]), [
        ["glm-4.6", 2, 0.0068],
        ["mystery", 1, 0],
      ]);
      assert.deepEqual(json.totals, {
        requests: 3,
        promptTokens: 14_000,
        completionTokens: 12_000,
        totalTokens: 26_000,
        costUsd: 0.0068,
      });
    });
    await t.step("a user with no usage", async () => {
      const json = reportJson(await buildReport(kv, PRICING, { ...range, userId: "user_nobody" }));
      assert.deepEqual(json.users, []);
      assert.equal(json.totals.requests, 0);
    });
    await t.step("a single day, inclusive at both ends", async () => {
      const json = reportJson(
        await buildReport(kv, PRICING, { from: "2026-03-07", to: "2026-03-07", now: NOW }),
      );
      assert.deepEqual(json.users, [{
        userId: "user_carol",
        email: null,
        requests: 1,
        promptTokens: 500,
        completionTokens: 0,
        totalTokens: 500,
        costUsd: 0.0003,
      }]);
    });
    await t.step("the whole seeded span", async () => {
      const json = reportJson(
        await buildReport(kv, PRICING, { from: "2026-03-01", to: "2026-03-31", now: NOW }),
      );
      assert.equal(json.totals.requests, 6);
      assert.equal(json.totals.costUsd, 1.50738);
    });
    await t.step("an empty range", async () => {
      const report = await buildReport(kv, PRICING, {
        from: "2025-01-01",
        to: "2025-01-31",
        now: NOW,
      });
      assert.deepEqual(reportJson(report), {
        from: "2025-01-01",
        to: "2025-01-31",
        users: [],
        models: [],
        totals: { requests: 0, promptTokens: 0, completionTokens: 0, totalTokens: 0, costUsd: 0 },
      });
      assert.equal(
        reportCsv(report),
        "date,userId,email,requests,promptTokens,completionTokens," +
          "totalTokens,costUsd\r\n",
      );
      assert.match(reportTable(report), /No usage from 2025-01-01 to 2025-01-31\./);
    });
  });
});

Deno.test("CSV: one row per user and day, quoted where needed", async () => {
  await withKv(async (kv) => {
    await seedUsage(kv);
    const report = await buildReport(kv, PRICING, { ...range, perDay: true });
    const quoted = `"${ALICE_EMAIL.replaceAll('"', '""')}"`;
    assert.equal(
      reportCsv(report),
      [
        "date,userId,email,requests,promptTokens,completionTokens,totalTokens,costUsd",
        `2026-03-08,user_alice,${quoted},2,4000,2000,6000,0.0068`,
        "2026-03-08,user_bob,bob@example.com,1,2000000,1000000,3000000,1.5",
        `2026-03-09,user_alice,${quoted},1,10000,10000,20000,0`,
        "2026-03-10,user_bob,bob@example.com,1,100,100,200,0.00028",
        "",
      ].join("\r\n"),
    );
  });
});

Deno.test("table: aligned columns, totals, thousands separators, unpriced marked", async () => {
  await withKv(async (kv) => {
    await seedUsage(kv);
    const text = reportTable(await buildReport(kv, PRICING, range));
    const [title, , ...rest] = text.trimEnd().split("\n");
    assert.equal(title, "Keyway usage 2026-03-08 → 2026-03-10 (3 UTC days)");
    const blank = rest.indexOf("");
    const users = rest.slice(0, blank);
    const models = rest.slice(blank + 1, rest.indexOf("", blank + 1));
    for (const table of [users, models]) {
      assert.ok(table.length >= 6, table.join("\n"));
      const widths = new Set(table.map((line) => [...line].length));
      assert.equal(widths.size, 1, `rows of one width:\n${table.join("\n")}`);
      assert.match(table.at(-1)!, /^Total/);
    }
    assert.match(
      users[0],
      /^User\s+E-mail\s+Requests\s+Prompt\s+Completion\s+Total tokens\s+Cost$/,
    );
    assert.match(
      users[2],
      /^user_bob\s+bob@example\.com\s+2\s+2,000,100\s+1,000,100\s+3,000,200\s+\$1\.50$/,
    );
    assert.match(
      users.at(-1)!,
      /^Total\s+2 users\s+5\s+2,014,100\s+1,012,100\s+3,026,200\s+\$1\.51$/,
    );
    // Numbers are right-aligned: every cost ends in the last column.
    assert.ok(
      users.filter((l) => !l.startsWith("─")).slice(1).every((l) =>
        /(<\$0\.01|\$[\d,]+\.\d\d)$/.test(l)
      ),
    );
    assert.ok(models.some((l) => /^mystery \*\s/.test(l)));
    assert.match(text, /\* unpriced: not in the pricing table and no "\*" entry, counted as \$0\./);
  });
});

Deno.test("flags are validated with messages naming the flag", async (t) => {
  await t.step("defaults: the last 30 UTC days including today", () => {
    assert.deepEqual(parseReportFlags([], NOW), {
      from: "2026-02-09",
      to: "2026-03-10",
      userId: undefined,
      format: "table",
      help: false,
    });
    assert.deepEqual(
      parseReportFlags(["--from=2026-02-28", "--to", "2026-03-01", "--user", "u1", "--format=csv"]),
      { from: "2026-02-28", to: "2026-03-01", userId: "u1", format: "csv", help: false },
    );
  });
  for (
    const [args, flag] of [
      [["--from", "nope"], "--from"],
      [["--to", "2026-02-30"], "--to"],
      [["--from", "2026-03-02", "--to", "2026-03-01"], "--from"],
      [["--format", "xml"], "--format"],
      [["--frmo", "2026-01-01"], "--frmo"],
      [["--user"], "--user"],
      [["--to"], "--to"],
      [["--user", "--format", "csv"], "--user needs a value"],
      [["--from", "2026-03-01", "--from=2026-03-02"], "--from given twice"],
      [["--help=yes"], "--help takes no value"],
      [["march"], 'unexpected argument "march"'],
      [["-f", "csv"], "unknown flag -f"],
    ] as [string[], string][]
  ) {
    await t.step(args.join(" "), () => {
      assert.throws(
        () => parseReportFlags(args, NOW),
        (err) => err instanceof UsageError && err.message.includes(flag),
      );
    });
  }
});

const runReport = (args: string[], kvPath: string) =>
  runReportTask(args, kvPath, { PRICING: JSON.stringify(PRICING) });

Deno.test("deno task report as a subprocess", async (t) => {
  const { path, cleanup } = await tempKvPath();
  try {
    const kv = await Deno.openKv(path);
    await seedUsage(kv);
    kv.close();
    await t.step("bad flags: non-zero exit, stderr names the flag", async () => {
      const cases: [string[], string][] = [
        [["--from", "nope"], "--from"],
        [["--to", "2026-02-30"], "--to"],
        [["--from", "2026-03-02", "--to", "2026-03-01"], "--from"],
        [["--format", "xml"], "--format"],
        [["--nope"], "--nope"],
      ];
      const results = await Promise.all(cases.map(([args]) => runReport(args, path)));
      results.forEach((r, i) => {
        assert.notEqual(r.code, 0, cases[i][0].join(" "));
        assert.ok(r.stderr.includes(cases[i][1]), r.stderr);
        assert.equal(r.stdout, "");
      });
    });
    await t.step("--format json prints the contract document", async () => {
      const r = await runReport(
        ["--from", "2026-03-08", "--to", "2026-03-09", "--format", "json"],
        path,
      );
      assert.equal(r.code, 0, r.stderr);
      const json = JSON.parse(r.stdout);
      assert.equal(json.from, "2026-03-08");
      assert.deepEqual(json.totals, {
        requests: 4,
        promptTokens: 2_014_000,
        completionTokens: 1_012_000,
        totalTokens: 3_026_000,
        costUsd: 1.5068,
      });
      assert.deepEqual(Object.keys(json).sort(), ["from", "models", "to", "totals", "users"]);
    });
    await t.step("--help", async () => {
      const r = await runReport(["--help"], path);
      assert.equal(r.code, 0);
      assert.match(r.stdout, /--format/);
    });
    await t.step(
      "a DENO_KV_PATH with no KV file: exit 1, said, and no empty KV created",
      async () => {
        const missing = `${path}.missing/kv.sqlite3`;
        const r = await runReport([], missing);
        assert.equal(r.code, 1, r.stderr);
        assert.match(r.stderr, /no KV file at .*kv\.sqlite3 \(DENO_KV_PATH\)/);
        assert.equal(r.stdout, "");
        await assert.rejects(Deno.stat(missing), Deno.errors.NotFound);
      },
    );
  } finally {
    await cleanup();
  }
});

Deno.test("today's usage is always read live", async () => {
  await withKv(async (kv) => {
    await seedUsage(kv);
    await summarizeCosts(kv, config, { now: NOW });
    // Even a current summary of today is not used: the day is still open.
    const version = (await kv.get(keys.usageDayVersion("2026-03-10"))).value;
    assert.ok(version);
    const report = await buildReport(kv, PRICING, {
      from: "2026-03-10",
      to: "2026-03-10",
      now: NOW,
    });
    assert.deepEqual(report.sources, { summary: 0, live: 1 });
    assert.equal(report.totals.requests, 1);
  });
});

Deno.test("cached prompt tokens are priced as cached: live counters, summaries and reports agree", async () => {
  await withKv(async (kv) => {
    const pricing = { "glm-5.1": { input: 1.4, cachedInput: 0.26, output: 4.4 } };
    await recordUsage(kv, pricing, {
      userId: "user_cache",
      model: "glm-5.1",
      promptTokens: 1_000_000,
      completionTokens: 1_000_000,
      cachedTokens: 600_000,
      at: Date.parse("2026-03-05T10:00:00Z"),
    });
    // 400k × $1.40 + 600k × $0.26 + 1M × $4.40 per million.
    const expected = 5.116;
    const range = { from: "2026-03-05", to: "2026-03-05", now: NOW };
    const live = await buildReport(kv, pricing, range);
    assert.deepEqual(live.sources, { summary: 0, live: 1 });
    assert.equal(live.totals.costUsd, expected);
    await summarizeCosts(kv, { pricing, limits: { budgetUsdMonthly: 0 } }, { now: NOW });
    const summarized = await buildReport(kv, pricing, range);
    assert.deepEqual(summarized.sources, { summary: 1, live: 0 });
    assert.equal(summarized.totals.costUsd, expected);
    assert.equal(summarized.models[0].costUsd, expected);
  });
});
