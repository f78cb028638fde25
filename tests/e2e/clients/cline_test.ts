/**
 * The Cline CLI against Keyway, configured from the recipe's settings fields the way its user
 * fills them in, with `cline auth` (provider "OpenAI Compatible" is Cline's `openai`).
 */
import assert from "node:assert/strict";
import { cliTests } from "./support/cli_suite.ts";
import { settingsFields } from "./support/recipes.ts";
import { runTool } from "./support/run.ts";

await cliTests({
  tool: "cline",
  recipe: "cline",
  configure: async (recipe, box, bin) => {
    const fields = settingsFields(recipe);
    assert.equal(fields["API Provider"], "OpenAI Compatible");
    const auth = await runTool(
      bin,
      [
        "auth",
        "-p",
        "openai",
        "-b",
        fields["Base URL"],
        "-k",
        fields["API Key"],
        "-m",
        fields["Model ID"],
      ],
      box,
      { timeoutMs: 60_000 },
    );
    assert.equal(auth.code, 0, auth.output);
  },
  args: (prompt) => [prompt],
  readTool: (path) => ({ tool: "read_files", input: { files: [{ path }] } }),
  runMs: 90_000,
  busy: "keyway",
  busyMs: 120_000,
});
