/** The Continue CLI (`cn -p`) against Keyway, configured by the recipe's ~/.continue/config.yaml. */
import { cliTests } from "./support/cli_suite.ts";

await cliTests({
  tool: "continue",
  recipe: "continue",
  args: (prompt) => ["-p", prompt],
  readTool: (path) => ({ tool: "Read", input: { filepath: path } }),
  runMs: 60_000,
  // Continue retries a 503 silently, whatever its Retry-After says, for minutes.
  busy: "retries",
  busyMs: 60_000,
});
