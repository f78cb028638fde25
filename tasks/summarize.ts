/** `deno task summarize`: runs the cost-summary job once (the code the cron runs) and says what it did. */
import { parseFlags, UsageError } from "../lib/core/cli.ts";
import { secretsOf } from "../lib/core/config.ts";
import { formatCount, formatInt, formatUsd } from "../lib/core/format.ts";
import { serverKv } from "./server_kv.ts";
import { createLogger } from "../lib/core/log.ts";
import { summarizeCosts, type SummarizeResult } from "../lib/reports/summary.ts";
import { renderTable } from "../lib/reports/text_table.ts";
import { Events } from "../lib/alerts/deliver.ts";
import { progressLine } from "./progress.ts";

const HELP = "Usage: deno task summarize\n\nWrites daily cost summaries for every day whose " +
  "usage changed since it was last summarized, and logs budget alerts.";

/** What a run did, for people: a line, a table of the days written (like `report`'s), notes. */
export function summarizeText(result: SummarizeResult): string {
  const took = `${formatInt(Math.round(result.ms))} ms`;
  if (!result.days.length) {
    return `Nothing to summarize: ${
      formatCount(result.upToDate, "UTC day")
    } with usage, every summary current (${took}).`;
  }
  const out = [
    `Summarized ${formatCount(result.days.length, "UTC day")}` +
    (result.upToDate ? `; ${formatInt(result.upToDate)} more already current` : "") +
    ` (${took}).`,
    "",
  ];
  const sum = (pick: (d: SummarizeResult["days"][number]) => number) =>
    result.days.reduce((n, d) => n + pick(d), 0);
  const late = result.days.filter((d) => !d.written);
  out.push(
    ...renderTable(
      ["UTC day", "Users", "Requests", "Tokens", "Cost"],
      result.days.map((d) => [
        d.written ? d.day : `${d.day} *`,
        formatInt(d.users),
        formatInt(d.requests),
        formatInt(d.totalTokens),
        formatUsd(d.costUsd),
      ]),
      [
        "Total",
        "",
        formatInt(sum((d) => d.requests)),
        formatInt(sum((d) => d.totalTokens)),
        formatUsd(sum((d) => d.costUsd)),
      ],
      1,
    ),
    "",
  );
  if (late.length) {
    out.push("* Another run wrote this day's summary first; it is the same or newer.");
  }
  out.push(
    result.alerts.length
      ? `${formatCount(result.alerts.length, "budget alert")} queued for the server to send.`
      : "No budget crossed a threshold.",
  );
  return out.join("\n");
}

async function main(args: string[]): Promise<number> {
  let flags;
  try {
    flags = parseFlags(args, { help: "boolean" });
  } catch (err) {
    if (!(err instanceof UsageError)) throw err;
    console.error(`deno task summarize: ${err.message}\n\n${HELP}`);
    return 2;
  }
  if (flags.help) {
    console.log(HELP);
    return 0;
  }
  const opened = await serverKv("summarize");
  if (!opened) return 1;
  const { config, kv } = opened;
  const progress = progressLine();
  try {
    const log = createLogger(secretsOf(config));
    const result = await summarizeCosts(kv, config, {
      log,
      // Not started here: its budget.threshold events wait in KV for a running server to send.
      events: new Events(config, kv, log),
      onProgress: ({ day, index, total }) =>
        progress(`summarizing ${day} (${index + 1}/${total})…`),
    });
    progress.done();
    console.log(summarizeText(result));
    return 0;
  } finally {
    progress.done();
    kv.close();
  }
}

if (import.meta.main) {
  try {
    Deno.exit(await main(Deno.args));
  } catch (err) {
    // Output piped into `head` and closed early is not an error worth a stack trace.
    if (err instanceof Deno.errors.BrokenPipe) Deno.exit(0);
    console.error(`deno task summarize: ${err instanceof Error ? err.message : String(err)}`);
    Deno.exit(1);
  }
}
