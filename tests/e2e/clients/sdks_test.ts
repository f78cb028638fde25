/**
 * The SDKs against Keyway: `openai`, `@anthropic-ai/sdk`, the Vercel AI SDK (`ai` with
 * `@ai-sdk/openai-compatible` and with `@ai-sdk/anthropic`) and LangChain (`@langchain/openai`),
 * installed from npm into the clients cache and run with Node. Each recipe's snippet is run as it
 * is written (a chat); a driver then streams and makes a tool round trip with the base URL the
 * snippet gives. A spent day and a busy upstream are met by the snippet itself.
 */
import assert from "node:assert/strict";
import type { KeyBody } from "../../../lib/api_types.ts";
import { installed, toolById } from "../../../testing/clients/install.ts";
import { recipeFor } from "./support/recipes.ts";
import { runTool, type ToolRun } from "./support/run.ts";
import { type ClientStack, startStack } from "./support/stack.ts";

const found = await installed(toolById("sdks"));
const ci = /^(1|true)$/i.test(Deno.env.get("CI") ?? "");
const MARKER = "KEYWAY-MARKER-5d1c";
const DAY_SPENT = "Daily request limit of 1 request reached";
const BUSY = "The upstream is busy";

const TOOL = {
  name: "read_note",
  description: "Reads the note",
  schema: { type: "object", properties: { path: { type: "string" } }, required: ["path"] },
};

/** Streams a chat ("STREAMED:<text>"), then a tool round trip ("TOOLS:<text>"). */
const DRIVERS: Record<string, string> = {
  "openai_example.ts": `
import OpenAI from "openai";
const [baseURL, apiKey, model] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey });
const stream = await client.chat.completions.create({
  model, messages: [{ role: "user", content: "hi" }], stream: true,
});
let text = "";
for await (const chunk of stream) text += chunk.choices[0]?.delta?.content ?? "";
console.log("STREAMED:" + text);
const tools = [{ type: "function", function: { name: ${JSON.stringify(TOOL.name)},
  description: ${JSON.stringify(TOOL.description)}, parameters: ${JSON.stringify(TOOL.schema)} } }];
const messages = [{ role: "user", content: "read the note" }];
const first = await client.chat.completions.create({ model, messages, tools });
const call = first.choices[0].message.tool_calls[0];
messages.push(first.choices[0].message, { role: "tool", tool_call_id: call.id, content: ${
    JSON.stringify(MARKER)
  } });
const second = await client.chat.completions.create({ model, messages, tools });
console.log("TOOLS:" + second.choices[0].message.content);
`,
  "anthropic_example.ts": `
import Anthropic from "@anthropic-ai/sdk";
const [baseURL, apiKey, model] = process.argv.slice(2);
const client = new Anthropic({ baseURL, apiKey });
const stream = client.messages.stream({
  model, max_tokens: 100, messages: [{ role: "user", content: "hi" }],
});
let text = "";
stream.on("text", (t) => text += t);
await stream.finalMessage();
console.log("STREAMED:" + text);
const tools = [{ name: ${JSON.stringify(TOOL.name)}, description: ${
    JSON.stringify(TOOL.description)
  }, input_schema: ${JSON.stringify(TOOL.schema)} }];
const messages = [{ role: "user", content: "read the note" }];
const first = await client.messages.create({ model, max_tokens: 100, messages, tools });
const call = first.content.find((b) => b.type === "tool_use");
messages.push({ role: "assistant", content: first.content }, { role: "user", content: [
  { type: "tool_result", tool_use_id: call.id, content: ${JSON.stringify(MARKER)} }] });
const second = await client.messages.create({ model, max_tokens: 100, messages, tools });
console.log("TOOLS:" + second.content.map((b) => b.text ?? "").join(""));
`,
  "ai_sdk_example.ts": aiSdkDriver(
    `import { createOpenAICompatible } from "@ai-sdk/openai-compatible";`,
    `createOpenAICompatible({ name: "keyway", baseURL, apiKey })`,
  ),
  "ai_sdk_anthropic_example.ts": aiSdkDriver(
    `import { createAnthropic } from "@ai-sdk/anthropic";`,
    `createAnthropic({ baseURL, apiKey })`,
  ),
  "langchain_example.ts": `
import { ChatOpenAI } from "@langchain/openai";
import { ToolMessage } from "@langchain/core/messages";
const [baseURL, apiKey, model] = process.argv.slice(2);
const llm = new ChatOpenAI({ model, apiKey, configuration: { baseURL } });
let text = "";
for await (const chunk of await llm.stream("hi")) text += chunk.content;
console.log("STREAMED:" + text);
const withTools = llm.bindTools([{ type: "function", function: { name: ${
    JSON.stringify(TOOL.name)
  }, description: ${JSON.stringify(TOOL.description)}, parameters: ${
    JSON.stringify(TOOL.schema)
  } } }]);
const messages = [["user", "read the note"]];
const first = await withTools.invoke(messages);
const call = first.tool_calls[0];
const second = await withTools.invoke([...messages, first,
  new ToolMessage({ tool_call_id: call.id, content: ${JSON.stringify(MARKER)} })]);
console.log("TOOLS:" + second.content);
`,
};

function aiSdkDriver(importLine: string, create: string): string {
  return `
${importLine}
import { generateText, jsonSchema, stepCountIs, streamText, tool } from "ai";
const [baseURL, apiKey, model] = process.argv.slice(2);
const provider = ${create};
const streamed = streamText({ model: provider(model), prompt: "hi" });
let text = "";
for await (const t of streamed.textStream) text += t;
console.log("STREAMED:" + text);
const result = await generateText({
  model: provider(model),
  prompt: "read the note",
  tools: { ${TOOL.name}: tool({ description: ${JSON.stringify(TOOL.description)},
    inputSchema: jsonSchema(${JSON.stringify(TOOL.schema)}), execute: async () => ${
    JSON.stringify(MARKER)
  } }) },
  stopWhen: stepCountIs(2),
});
console.log("TOOLS:" + result.text);
`;
}

/** Which recipe holds which snippet. */
const SNIPPETS = [
  { recipe: "openai-sdk", file: "openai_example.ts" },
  { recipe: "anthropic-sdk", file: "anthropic_example.ts" },
  { recipe: "vercel-ai", file: "ai_sdk_example.ts" },
  { recipe: "vercel-ai", file: "ai_sdk_anthropic_example.ts" },
  { recipe: "langchain", file: "langchain_example.ts" },
];

Deno.test({
  name:
    "SDKs: each recipe's snippet chats; stream and tool round trip; usage exact; a spent day and a busy upstream",
  ignore: !found && !ci,
  sanitizeResources: false,
  sanitizeOps: false,
  fn: async (t) => {
    assert.ok(found, "the SDKs are not installed: run deno task test:clients");
    const main = await startStack();
    const spent = await startStack({ RATE_LIMIT_RPD: "1" });
    // Node resolves the SDKs from the cache's node_modules, above this folder.
    const dir = await Deno.makeTempDir({ dir: found.dir, prefix: "run_" });
    const notes: string[] = [];
    try {
      const node = async (
        stack: ClientStack,
        name: string,
        script: string,
        args: string[],
        timeoutMs = 60_000,
      ) => {
        const path = `${dir}/${crypto.randomUUID()}_${name.replace(/\.ts$/, ".mjs")}`;
        await Deno.writeTextFile(path, script);
        const from = stack.exchanges.length;
        const result = await runTool("node", [path, ...args], { home: dir, cwd: dir }, {
          timeoutMs,
        });
        return { result, exchanges: stack.exchanges.slice(from) };
      };
      const show = (r: ToolRun) =>
        `exit ${r.code} after ${(r.ms / 1000).toFixed(1)} s:\n${r.output.slice(-2000)}`;
      const snippetOf = (key: KeyBody, recipe: string, file: string) => {
        const snippet = recipeFor(recipe, key).files.find((f) => f.path === file);
        assert.ok(snippet, `${recipe} has ${file}`);
        return snippet.content;
      };
      for (const { recipe, file } of SNIPPETS) {
        await t.step(`${file}: the snippet chats; a driver streams and uses a tool`, async () => {
          const key = await main.signUp(`${file.replace(/\W/g, "")}@example.com`);
          const before = { ...main.glm.reported };
          const snippet = snippetOf(key, recipe, file);
          const chat = await node(main, file, snippet, []);
          assert.equal(chat.result.code, 0, show(chat.result));
          assert.ok(chat.result.output.includes("Hello!"), show(chat.result));
          // The driver takes the base URL the snippet gives (the recipe's, not a copy).
          const baseURL = JSON.parse(/baseURL: ("[^"]+")/.exec(snippet)?.[1] ?? "null");
          assert.ok(baseURL, "the snippet sets baseURL");
          main.glm.script = { tool: TOOL.name, input: { path: "note.txt" } };
          const driven = await node(main, file, DRIVERS[file], [baseURL, key.apiKey, "glm-4.6"]);
          main.glm.script = null;
          assert.equal(driven.result.code, 0, show(driven.result));
          assert.ok(driven.result.output.includes("STREAMED:Hello!"), show(driven.result));
          assert.ok(
            driven.result.output.includes(`TOOLS:The tool said: ${MARKER}`),
            show(driven.result),
          );
          assert.ok(driven.exchanges.some((e) => e.stream), "a streamed request");
          assert.ok(
            driven.exchanges.every((e) => e.status === 200),
            JSON.stringify(driven.exchanges),
          );
          const reported = main.glm.reported;
          assert.deepEqual(await main.usage(key.apiKey), {
            requests: reported.requests - before.requests,
            promptTokens: reported.promptTokens - before.promptTokens,
            completionTokens: reported.completionTokens - before.completionTokens,
          });
        });
      }
      for (const { recipe, file } of SNIPPETS) {
        await t.step(`${file}: a spent day is shown and stops it within 30 s`, async () => {
          const key = await spent.signUp(`spent${file.replace(/\W/g, "")}@example.com`);
          const first = await fetch(`${spent.url}/v1/chat/completions`, {
            method: "POST",
            headers: { authorization: `Bearer ${key.apiKey}`, "content-type": "application/json" },
            body: JSON.stringify({ model: "glm-4.6", messages: [{ role: "user", content: "hi" }] }),
          });
          assert.equal(first.status, 200);
          await first.body?.cancel();
          const { result, exchanges } = await node(spent, file, snippetOf(key, recipe, file), []);
          assert.ok(!result.timedOut, show(result));
          assert.notEqual(result.code, 0, show(result));
          assert.ok(result.output.includes(DAY_SPENT), show(result));
          const refusals = exchanges.filter((e) => e.status === 403);
          assert.ok(refusals.length > 0, JSON.stringify(exchanges));
          const after = result.exitedAt - refusals[0].at;
          assert.ok(after < 30_000, `stopped ${after} ms after the first 403`);
          notes.push(
            `${file}: spent day shown, ${refusals.length} request(s), exit ${
              (after / 1000).toFixed(1)
            } s after the 403`,
          );
        });
      }
      for (const { recipe, file } of SNIPPETS) {
        await t.step(`${file}: 503 upstream_busy`, async () => {
          const key = await main.signUp(`busy${file.replace(/\W/g, "")}@example.com`);
          main.glm.refusal = "concurrency";
          try {
            const { result, exchanges } = await node(
              main,
              file,
              snippetOf(key, recipe, file),
              [],
              120_000,
            );
            const busy = exchanges.filter((e) => e.status === 503);
            assert.ok(busy.length > 0, show(result));
            assert.ok(busy.every((e) => e.error?.includes("upstream_busy") && e.retryAfter));
            notes.push(
              `${file}: busy: ${busy.length} attempt(s), ${
                result.timedOut ? "still running" : `exit ${result.code}`
              } after ${(result.ms / 1000).toFixed(1)} s, ${
                result.output.includes(BUSY)
                  ? "Keyway's message shown"
                  : "Keyway's message NOT shown"
              }`,
            );
            assert.ok(!result.timedOut, show(result));
            assert.notEqual(result.code, 0, show(result));
            assert.ok(result.output.includes(BUSY), show(result));
          } finally {
            main.glm.refusal = null;
          }
          assert.deepEqual(await main.usage(key.apiKey), {
            requests: 0,
            promptTokens: 0,
            completionTokens: 0,
          });
        });
      }
    } finally {
      console.log(`  SDKs:\n    ${notes.join("\n    ")}`);
      await Promise.all([main.close(), spent.close()]);
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    }
  },
});
