/** `deno task summarize`: runs the cost-summary job once (the code the cron runs) and says what it did. */
import { parseFlags, UsageError } from "../lib/core/cli.ts";
import { secretsOf } from "../lib/core/config.ts";
import { formatInt, formatUsd } from "../lib/core/format.ts";
import { serverKv } from "./server_kv.ts";
import { createLogger } from "../lib/core/log.ts";
import { summarizeCosts } from "../lib/reports/summary.ts";
import { Events } from "../lib/alerts/deliver.ts";
import { progressLine } from "./progress.ts";

const HELP = "Usage: deno task summarize\n\nWrites daily cost summaries for every day whose " +
  "usage changed since it was last summarized, and logs budget alerts.";

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
    if (!result.days.length) {
      console.log(`Nothing to do: ${result.upToDate} day(s) already summarized.`);
    } else {
      for (const d of result.days) {
        console.log(
          `${d.day}  version ${d.version}  ${formatInt(d.users)} users  ` +
            `${formatInt(d.requests)} requests  ` +
            `${formatInt(d.totalTokens)} tokens  ${formatUsd(d.costUsd)}  ` +
            `${d.chunks} chunk(s)${d.written ? "" : "  (another run wrote it first)"}`,
        );
      }
      const users = Math.max(0, ...result.days.map((d) => d.users));
      console.log(
        `Summarized ${result.days.length} day(s) (up to ${formatInt(users)} users a day, ` +
          `${formatInt(result.days.reduce((s, d) => s + d.requests, 0))} requests, ` +
          `${
            formatUsd(result.days.reduce((s, d) => s + d.costUsd, 0))
          }); ${result.upToDate} already ` +
          `current; ${result.alerts.length} budget alert(s); ${Math.round(result.ms)} ms.`,
      );
    }
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
