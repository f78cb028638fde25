/**
 * `deno task recipes`: writes the README's per-tool set-up (between its recipes markers) from
 * lib/recipes/ — the same recipes the dashboard's "Use it" tabs show — with placeholder values,
 * wrapped as `deno fmt` wraps the README (code blocks are left as the module writes them).
 * `--check` changes nothing and exits 1 when the README is stale.
 */
import { parseFlags, UsageError } from "../lib/core/cli.ts";
import { recipesMarkdown, withRecipes } from "../lib/recipes/markdown.ts";
import { PLACEHOLDERS, recipes } from "../lib/recipes/recipes.ts";

const HELP = "Usage: deno task recipes [--check]\n\nRewrites README.md's set-up snippets from " +
  "lib/recipes/recipes.ts; --check only says whether they are current (exit 1 when not).";

export const README = new URL("../README.md", import.meta.url);

/** Markdown as `deno fmt` formats it under this repository's settings. */
export async function formatMarkdown(text: string): Promise<string> {
  const child = new Deno.Command(Deno.execPath(), {
    args: ["fmt", "--ext", "md", "-"],
    cwd: new URL("..", import.meta.url),
    stdin: "piped",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const writer = child.stdin.getWriter();
  await writer.write(new TextEncoder().encode(text));
  await writer.close();
  const out = await child.output();
  if (!out.success) throw new Error(`deno fmt: ${new TextDecoder().decode(out.stderr)}`);
  return new TextDecoder().decode(out.stdout);
}

/** The README's recipes block: the module's recipes with placeholders, formatted. */
export async function readmeBlock(): Promise<string> {
  return await formatMarkdown(recipesMarkdown(recipes(PLACEHOLDERS)));
}

if (import.meta.main) {
  try {
    const flags = parseFlags(Deno.args, { check: "boolean", help: "boolean" });
    if (flags.help) {
      console.log(HELP);
      Deno.exit(0);
    }
    const readme = await Deno.readTextFile(README);
    const next = withRecipes(readme, await readmeBlock());
    if (next === readme) {
      console.log("README.md: the set-up snippets are current.");
    } else if (flags.check) {
      console.error("README.md: the set-up snippets are stale; run deno task recipes.");
      Deno.exit(1);
    } else {
      await Deno.writeTextFile(README, next);
      console.log("README.md: the set-up snippets were rewritten from lib/recipes/recipes.ts.");
    }
  } catch (err) {
    console.error(err instanceof UsageError ? `${err.message}\n\n${HELP}` : String(err));
    Deno.exit(2);
  }
}
