/**
 * `deno task build`: builds the island bundles ahead of time, for hosts where the server may not
 * spawn processes or write files (Deno Deploy: CONTRACT §1, §8).
 */
import { buildIslands } from "../build/islands.ts";
import { parseFlags, UsageError } from "../lib/core/cli.ts";

const HELP = `Usage: deno task build [--force]

Builds the island bundles into static/build.

  --force   build even when the bundles are current
  --help    this text`;

if (import.meta.main) {
  let flags;
  try {
    flags = parseFlags(Deno.args, { force: "boolean", help: "boolean" });
  } catch (err) {
    if (!(err instanceof UsageError)) throw err;
    console.error(`deno task build: ${err.message}\n\n${HELP}`);
    Deno.exit(2);
  }
  if (flags.help) {
    console.log(HELP);
    Deno.exit(0);
  }
  const encoder = new TextEncoder();
  Deno.stderr.writeSync(encoder.encode("build: island bundles…\n"));
  try {
    const result = await buildIslands({ force: flags.force === true });
    const names = Object.keys(result.manifest.islands);
    console.log(
      `build: ${names.length} island bundle${names.length === 1 ? "" : "s"} ${
        result.built ? "built" : "already current"
      } in static/build (${Math.round(result.ms)} ms): ${names.join(", ")}`,
    );
  } catch (err) {
    console.error(`build: ${err instanceof Error ? err.message : String(err)}`);
    Deno.exit(1);
  }
}
