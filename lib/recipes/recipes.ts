/**
 * How to use a Keyway key in each tool: one list of recipes, pure functions of the instance's
 * URLs, the key and the models. The dashboard's "Use it" tabs render them with the user's real
 * values; the README's editor section is the same list rendered with placeholders
 * (`deno task recipes` rewrites it, and a test fails when it is stale). Each snippet is data — a
 * file name and its content — so a test (or a person) can write it where the tool reads it.
 *
 * Base URLs: OpenAI-compatible clients take `baseUrl` (`<PUBLIC_URL>/v1`); Anthropic clients take
 * `anthropicBaseUrl` (`<PUBLIC_URL>`, they append `/v1/messages`) — except the Vercel AI SDK's
 * `@ai-sdk/anthropic`, which appends only `/messages` and so needs `<anthropicBaseUrl>/v1`.
 */

/** What a recipe is made from: the instance's values for one user. */
export interface RecipeInput {
  /** OpenAI-compatible base URL, ending in `/v1` (`GET /api/key`'s `baseUrl`). */
  baseUrl: string;
  /** Anthropic base URL, without `/v1` (`GET /api/key`'s `anthropicBaseUrl`). */
  anthropicBaseUrl: string;
  apiKey: string;
  /** Models to offer, the default first (at least one). */
  models: readonly string[];
}

export type SnippetLang = "sh" | "json" | "yaml" | "text" | "python" | "ts";

/** One snippet: a whole file a tool reads, or text to type into a terminal or a settings form. */
export interface RecipeFile {
  /** What the snippet is, as a heading: a file name, "Terminal", "Python"… */
  title: string;
  /** Where the tool reads it when it is a whole file (`~` is the home folder); null otherwise. */
  path: string | null;
  lang: SnippetLang;
  content: string;
}

export interface Recipe {
  id: string;
  label: string;
  /** Where the snippets go, in a sentence or two. */
  intro: string;
  /** How this recipe was checked (shown in the README, for the operator). */
  checked: string;
  files: RecipeFile[];
}

/** The values the README shows. */
export const PLACEHOLDERS: RecipeInput = {
  baseUrl: "https://keyway.example.com/v1",
  anthropicBaseUrl: "https://keyway.example.com",
  apiKey: "kw_…",
  models: ["glm-5.1", "glm-4.6", "glm-4.5-air"],
};

/** Config files list at most this many models (the rest are one edit away). */
const LISTED_MODELS = 3;
/** Crush wants a context window per model; every current GLM model has at least this. */
const CONTEXT_WINDOW = 128_000;
const MAX_OUTPUT_TOKENS = 4096;

const json = (value: unknown) => JSON.stringify(value, null, 2);
/** A string literal in JavaScript, TypeScript or Python (JSON's is valid in all three). */
const str = (s: string) => JSON.stringify(s);

/** A shell word: as it is when it is plain, else single-quoted. */
export function shellWord(s: string): string {
  // "…" and "•" (placeholders, a masked key) are ordinary characters to a shell.
  return /^[\w./:@%+=,…•-]+$/.test(s) ? s : `'${s.replaceAll("'", `'"'"'`)}'`;
}

/** A YAML scalar: plain when that cannot be misread, else double-quoted (JSON is YAML). */
export function yamlScalar(s: string): string {
  const plain = /^[\p{L}\p{N}_./@…•+-][\p{L}\p{N}_./:@…•+ ()-]*$/u.test(s) && !s.includes(": ") &&
    !s.endsWith(":") && !s.endsWith(" ") && !/^(true|false|null|yes|no|~|[\d.+-]+)$/i.test(s);
  return plain ? s : JSON.stringify(s);
}

/** Every recipe, in the order the dashboard's tabs show them. */
export function recipes(input: RecipeInput): Recipe[] {
  const { baseUrl, anthropicBaseUrl, apiKey } = input;
  if (input.models.length === 0) throw new Error("recipes: at least one model is needed");
  const model = input.models[0];
  const listed = input.models.slice(0, LISTED_MODELS);
  /** The provider block opencode and Kilo share (both take AI SDK providers from npm). */
  const aiSdkProvider = {
    keyway: {
      npm: "@ai-sdk/openai-compatible",
      name: "Keyway",
      options: { baseURL: baseUrl, apiKey },
      models: Object.fromEntries(listed.map((m) => [m, {}])),
    },
  };
  const fields = (rows: [string, string][]) => rows.map(([k, v]) => `${k}: ${v}`).join("\n");
  return [
    {
      id: "claude-code",
      label: "Claude Code",
      intro:
        "Claude Code speaks Anthropic's API; Keyway answers it and serves Claude model names with GLM models. Set two variables before starting it, or put them in ~/.claude/settings.json (merge them into the env block if the file exists).",
      checked:
        "settings.json is run by deno task test:clients with the Claude Code 2.1.332 CLI (claude -p): chat, tools, a spent day, a busy upstream, long conversations; the variables were tried by hand",
      files: [
        {
          title: "Terminal",
          path: null,
          lang: "sh",
          content: [
            `export ANTHROPIC_BASE_URL=${shellWord(anthropicBaseUrl)}`,
            `export ANTHROPIC_AUTH_TOKEN=${shellWord(apiKey)}`,
            "claude",
          ].join("\n"),
        },
        {
          title: "~/.claude/settings.json",
          path: "~/.claude/settings.json",
          lang: "json",
          content: json({
            env: { ANTHROPIC_BASE_URL: anthropicBaseUrl, ANTHROPIC_AUTH_TOKEN: apiKey },
          }),
        },
      ],
    },
    {
      id: "opencode",
      label: "opencode",
      intro:
        "A custom provider in opencode.json (in your project, or ~/.config/opencode/opencode.json for every project); pick the model with /models or start with the one set here.",
      checked:
        "this opencode.json is run by deno task test:clients with opencode 1.18.33 (opencode run): chat, tools, a spent day, a busy upstream",
      files: [{
        title: "opencode.json",
        path: "opencode.json",
        lang: "json",
        content: json({
          $schema: "https://opencode.ai/config.json",
          provider: aiSdkProvider,
          model: `keyway/${model}`,
        }),
      }],
    },
    {
      id: "kilo",
      label: "Kilo Code",
      intro:
        'The Kilo CLI reads the same provider block as opencode, from ~/.config/kilo/kilo.json (or kilo.json in your project). In the VS Code extension: Settings → Providers → Custom provider, with these fields (older versions: API Provider "OpenAI Compatible").',
      checked:
        "this kilo.json is run by deno task test:clients with the Kilo CLI 7.7.7 (kilo run); the extension's fields follow Kilo's documentation of custom providers",
      files: [
        {
          title: "~/.config/kilo/kilo.json",
          path: "~/.config/kilo/kilo.json",
          lang: "json",
          content: json({ provider: aiSdkProvider, model: `keyway/${model}` }),
        },
        {
          title: "Kilo Code settings",
          path: null,
          lang: "text",
          content: fields([
            ["Provider ID", "keyway"],
            ["Base URL", baseUrl],
            ["API Key", apiKey],
            ["Model", model],
          ]),
        },
      ],
    },
    {
      id: "continue",
      label: "Continue",
      intro:
        "A complete ~/.continue/config.yaml: paste it into an empty file, or copy the models entries into yours (Continue refuses a file without name and version).",
      checked:
        "this config.yaml is run by deno task test:clients as a new user's whole file, with the Continue CLI 1.5.47 (cn -p)",
      files: [{
        title: "~/.continue/config.yaml",
        path: "~/.continue/config.yaml",
        lang: "yaml",
        content: [
          "name: Keyway",
          "version: 1.0.0",
          "schema: v1",
          "models:",
          ...listed.flatMap((m, i) => [
            `  - name: ${yamlScalar(`${m} (Keyway)`)}`,
            "    provider: openai",
            `    model: ${yamlScalar(m)}`,
            `    apiBase: ${yamlScalar(baseUrl)}`,
            `    apiKey: ${yamlScalar(apiKey)}`,
            "    roles:",
            ...(i === 0 ? ["chat", "edit", "apply"] : ["chat", "edit"]).map((r) => `      - ${r}`),
          ]),
        ].join("\n"),
      }],
    },
    {
      id: "cline",
      label: "Cline",
      intro:
        'In Cline\'s settings choose the API provider "OpenAI Compatible" and fill in these fields.',
      checked:
        "these fields are run by deno task test:clients with the Cline CLI 3.0.65 (cline auth -p openai, then cline)",
      files: [{
        title: "Cline settings",
        path: null,
        lang: "text",
        content: fields([
          ["API Provider", "OpenAI Compatible"],
          ["Base URL", baseUrl],
          ["API Key", apiKey],
          ["Model ID", model],
        ]),
      }],
    },
    {
      id: "crush",
      label: "Crush",
      intro:
        "An OpenAI-compatible provider in crush.json (in your project, or ~/.config/crush/crush.json); then choose a Keyway model in Crush's model list.",
      checked:
        "written to Crush's README (openai-compat providers); not run here (Crush installs from GitHub releases)",
      files: [{
        title: "crush.json",
        path: "crush.json",
        lang: "json",
        content: json({
          $schema: "https://charm.land/crush.json",
          providers: {
            keyway: {
              name: "Keyway",
              type: "openai-compat",
              base_url: baseUrl,
              api_key: apiKey,
              models: listed.map((m) => ({
                id: m,
                name: m,
                context_window: CONTEXT_WINDOW,
                default_max_tokens: MAX_OUTPUT_TOKENS,
              })),
            },
          },
        }),
      }],
    },
    {
      id: "cursor",
      label: "Cursor & others",
      intro:
        "Editors with OpenAI-compatible settings (Cursor: Settings → Models → OpenAI API Key, Override OpenAI Base URL) take a base URL, a key and a model name. Cursor calls from its own servers, so the base URL must be reachable from the internet.",
      checked: "written to Cursor's model settings; not tried",
      files: [{
        title: "OpenAI-compatible settings",
        path: null,
        lang: "text",
        content: fields([
          ["OpenAI Base URL", baseUrl],
          ["OpenAI API Key", apiKey],
          ["Model", model],
        ]),
      }],
    },
    {
      id: "openai-sdk",
      label: "OpenAI SDK",
      intro: "The official SDKs: npm install openai, or pip install openai.",
      checked:
        "the JavaScript snippet is run by the test suite (openai 7.57) against a Keyway gateway",
      files: [
        {
          title: "JavaScript / TypeScript",
          path: "openai_example.ts",
          lang: "ts",
          content: [
            'import OpenAI from "openai";',
            "",
            `const client = new OpenAI({ baseURL: ${str(baseUrl)}, apiKey: ${str(apiKey)} });`,
            "const reply = await client.chat.completions.create({",
            `  model: ${str(model)},`,
            '  messages: [{ role: "user", content: "Hello!" }],',
            "});",
            "console.log(reply.choices[0].message.content);",
          ].join("\n"),
        },
        {
          title: "Python",
          path: "openai_example.py",
          lang: "python",
          content: [
            "from openai import OpenAI",
            "",
            `client = OpenAI(base_url=${str(baseUrl)}, api_key=${str(apiKey)})`,
            "reply = client.chat.completions.create(",
            `    model=${str(model)},`,
            '    messages=[{"role": "user", "content": "Hello!"}],',
            ")",
            "print(reply.choices[0].message.content)",
          ].join("\n"),
        },
      ],
    },
    {
      id: "anthropic-sdk",
      label: "Anthropic SDK",
      intro:
        "Anthropic's Messages API on the same key (npm install @anthropic-ai/sdk, or pip install anthropic). Claude model names work too.",
      checked:
        "the JavaScript snippet is run by the test suite (@anthropic-ai/sdk 1.14) against a Keyway gateway",
      files: [
        {
          title: "JavaScript / TypeScript",
          path: "anthropic_example.ts",
          lang: "ts",
          content: [
            'import Anthropic from "@anthropic-ai/sdk";',
            "",
            "const client = new Anthropic({",
            `  baseURL: ${str(anthropicBaseUrl)},`,
            `  apiKey: ${str(apiKey)},`,
            "});",
            "const reply = await client.messages.create({",
            `  model: ${str(model)},`,
            "  max_tokens: 1024,",
            '  messages: [{ role: "user", content: "Hello!" }],',
            "});",
            'for (const block of reply.content) if (block.type === "text") console.log(block.text);',
          ].join("\n"),
        },
        {
          title: "Python",
          path: "anthropic_example.py",
          lang: "python",
          content: [
            "from anthropic import Anthropic",
            "",
            `client = Anthropic(base_url=${str(anthropicBaseUrl)}, api_key=${str(apiKey)})`,
            "reply = client.messages.create(",
            `    model=${str(model)},`,
            "    max_tokens=1024,",
            '    messages=[{"role": "user", "content": "Hello!"}],',
            ")",
            "print(reply.content[0].text)",
          ].join("\n"),
        },
      ],
    },
    {
      id: "vercel-ai",
      label: "Vercel AI SDK",
      intro:
        "Either provider works (npm install ai and @ai-sdk/openai-compatible or @ai-sdk/anthropic). @ai-sdk/anthropic appends /messages to its baseURL, so its baseURL ends in /v1 — unlike Anthropic's own SDK.",
      checked:
        "both snippets are run by deno task test:clients (ai 7.0, @ai-sdk/openai-compatible 3.0, @ai-sdk/anthropic 4.0) against a Keyway gateway; the anthropic one gets 404 without /v1",
      files: [
        {
          title: "@ai-sdk/openai-compatible",
          path: "ai_sdk_example.ts",
          lang: "ts",
          content: [
            'import { createOpenAICompatible } from "@ai-sdk/openai-compatible";',
            'import { generateText } from "ai";',
            "",
            "const keyway = createOpenAICompatible({",
            '  name: "keyway",',
            `  baseURL: ${str(baseUrl)},`,
            `  apiKey: ${str(apiKey)},`,
            "});",
            `const { text } = await generateText({ model: keyway(${
              str(model)
            }), prompt: "Hello!" });`,
            "console.log(text);",
          ].join("\n"),
        },
        {
          title: "@ai-sdk/anthropic",
          path: "ai_sdk_anthropic_example.ts",
          lang: "ts",
          content: [
            'import { createAnthropic } from "@ai-sdk/anthropic";',
            'import { generateText } from "ai";',
            "",
            "// The baseURL ends in /v1: this provider appends /messages itself.",
            "const keyway = createAnthropic({",
            `  baseURL: ${str(`${anthropicBaseUrl}/v1`)},`,
            `  apiKey: ${str(apiKey)},`,
            "});",
            `const { text } = await generateText({ model: keyway(${
              str(model)
            }), prompt: "Hello!" });`,
            "console.log(text);",
          ].join("\n"),
        },
      ],
    },
    {
      id: "langchain",
      label: "LangChain",
      intro:
        "LangChain's OpenAI chat model (npm install @langchain/openai) takes the base URL in configuration.",
      checked:
        "the snippet is run by deno task test:clients (@langchain/openai 1.6) against a Keyway gateway",
      files: [{
        title: "JavaScript / TypeScript",
        path: "langchain_example.ts",
        lang: "ts",
        content: [
          'import { ChatOpenAI } from "@langchain/openai";',
          "",
          "const llm = new ChatOpenAI({",
          `  model: ${str(model)},`,
          `  apiKey: ${str(apiKey)},`,
          `  configuration: { baseURL: ${str(baseUrl)} },`,
          "});",
          'const reply = await llm.invoke("Hello!");',
          "console.log(reply.content);",
        ].join("\n"),
      }],
    },
    {
      id: "curl",
      label: "curl",
      intro: "Check that everything works from a terminal.",
      checked: "run by the test suite against a Keyway gateway",
      files: [{
        title: "Terminal",
        path: null,
        lang: "sh",
        content: [
          `curl ${shellWord(`${baseUrl}/chat/completions`)} \\`,
          `  -H ${shellWord(`Authorization: Bearer ${apiKey}`)} \\`,
          "  -H 'Content-Type: application/json' \\",
          `  -d ${
            shellWord(JSON.stringify({ model, messages: [{ role: "user", content: "Hello!" }] }))
          }`,
        ].join("\n"),
      }],
    },
  ];
}
