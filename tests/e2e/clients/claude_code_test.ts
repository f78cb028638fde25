/**
 * Claude Code (`claude -p`) against Keyway, configured by the recipe's ~/.claude/settings.json;
 * and long sessions: a 1.5 MB conversation, and one over MAX_REQUEST_BYTES.
 */
import assert from "node:assert/strict";
import { installed, toolById } from "../../../testing/clients/install.ts";
import { cliTests } from "./support/cli_suite.ts";
import { recipeFor, writeRecipeFiles } from "./support/recipes.ts";
import { runTool, sandbox } from "./support/run.ts";
import { type ClientStack, startStack } from "./support/stack.ts";

await cliTests({
  tool: "claude-code",
  recipe: "claude-code",
  args: (prompt) => ["-p", prompt, "--allowedTools", "Read"],
  readTool: (path) => ({ tool: "Read", input: { file_path: path } }),
  runMs: 60_000,
  // Claude Code reads Keyway's 503 overloaded_error as Anthropic's 529 and says so in its words.
  busy: "own",
  busyMs: 90_000,
});

const found = await installed(toolById("claude-code"));
const ci = /^(1|true)$/i.test(Deno.env.get("CI") ?? "");
/** A 1.5 MB conversation, as a long session with pasted files sends: 300,000 words on stdin. */
const LONG = "word ".repeat(300_000);

Deno.test({
  name:
    "Claude Code: a 1.5 MB conversation is answered; over MAX_REQUEST_BYTES (1 MiB here) it gets Keyway's 413 in Anthropic's shape and stops",
  ignore: !found && !ci,
  sanitizeResources: false,
  sanitizeOps: false,
  fn: async (t) => {
    assert.ok(found, "Claude Code is not installed: run deno task test:clients");
    // The default limit (32 MiB) for the first; 1 MiB for the second keeps the test light.
    const roomy = await startStack();
    const tight = await startStack({ MAX_REQUEST_BYTES: String(1024 * 1024) });
    try {
      const send = async (stack: ClientStack, email: string) => {
        const key = await stack.signUp(email);
        const box = await sandbox();
        await writeRecipeFiles(recipeFor("claude-code", key), box);
        const result = await runTool(found.path, ["-p", "Summarize what I pasted."], box, {
          timeoutMs: 90_000,
          stdin: LONG,
        });
        await Deno.remove(box.home, { recursive: true }).catch(() => {});
        const big = stack.exchanges.filter((e) => e.requestBytes > 1_400_000);
        return { key, result, big };
      };
      await t.step("1.5 MB under the default 32 MiB: answered and counted", async () => {
        const { key, result, big } = await send(roomy, "long@example.com");
        assert.equal(result.code, 0, result.output.slice(-2000));
        assert.ok(result.output.includes("Hello!"), result.output.slice(-2000));
        assert.ok(big.length > 0 && big.every((e) => e.status === 200), JSON.stringify(big));
        assert.deepEqual(await roomy.usage(key.apiKey), roomy.glm.reported);
        console.log(
          `  1.5 MB conversation: ${big.length} request(s) of ${big[0].requestBytes} bytes, ${
            (result.ms / 1000).toFixed(1)
          } s`,
        );
      });
      await t.step(
        "over MAX_REQUEST_BYTES: 413 in Anthropic's shape; Claude Code stops with its own words",
        async () => {
          const { result, big } = await send(tight, "toolong@example.com");
          assert.ok(!result.timedOut, result.output.slice(-2000));
          assert.notEqual(result.code, 0, result.output.slice(-2000));
          assert.ok(big.length > 0 && big.every((e) => e.status === 413), JSON.stringify(big));
          const body = JSON.parse(big[0].error ?? "{}");
          assert.equal(body.type, "error");
          assert.equal(body.error.type, "request_too_large");
          assert.equal(body.error.code, "payload_too_large");
          assert.equal(body.error.message, "Request body is larger than 1 MiB.");
          assert.equal(tight.glm.count, 0, "nothing went upstream");
          // Claude Code 2.1.332 words every 413 itself ("Request too large (max 32MB) …") and does
          // not print the body's message: checked, so a version that shows Keyway's is noticed.
          const said = result.output.trim().split("\n").at(-1) ?? "";
          console.log(`  over the limit, Claude Code printed: ${said}`);
          assert.match(said, /^Request too large/);
        },
      );
    } finally {
      await Promise.all([roomy.close(), tight.close()]);
    }
  },
});
