/** The Kilo CLI (`kilo run`) against Keyway, configured by the recipe's ~/.config/kilo/kilo.json. */
import { cliTests } from "./support/cli_suite.ts";

await cliTests({
  tool: "kilo",
  recipe: "kilo",
  args: (prompt) => ["run", prompt],
  readTool: (path) => ({ tool: "read", input: { filePath: path } }),
  runMs: 120_000,
  busy: "keyway",
  busyMs: 150_000,
});
