/** opencode (`opencode run`) against Keyway, configured by the recipe's opencode.json. */
import { cliTests } from "./support/cli_suite.ts";

await cliTests({
  tool: "opencode",
  recipe: "opencode",
  args: (prompt) => ["run", prompt],
  readTool: (path) => ({ tool: "read", input: { filePath: path } }),
  runMs: 90_000,
  busy: "keyway",
  busyMs: 120_000,
});
