/**
 * `deno task build`: builds the island bundles ahead of time, for hosts where the server may not
 * spawn processes or write files (Deno Deploy: CONTRACT §1, §8).
 */
import { buildIslands } from "../build/islands.ts";

if (import.meta.main) {
  const encoder = new TextEncoder();
  Deno.stderr.writeSync(encoder.encode("build: island bundles…\n"));
  try {
    const result = await buildIslands({ force: Deno.args.includes("--force") });
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
