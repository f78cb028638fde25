/**
 * The README's per-tool set-up is the recipes module's output with placeholders: the block
 * between its markers is what `deno task recipes` writes, and every code block in it is a
 * snippet exactly as the dashboard builds it (deno fmt may rewrap the prose, never the code).
 */
import assert from "node:assert/strict";
import { recipesIn } from "../../lib/recipes/markdown.ts";
import { PLACEHOLDERS, recipes } from "../../lib/recipes/recipes.ts";
import { README, readmeBlock } from "../../tasks/recipes.ts";

Deno.test("README: the set-up snippets are the recipes module's, current", async () => {
  const block = recipesIn(await Deno.readTextFile(README));
  assert.equal(block, await readmeBlock(), "README.md is stale: run deno task recipes");
  const fenced = [...block.matchAll(/^```[a-z]*\n([\s\S]*?)\n```$/gm)].map((m) => m[1]);
  const files = recipes(PLACEHOLDERS).flatMap((r) => r.files.map((f) => f.content));
  assert.deepEqual(fenced, files);
  for (const r of recipes(PLACEHOLDERS)) assert.ok(block.includes(`#### ${r.label}\n`), r.label);
});

Deno.test("deno task recipes --check: exit 1 and a line naming the fix when stale", async () => {
  const dir = await Deno.makeTempDir({ prefix: "keyway_recipes_" });
  try {
    const root = new URL("../../", import.meta.url).pathname;
    // A copy of the task beside a stale README: the real README is never touched.
    await Deno.mkdir(`${dir}/tasks`);
    await Deno.copyFile(`${root}tasks/recipes.ts`, `${dir}/tasks/recipes.ts`);
    await Deno.symlink(`${root}lib`, `${dir}/lib`);
    await Deno.copyFile(`${root}deno.json`, `${dir}/deno.json`);
    const readme = await Deno.readTextFile(README);
    await Deno.writeTextFile(`${dir}/README.md`, readme.replace("#### opencode", "#### opencod"));
    const run = (...args: string[]) =>
      new Deno.Command(Deno.execPath(), {
        args: ["run", "-A", "--no-lock", `${dir}/tasks/recipes.ts`, ...args],
        cwd: dir,
        stdout: "piped",
        stderr: "piped",
      }).output();
    const stale = await run("--check");
    assert.equal(stale.code, 1);
    assert.match(new TextDecoder().decode(stale.stderr), /stale; run deno task recipes/);
    assert.equal(await Deno.readTextFile(`${dir}/README.md`) !== readme, true, "unchanged");
    const fixed = await run();
    assert.equal(fixed.code, 0);
    assert.equal(await Deno.readTextFile(`${dir}/README.md`), readme);
    assert.equal((await run("--check")).code, 0);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
