/**
 * One coding CLI, driven as its user drives it: configured from the recipes module's own text,
 * then three runs against Keyway (support/stack.ts) — a chat whose answer needs a tool round trip
 * (the fake GLM calls the tool's own file-reading tool, then quotes what the tool read back), a
 * terminal refusal (the day's requests spent: 403 `quota_exceeded`), and GLM throttling the
 * account (503 `upstream_busy`). Usage must equal what the fake reported, exactly.
 */
import assert from "node:assert/strict";
import type { KeyBody } from "../../../../lib/api_types.ts";
import type { Recipe } from "../../../../lib/recipes/recipes.ts";
import { type Installed, installed, toolById } from "../../../../testing/clients/install.ts";
import type { ToolScript } from "../../../../testing/fakes/glm.ts";
import { recipeFor, writeRecipeFiles } from "./recipes.ts";
import { runTool, type Sandbox, sandbox, type ToolRun } from "./run.ts";
import { type ClientStack, startStack } from "./stack.ts";

export interface Cli {
  /** testing/clients/install.ts's id. */
  tool: string;
  /** The recipes module's id. */
  recipe: string;
  /** Puts the recipe where the tool reads it (default: writes its files). */
  configure?(recipe: Recipe, box: Sandbox, bin: string): Promise<void>;
  /** The headless command line for one prompt. */
  args(prompt: string): string[];
  /** The tool's own file-reading tool, called for `path`. */
  readTool(path: string): ToolScript;
  /** How long a run may take (the tools start slowly on a busy 2-core machine). */
  runMs: number;
  /**
   * What the tool does with 503 `upstream_busy` (observed; checked so a change is seen):
   * `keyway` shows Keyway's message and stops, `own` shows its own words and stops, `retries`
   * keeps retrying silently past `busyMs`.
   */
  busy: "keyway" | "own" | "retries";
  busyMs: number;
}

const ci = /^(1|true)$/i.test(Deno.env.get("CI") ?? "");
const MARKER = "KEYWAY-MARKER-7f3a";
/** Keyway's words for the day's requests spent (lib/limits/policy.ts). */
const DAY_SPENT = "Daily request limit of 1 request reached";
const BUSY = "The upstream is busy";

const seconds = (ms: number) => `${(ms / 1000).toFixed(1)} s`;

export async function cliTests(cli: Cli): Promise<void> {
  const tool = toolById(cli.tool);
  const found = await installed(tool);
  Deno.test({
    name:
      `${tool.label}: a chat with a tool round trip, usage exact, a spent day shown and stopped, a busy upstream handled`,
    // Not installed: `deno task test:clients` said so in one line; in CI every tool must run.
    ignore: !found && !ci,
    sanitizeResources: false,
    sanitizeOps: false,
    fn: async (t) => {
      assert.ok(found, `${tool.label} is not installed: run deno task test:clients`);
      await drive(t, cli, found);
    },
  });
}

async function drive(t: Deno.TestContext, cli: Cli, found: Installed) {
  const main = await startStack();
  const spent = await startStack({ RATE_LIMIT_RPD: "1" });
  const notes: string[] = [];
  try {
    const run = async (stack: ClientStack, key: KeyBody, prompt: string, timeoutMs: number) => {
      const box = await sandbox();
      const recipe = recipeFor(cli.recipe, key);
      await (cli.configure?.(recipe, box, found.path) ?? writeRecipeFiles(recipe, box));
      await Deno.writeTextFile(`${box.cwd}/note.txt`, `${MARKER}\n`);
      stack.glm.script = cli.readTool(`${box.cwd}/note.txt`);
      const from = stack.exchanges.length;
      const result = await runTool(found.path, cli.args(prompt), box, { timeoutMs });
      await Deno.remove(box.home, { recursive: true }).catch(() => {});
      return { result, exchanges: stack.exchanges.slice(from) };
    };
    const show = (r: ToolRun) => `exit ${r.code} after ${seconds(r.ms)}:\n${r.output.slice(-3000)}`;

    await t.step("chat, streamed, with a tool round trip; usage counted exactly", async () => {
      const key = await main.signUp("chat@example.com");
      const { result, exchanges } = await run(main, key, "What does note.txt say?", cli.runMs);
      assert.equal(result.code, 0, show(result));
      assert.ok(result.output.includes(`The tool said: `), show(result));
      assert.ok(result.output.includes(MARKER), `the answer quotes the file:\n${show(result)}`);
      const generations = exchanges.filter((e) => e.path !== "/v1/messages/count_tokens");
      assert.ok(generations.length >= 2, "the call and the answer to its result");
      assert.ok(generations.every((e) => e.status === 200), JSON.stringify(exchanges));
      const streamed = generations.filter((e) => e.stream).length;
      assert.ok(streamed > 0, "it streams");
      assert.deepEqual(await main.usage(key.apiKey), main.glm.reported);
      notes.push(
        `chat ok in ${seconds(result.ms)} (${generations.length} requests, ${streamed} streamed)`,
      );
    });

    await t.step(
      "a terminal refusal (the day's requests spent) is shown and stops it within 30 s",
      async () => {
        const key = await spent.signUp("spent@example.com");
        const first = await fetch(`${spent.url}/v1/chat/completions`, {
          method: "POST",
          headers: { authorization: `Bearer ${key.apiKey}`, "content-type": "application/json" },
          body: JSON.stringify({ model: "glm-4.6", messages: [{ role: "user", content: "hi" }] }),
        });
        assert.equal(first.status, 200, "the day's one request");
        await first.body?.cancel();
        const { result, exchanges } = await run(spent, key, "say hi", cli.runMs);
        assert.ok(!result.timedOut, `it stopped by itself: ${show(result)}`);
        assert.notEqual(result.code, 0, show(result));
        assert.ok(result.output.includes(DAY_SPENT), `Keyway's message is shown:\n${show(result)}`);
        const refusals = exchanges.filter((e) => e.status === 403);
        assert.ok(refusals.length > 0, JSON.stringify(exchanges));
        assert.ok(refusals.every((e) => e.error?.includes("quota_exceeded")));
        const after = result.exitedAt - refusals[0].at;
        assert.ok(after < 30_000, `stopped ${seconds(after)} after the first 403`);
        notes.push(
          `refusal shown, ${refusals.length} request(s), exit ${seconds(after)} after the 403`,
        );
      },
    );

    await t.step(`503 upstream_busy: ${cli.busy}`, async () => {
      const key = await main.signUp("busy@example.com");
      const before = { ...main.glm.reported };
      main.glm.refusal = "concurrency";
      try {
        const { result, exchanges } = await run(main, key, "say hi", cli.busyMs);
        const busy = exchanges.filter((e) => e.status === 503);
        assert.ok(busy.length > 0, show(result));
        assert.ok(busy.every((e) => e.error?.includes("upstream_busy") && e.retryAfter));
        const span = busy.length > 1 ? busy.at(-1)!.at - busy[0].at : 0;
        if (cli.busy === "retries") {
          assert.ok(result.timedOut, `still retrying at ${seconds(cli.busyMs)}: ${show(result)}`);
        } else {
          assert.ok(!result.timedOut, `it gave up by itself: ${show(result)}`);
          assert.notEqual(result.code, 0, show(result));
          if (cli.busy === "keyway") assert.ok(result.output.includes(BUSY), show(result));
        }
        notes.push(
          `busy: ${busy.length} attempt(s) over ${seconds(span)}, ${
            result.timedOut
              ? `still running at ${seconds(result.ms)}`
              : `exit ${result.code} after ${seconds(result.ms)}`
          }, ${
            result.output.includes(BUSY) ? "Keyway's message shown" : "Keyway's message not shown"
          }: ${result.output.trim().split("\n").filter(Boolean).at(-1)?.slice(0, 160) ?? ""}`,
        );
      } finally {
        main.glm.refusal = null;
      }
      assert.deepEqual(main.glm.reported, before, "nothing answered");
      assert.deepEqual(await main.usage(key.apiKey), {
        requests: 0,
        promptTokens: 0,
        completionTokens: 0,
      });
    });
  } finally {
    console.log(`  ${toolById(cli.tool).label}: ${notes.join("; ")}`);
    await Promise.all([main.close(), spent.close()]);
  }
}
