/**
 * Installs the coding tools the clients suite drives (testing/clients/install.ts), once per pinned
 * version, and prints one line naming the tools that are not there and why. Exit 1 then only in
 * CI (`CI=true`), where the suite must run every tool.
 */
import { install, installed, NOT_INSTALLABLE, TOOLS } from "../testing/clients/install.ts";

/** Why npm cannot reach its registry, or null when it can (a look of at most 5 s). */
async function registryProblem(): Promise<string | null> {
  let registry = "https://registry.npmjs.org/";
  try {
    const out = await new Deno.Command("npm", { args: ["config", "get", "registry"] }).output();
    registry = new TextDecoder().decode(out.stdout).trim() || registry;
  } catch {
    return "npm is not installed";
  }
  try {
    const res = await fetch(registry, { signal: AbortSignal.timeout(5_000) });
    await res.body?.cancel();
    return null;
  } catch (err) {
    return `the npm registry (${registry}) is unreachable: ${
      err instanceof Error ? err.message.split("\n")[0] : err
    }`;
  }
}

/** Tool labels by the reason they are not there, so one reason is said once. */
const skipped = new Map<string, string[]>();
const skip = (label: string, reason: string) =>
  skipped.set(reason, [...(skipped.get(reason) ?? []), label]);
const missing = [];
for (const tool of TOOLS) if (!(await installed(tool))) missing.push(tool);
const offline = missing.length > 0 ? await registryProblem() : null;
for (const tool of missing) {
  const reason = offline ?? await install(tool);
  if (reason) skip(tool.label, reason);
}
const failed = skipped.size > 0;
for (const [name, why] of Object.entries(NOT_INSTALLABLE)) skip(name, why);
// One line: the tests of a tool that is not installed are ignored.
console.log(
  `clients: skipped ${
    [...skipped].map(([reason, labels]) => `${labels.join(", ")}: ${reason}`).join("; ")
  }`,
);
if (failed && /^(1|true)$/i.test(Deno.env.get("CI") ?? "")) Deno.exit(1);
