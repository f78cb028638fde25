/**
 * Scale check for reports (not part of the test suite: it takes a minute):
 * seeds USERS users × DAYS days of usage counters into a temp KV file, then times the report
 * on live counters, the summarize job, and the report on summaries.
 *
 *   deno run -A tasks/scale_report.ts [--users 10000] [--days 30] [--keep]
 */
import { z } from "zod";
import { flagIssue, parseFlags, UsageError, wholeNumber } from "../lib/core/cli.ts";
import { keys } from "../lib/core/kv.ts";
import { DEFAULT_PRICING } from "../lib/usage/pricing.ts";
import { buildReport, reportCsv, reportTable } from "../lib/reports/report.ts";
import { summarizeCosts } from "../lib/reports/summary.ts";
import { addDays, utcDay } from "../lib/core/utc.ts";

const flagsSchema = z.object({
  users: wholeNumber("--users", 1, 1_000_000).default(10_000),
  days: wholeNumber("--days", 1, 366).default(30),
});
let flags;
try {
  const raw = parseFlags(Deno.args, { users: "string", days: "string", keep: "boolean" });
  const parsed = flagsSchema.safeParse(raw);
  if (!parsed.success) throw new UsageError(flagIssue(parsed.error.issues[0]));
  flags = { ...parsed.data, keep: raw.keep === true };
} catch (err) {
  if (!(err instanceof UsageError)) throw err;
  console.error(`scale_report: ${err.message}`);
  console.error("usage: deno run -A tasks/scale_report.ts [--users 10000] [--days 30] [--keep]");
  Deno.exit(2);
}
const USERS = flags.users;
const DAYS = flags.days;
const MODELS = ["glm-4.6", "glm-4.5-air", "glm-4-flash"];
const now = Date.now();
const to = utcDay(now);
const from = addDays(to, -(DAYS - 1));

const dir = await Deno.makeTempDir({ prefix: "keyway_scale_" });
const kv = await Deno.openKv(`${dir}/kv.sqlite3`);
const seconds = (ms: number) => `${(ms / 1000).toFixed(2)} s`;
const timed = async <T>(what: string, fn: () => Promise<T>): Promise<T> => {
  const t0 = performance.now();
  const result = await fn();
  console.log(`${what.padEnd(44)} ${seconds(performance.now() - t0)}`);
  return result;
};

try {
  const userId = (i: number) => `user_${i.toString(36).padStart(4, "0")}${"k".repeat(24)}`;
  await timed(`seed ${USERS} user records`, async () => {
    for (let i = 0; i < USERS; i += 500) {
      const op = kv.atomic();
      for (let j = i; j < Math.min(USERS, i + 500); j++) {
        op.set(keys.user(userId(j)), {
          id: userId(j),
          email: `person${j}@example.com`,
          status: "active",
          limits: {},
        });
      }
      await op.commit();
    }
  });
  let counters = 0;
  await timed(`seed counters (${USERS} users × ${DAYS} days, 1–2 models)`, async () => {
    for (let d = 0; d < DAYS; d++) {
      const day = addDays(from, d);
      let op = kv.atomic();
      let mutations = 0;
      let writes = 0;
      for (let u = 0; u < USERS; u++) {
        const models = (u + d) % 4 === 0 ? MODELS.slice(0, 2) : [MODELS[(u + d) % 3]];
        for (const model of models) {
          const requests = 1 + ((u * 7 + d) % 20);
          const values = {
            requests,
            prompt: requests * (500 + (u % 900)),
            completion: requests * (100 + (d % 300)),
          };
          for (const field of ["requests", "prompt", "completion"] as const) {
            op.sum(keys.usageDaily(day, userId(u), model, field, "default"), BigInt(values[field]));
          }
          mutations += 3;
          writes++;
          if (mutations >= 999) {
            await op.commit();
            op = kv.atomic();
            mutations = 0;
          }
        }
      }
      op.sum(keys.usageDayVersion(day), BigInt(writes));
      await op.commit();
      counters += writes * 3;
      await Deno.stderr.write(new TextEncoder().encode(`\rseeded ${day} (${d + 1}/${DAYS})`));
    }
    await Deno.stderr.write(new TextEncoder().encode("\r\x1b[K"));
  });
  console.log(`  ${counters.toLocaleString("en-US")} day-major counters`);

  const query = { from, to, now };
  const live = await timed(
    "report, live counters only (job never ran)",
    () => buildReport(kv, DEFAULT_PRICING, query),
  );
  await timed("  render table", () => Promise.resolve(reportTable(live)));
  const summary = await timed(
    "summarize job (first run, all days)",
    () => summarizeCosts(kv, { pricing: DEFAULT_PRICING, limits: { budgetUsdMonthly: 0 } }),
  );
  console.log(
    `  ${summary.days.length} days, ${
      summary.days.reduce((s, d) => s + d.chunks, 0)
    } chunks, up to ${Math.max(...summary.days.map((d) => d.users))} users a day`,
  );
  await timed(
    "summarize job (second run, nothing to do)",
    () => summarizeCosts(kv, { pricing: DEFAULT_PRICING, limits: { budgetUsdMonthly: 0 } }),
  );
  const fast = await timed(
    "report, from summaries (today live)",
    () => buildReport(kv, DEFAULT_PRICING, query),
  );
  console.log(`  sources: ${JSON.stringify(fast.sources)}, users: ${fast.users.length}`);
  const csv = await timed(
    "report --format csv (per user and day)",
    async () => reportCsv(await buildReport(kv, DEFAULT_PRICING, { ...query, perDay: true })),
  );
  console.log(`  ${csv.split("\r\n").length - 2} CSV rows`);
  await timed(
    "report --user (one user, 30 days)",
    () => buildReport(kv, DEFAULT_PRICING, { ...query, userId: userId(42) }),
  );
  if (JSON.stringify(live.totals) !== JSON.stringify(fast.totals)) {
    throw new Error(
      `totals differ: ${JSON.stringify(live.totals)} vs ${JSON.stringify(fast.totals)}`,
    );
  }
  console.log(`totals agree: ${JSON.stringify(fast.totals)}`);
} finally {
  kv.close();
  if (!flags.keep) await Deno.remove(dir, { recursive: true });
  else console.log(`kept ${dir}/kv.sqlite3`);
}
