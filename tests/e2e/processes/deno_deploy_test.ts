/**
 * Deno Deploy readiness (CONTRACT §1, §8): with DENO_DEPLOYMENT_ID set and no DENO_KV_PATH the
 * server opens the runtime's own KV (`Deno.openKv()` with no argument), serves the island bundles
 * `deno task build` made, and spawns no process and writes no file: it runs here under
 * `--deny-run` with write access to nothing but Deno's own KV location.
 */
import assert from "node:assert/strict";
import { buildIslands } from "../../../build/islands.ts";
import { ClerkIssuer } from "../../../testing/fakes/clerk_issuer.ts";
import { FakeGlm } from "../../../testing/fakes/glm.ts";
import { ENCRYPTION_SECRET, MASTER_KEY } from "../../support/helpers.ts";

const ROOT = new URL("../../../", import.meta.url).pathname;

Deno.test("on Deno Deploy: runtime KV, prebuilt bundles, no process spawned, no file written", async () => {
  await buildIslands(); // what `deno task build` does before a deploy
  const home = await Deno.makeTempDir({ prefix: "keyway_deploy_" });
  // Deno keeps the no-argument KV under DENO_DIR (with the npm packages the server needs).
  const denoDir = Deno.env.get("DENO_DIR") ?? `${Deno.env.get("HOME")}/.cache/deno`;
  const kvLocation = `${denoDir}/location_data`;
  await Deno.mkdir(kvLocation, { recursive: true });
  const issuer = await ClerkIssuer.create();
  const glm = new FakeGlm();
  const child = new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "--config",
      `${ROOT}deno.json`,
      "--allow-net",
      "--allow-env",
      "--allow-sys",
      `--allow-read`,
      `--allow-write=${kvLocation}`,
      "--deny-run",
      `${ROOT}main.ts`,
    ],
    cwd: ROOT,
    clearEnv: true,
    env: {
      PATH: Deno.env.get("PATH") ?? "",
      HOME: home,
      DENO_DIR: denoDir,
      NO_COLOR: "1",
      DENO_DEPLOYMENT_ID: "test-deployment",
      PORT: "0",
      PUBLIC_URL: "http://localhost:8000",
      CLERK_JWT_KEY: issuer.publicKeyPem,
      KEY_ENCRYPTION_SECRET: ENCRYPTION_SECRET,
      GLM_API_KEY: MASTER_KEY,
      GLM_BASE_URL: glm.baseUrl,
    },
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  let output = "";
  const decoder = new TextDecoder();
  const pump = async (stream: ReadableStream<Uint8Array>) => {
    for await (const chunk of stream) output += decoder.decode(chunk, { stream: true });
  };
  const reading = Promise.all([pump(child.stdout), pump(child.stderr)]);
  try {
    let url = "";
    const until = Date.now() + 20_000;
    while (!url && Date.now() < until) {
      const line = output.split("\n").find((l) => l.includes('"keyway listening"'));
      if (line) url = new URL(JSON.parse(line).url).origin.replace("localhost", "127.0.0.1");
      else await new Promise((r) => setTimeout(r, 50));
    }
    assert.ok(url, `the server started:\n${output}`);
    assert.ok(!output.includes("island bundles unavailable"), output);

    // The runtime's KV outlives this test: a user of its own.
    const token = await issuer.token(`user_deploy_${crypto.randomUUID()}`, { ttlSeconds: 600 });
    const keyRes = await fetch(`${url}/api/key`, { headers: { authorization: `Bearer ${token}` } });
    assert.equal(keyRes.status, 200);
    const { apiKey } = await keyRes.json();
    const chat = await fetch(`${url}/v1/chat/completions`, {
      method: "POST",
      headers: { authorization: `Bearer ${apiKey}`, "content-type": "application/json" },
      body: JSON.stringify({ model: "glm-4.6", messages: [{ role: "user", content: "hi" }] }),
    });
    assert.equal(chat.status, 200);
    assert.equal((await chat.json()).usage.total_tokens, 18);
    const usage = await fetch(`${url}/api/usage?days=1`, {
      headers: { authorization: `Bearer ${apiKey}` },
    });
    assert.equal((await usage.json()).today.requests, 1);
    const page = await fetch(`${url}/dashboard`, { headers: { cookie: `__session=${token}` } });
    assert.equal(page.status, 200);
    assert.match(await page.text(), /\/static\/build\/AutoProvision\.js\?v=/);
    // No write outside Deno's KV location and no process: either would have failed loudly.
    assert.ok(!/PermissionDenied|NotCapable|Requires (run|write) access/.test(output), output);
  } finally {
    child.kill("SIGTERM");
    await child.status;
    await reading;
    await glm.close();
    await Deno.remove(home, { recursive: true });
  }
});
