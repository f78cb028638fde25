/** `deno task report`: usage and cost over UTC days as a table, JSON or CSV (CONTRACT §7). */
import { serverKv } from "./server_kv.ts";
import {
  buildReport,
  parseReportFlags,
  REPORT_USAGE,
  reportCsvParts,
  reportJson,
  reportTable,
} from "../lib/reports/report.ts";
import { UsageError } from "../lib/core/cli.ts";
import { progressLine } from "./progress.ts";
import { resolveReportUser } from "../lib/reports/report_user.ts";
import { formatCount, printable } from "../lib/core/format.ts";

async function main(args: string[]): Promise<number> {
  let flags;
  try {
    flags = parseReportFlags(args);
  } catch (err) {
    if (!(err instanceof UsageError)) throw err;
    console.error(`deno task report: ${err.message}\n\n${REPORT_USAGE}`);
    return 2;
  }
  if (flags.help) {
    console.log(REPORT_USAGE);
    return 0;
  }
  const opened = await serverKv("report");
  if (!opened) return 1;
  const { config, kv } = opened;
  const progress = progressLine();
  try {
    const user = flags.userId === undefined ? undefined : await resolveReportUser(kv, flags.userId);
    if (user && "ambiguous" in user) {
      console.error(
        `deno task report: --user ${printable(flags.userId!)} is the e-mail of ${
          formatCount(user.ambiguous.length, "user")
        } (${user.ambiguous.map(printable).join(", ")}); give one user id instead`,
      );
      return 2;
    }
    const report = await buildReport(kv, config.pricing, {
      from: flags.from,
      to: flags.to,
      userId: user?.userId,
      perDay: flags.format === "csv",
      onProgress: ({ day, index, total }) => progress(`reading ${day} (${index + 1}/${total})…`),
    });
    progress.done();
    if (user && !user.known && !report.users.length) {
      console.error(
        `deno task report: --user ${
          printable(flags.userId!)
        } matches no user: no user has that id or e-mail, and no usage from ${flags.from} to ${flags.to} carries that id`,
      );
      return 2;
    }
    if (flags.format === "csv") {
      for (const part of reportCsvParts(report)) await writeAll(part);
    } else {
      await writeAll(
        flags.format === "json"
          ? JSON.stringify(reportJson(report), null, 2) + "\n"
          : reportTable(report),
      );
    }
    return 0;
  } finally {
    progress.done();
    kv.close();
  }
}

async function writeAll(text: string) {
  const bytes = new TextEncoder().encode(text);
  let written = 0;
  while (written < bytes.length) written += await Deno.stdout.write(bytes.subarray(written));
}

if (import.meta.main) {
  try {
    Deno.exit(await main(Deno.args));
  } catch (err) {
    // Output piped into `head` and closed early is not an error worth a stack trace.
    if (err instanceof Deno.errors.BrokenPipe) Deno.exit(0);
    console.error(`deno task report: ${err instanceof Error ? err.message : String(err)}`);
    Deno.exit(1);
  }
}
