/**
 * The recipes module: every config a tool reads parses as that tool's format and carries the
 * right base URL for it (`/v1` for OpenAI-compatible clients and the AI SDK's anthropic
 * provider, none for Anthropic's SDK and Claude Code), the key and the default model.
 */
import assert from "node:assert/strict";
import { parse as parseYaml } from "yaml";
import { type Recipe, recipes, shellWord, yamlScalar } from "../../lib/recipes/recipes.ts";

const INPUT = {
  baseUrl: "https://ai.example.org/v1",
  anthropicBaseUrl: "https://ai.example.org",
  apiKey: "kw_TestKey0123456789abcdefghijklmnopqrstuv",
  models: ["glm-4.6", "glm-4.5-air"],
};
const list = recipes(INPUT);
const byId = (id: string): Recipe => {
  const r = list.find((r) => r.id === id);
  assert.ok(r, `recipe ${id}`);
  return r;
};
const file = (id: string, title: string) => {
  const f = byId(id).files.find((f) => f.title === title);
  assert.ok(f, `${id}: ${title}`);
  return f;
};

Deno.test("recipes: one per tool, each with at least one snippet that holds the key", () => {
  assert.deepEqual(list.map((r) => r.label), [
    "Claude Code",
    "opencode",
    "Kilo Code",
    "Continue",
    "Cline",
    "Crush",
    "Cursor & others",
    "OpenAI SDK",
    "Anthropic SDK",
    "Vercel AI SDK",
    "LangChain",
    "curl",
  ]);
  assert.equal(new Set(list.map((r) => r.id)).size, list.length, "ids are unique");
  for (const r of list) {
    assert.ok(r.files.length > 0, r.id);
    assert.ok(r.intro.length > 0 && r.checked.length > 0, r.id);
    for (const f of r.files) assert.ok(f.content.includes(INPUT.apiKey), `${r.id}: ${f.title}`);
  }
  assert.throws(() => recipes({ ...INPUT, models: [] }), /at least one model/);
});

Deno.test("recipes: JSON configs parse, with each tool's own keys and base URL", async (t) => {
  await t.step("Claude Code settings.json: Anthropic base URL without /v1", () => {
    const f = file("claude-code", "~/.claude/settings.json");
    assert.equal(f.path, "~/.claude/settings.json");
    assert.deepEqual(JSON.parse(f.content), {
      env: { ANTHROPIC_BASE_URL: INPUT.anthropicBaseUrl, ANTHROPIC_AUTH_TOKEN: INPUT.apiKey },
    });
  });
  const aiSdkProvider = {
    keyway: {
      npm: "@ai-sdk/openai-compatible",
      name: "Keyway",
      options: { baseURL: INPUT.baseUrl, apiKey: INPUT.apiKey },
      models: { "glm-4.6": {}, "glm-4.5-air": {} },
    },
  };
  await t.step("opencode.json: an @ai-sdk/openai-compatible provider on /v1", () => {
    const f = file("opencode", "opencode.json");
    assert.equal(f.path, "opencode.json");
    assert.deepEqual(JSON.parse(f.content), {
      $schema: "https://opencode.ai/config.json",
      provider: aiSdkProvider,
      model: "keyway/glm-4.6",
    });
  });
  await t.step("kilo.json: the same provider block", () => {
    const f = file("kilo", "~/.config/kilo/kilo.json");
    assert.deepEqual(JSON.parse(f.content), { provider: aiSdkProvider, model: "keyway/glm-4.6" });
  });
  await t.step("crush.json: an openai-compat provider on /v1, every model listed", () => {
    const f = file("crush", "crush.json");
    const doc = JSON.parse(f.content);
    assert.equal(doc.$schema, "https://charm.land/crush.json");
    const p = doc.providers.keyway;
    assert.equal(p.type, "openai-compat");
    assert.equal(p.base_url, INPUT.baseUrl);
    assert.equal(p.api_key, INPUT.apiKey);
    assert.deepEqual(p.models.map((m: { id: string }) => m.id), INPUT.models);
    for (const m of p.models) {
      assert.ok(m.context_window > 0 && m.default_max_tokens > 0, JSON.stringify(m));
    }
  });
});

Deno.test("recipes: Continue's config.yaml is a complete file a new user can paste", () => {
  const f = file("continue", "~/.continue/config.yaml");
  assert.equal(f.path, "~/.continue/config.yaml");
  const doc = parseYaml(f.content);
  // What Continue's loader requires of a whole file (its error for a bare models: list).
  assert.equal(doc.name, "Keyway");
  assert.match(doc.version, /^\d+\.\d+\.\d+$/);
  assert.equal(doc.schema, "v1");
  assert.deepEqual(doc.models, [
    {
      name: "glm-4.6 (Keyway)",
      provider: "openai",
      model: "glm-4.6",
      apiBase: INPUT.baseUrl,
      apiKey: INPUT.apiKey,
      roles: ["chat", "edit", "apply"],
    },
    {
      name: "glm-4.5-air (Keyway)",
      provider: "openai",
      model: "glm-4.5-air",
      apiBase: INPUT.baseUrl,
      apiKey: INPUT.apiKey,
      roles: ["chat", "edit"],
    },
  ]);
});

Deno.test("recipes: code snippets point each SDK at its base URL", () => {
  const has = (id: string, title: string, ...parts: string[]) => {
    const text = file(id, title).content;
    for (const p of parts) assert.ok(text.includes(p), `${id} ${title}: ${p}\n${text}`);
  };
  const openai = `baseURL: "${INPUT.baseUrl}"`;
  has("openai-sdk", "JavaScript / TypeScript", 'from "openai"', openai);
  has("openai-sdk", "Python", `base_url="${INPUT.baseUrl}"`, `api_key="${INPUT.apiKey}"`);
  has("anthropic-sdk", "JavaScript / TypeScript", `baseURL: "${INPUT.anthropicBaseUrl}",`);
  has("anthropic-sdk", "Python", `base_url="${INPUT.anthropicBaseUrl}"`);
  has("vercel-ai", "@ai-sdk/openai-compatible", "createOpenAICompatible(", openai);
  // @ai-sdk/anthropic appends /messages itself: without /v1 it gets 404.
  has(
    "vercel-ai",
    "@ai-sdk/anthropic",
    "createAnthropic(",
    `baseURL: "${INPUT.anthropicBaseUrl}/v1"`,
  );
  assert.match(byId("vercel-ai").intro, /\/v1/);
  has("langchain", "JavaScript / TypeScript", "new ChatOpenAI(", `configuration: { ${openai} }`);
  has("curl", "Terminal", `curl ${INPUT.baseUrl}/chat/completions`);
  has(
    "claude-code",
    "Terminal",
    `export ANTHROPIC_BASE_URL=${INPUT.anthropicBaseUrl}\n`,
    `export ANTHROPIC_AUTH_TOKEN=${INPUT.apiKey}\n`,
  );
  for (const id of ["cline", "cursor"]) {
    assert.match(byId(id).files[0].content, new RegExp(`Base URL: ${INPUT.baseUrl}\n`));
  }
  assert.match(
    file("kilo", "Kilo Code settings").content,
    /^Base URL: https:\/\/ai\.example\.org\/v1$/m,
  );
});

Deno.test("recipes: values that are not plain words are quoted, so the config still reads", () => {
  assert.equal(shellWord("https://a.example/v1"), "https://a.example/v1");
  assert.equal(shellWord("it's $HOME"), `'it'"'"'s $HOME'`);
  assert.equal(yamlScalar("https://a.example/v1"), "https://a.example/v1");
  for (const odd of ["a: b", "yes", "#x", "1.0", "x #y", "[a]", "*a"]) {
    assert.equal(parseYaml(`v: ${yamlScalar(odd)}`).v, odd, odd);
  }
  const weird = recipes({ ...INPUT, baseUrl: "https://ai.example.org/v1?x=1&y='2'" });
  const out = new Deno.Command("sh", {
    args: ["-c", `printf %s ${weird.find((r) => r.id === "curl")!.files[0].content.split(" ")[1]}`],
  }).outputSync();
  assert.equal(
    new TextDecoder().decode(out.stdout),
    "https://ai.example.org/v1?x=1&y='2'/chat/completions",
  );
});

Deno.test("recipes: the Python snippets are valid Python", async () => {
  const python = list.flatMap((r) => r.files.filter((f) => f.lang === "python"));
  assert.equal(python.length, 2);
  for (const f of python) {
    const out = await new Deno.Command("python3", {
      args: ["-c", "import ast, sys; ast.parse(sys.stdin.read())"],
      stdin: "piped",
      stderr: "piped",
    }).spawn();
    const writer = out.stdin.getWriter();
    await writer.write(new TextEncoder().encode(f.content));
    await writer.close();
    const result = await out.output();
    assert.equal(result.code, 0, `${f.path}: ${new TextDecoder().decode(result.stderr)}`);
  }
});
