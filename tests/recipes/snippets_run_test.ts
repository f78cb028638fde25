/**
 * The snippets run: the JavaScript snippets of the OpenAI and Anthropic SDKs (real `openai` and
 * `@anthropic-ai/sdk` packages, the versions deno.json pins) and the curl line, each written to a
 * file exactly as the recipes module makes it from `POST /api/key`'s own answer, and run as a
 * process against a Keyway gateway on a real port before a fake GLM. Each call is counted.
 */
import assert from "node:assert/strict";
import type { KeyBody } from "../../lib/api_types.ts";
import { type RecipeFile, recipes } from "../../lib/recipes/recipes.ts";
import { createApp } from "../../routes/mod.ts";
import { FakeGlm } from "../../testing/fakes/glm.ts";
import { bearer, testApp } from "../support/helpers.ts";

const CONFIG = new URL("../../deno.json", import.meta.url).pathname;

/** Runs one snippet as its user would: a TypeScript file with deno, a shell line with sh. */
async function runSnippet(dir: string, f: RecipeFile): Promise<string> {
  const command = f.lang === "sh"
    ? new Deno.Command("sh", { args: ["-c", f.content], stdout: "piped", stderr: "piped" })
    : new Deno.Command(Deno.execPath(), {
      // The repository's import map resolves the bare "openai" / "@anthropic-ai/sdk" specifiers.
      args: ["run", "-A", "--config", CONFIG, "--no-lock", await written(dir, f)],
      stdout: "piped",
      stderr: "piped",
    });
  const out = await command.output();
  const text = new TextDecoder().decode(out.stdout);
  assert.equal(out.code, 0, `${f.title}: ${new TextDecoder().decode(out.stderr)}`);
  return text;
}

async function written(dir: string, f: RecipeFile): Promise<string> {
  assert.ok(f.path, `${f.title} has a file name`);
  const path = `${dir}/${f.path}`;
  await Deno.writeTextFile(path, f.content);
  return path;
}

Deno.test("snippets: the SDKs' and curl's, run against a gateway, each call counted", async (t) => {
  const fake = new FakeGlm();
  const probe = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = probe.addr.port;
  probe.close();
  const url = `http://127.0.0.1:${port}`;
  const app = await testApp({ GLM_BASE_URL: fake.baseUrl, PUBLIC_URL: url });
  const server = Deno.serve(
    { hostname: "127.0.0.1", port, onListen: () => {} },
    createApp(app.services).fetch,
  );
  const dir = await Deno.makeTempDir({ prefix: "keyway_snippets_" });
  try {
    const { token } = await app.services.sessions.issueLocal("snippets@example.com");
    const res = await fetch(`${url}/api/key`, { method: "POST", headers: bearer(token) });
    assert.equal(res.status, 201);
    const key: KeyBody = await res.json();
    // What the dashboard builds its tabs from.
    const list = recipes({
      baseUrl: key.baseUrl,
      anthropicBaseUrl: key.anthropicBaseUrl,
      apiKey: key.apiKey,
      models: app.services.config.allowedModels,
    });
    const model = app.services.config.allowedModels[0];
    const snippet = (id: string, title: string) =>
      list.find((r) => r.id === id)!.files.find((f) => f.title === title)!;
    const requests = async () => {
      const usage = await fetch(`${url}/api/usage?days=1`, { headers: bearer(key.apiKey) });
      return (await usage.json()).today.requests as number;
    };

    await t.step("OpenAI SDK (JavaScript): /v1/chat/completions", async () => {
      const out = await runSnippet(dir, snippet("openai-sdk", "JavaScript / TypeScript"));
      assert.equal(out, "Hello!\n");
      const sent = fake.requests.at(-1)!;
      assert.equal(sent.path, "/api/paas/v4/chat/completions");
      assert.equal(JSON.parse(sent.body).model, model);
      assert.equal(await requests(), 1);
    });
    await t.step(
      "Anthropic SDK (JavaScript): /v1/messages on the base URL without /v1",
      async () => {
        const out = await runSnippet(dir, snippet("anthropic-sdk", "JavaScript / TypeScript"));
        assert.equal(out, "Hello!\n");
        const sent = fake.requests.at(-1)!;
        assert.equal(sent.path, "/api/anthropic/v1/messages");
        assert.equal(JSON.parse(sent.body).model, model);
        assert.equal(await requests(), 2);
      },
    );
    await t.step("curl", async () => {
      const out = JSON.parse(await runSnippet(dir, snippet("curl", "Terminal")));
      assert.equal(out.choices[0].message.content, "Hello!");
      assert.equal(await requests(), 3);
    });
  } finally {
    await Deno.remove(dir, { recursive: true });
    await server.shutdown();
    await fake.close();
    await app.close();
  }
});
