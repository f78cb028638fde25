/** Start-up messages a person can act on: a busy port, a missing GLM_API_KEY. */
import assert from "node:assert/strict";
import { runMainToExit, startMain } from "../../support/subprocess.ts";

Deno.test("a busy port: one line naming PORT, exit 1, no stack trace", async () => {
  const cwd = await Deno.makeTempDir({ prefix: "keyway_startup_" });
  // Local mode listens on 127.0.0.1: hold that port first.
  const holder = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  try {
    const port = (holder.addr as Deno.NetAddr).port;
    const { code, stdout, stderr } = await runMainToExit(
      { PORT: String(port), DENO_KV_PATH: ":memory:" },
      cwd,
    );
    assert.equal(code, 1, `stdout:\n${stdout}\nstderr:\n${stderr}`);
    const lines = stderr.trim().split("\n");
    assert.equal(lines.length, 1, `one line, got:\n${stderr}`);
    assert.match(lines[0], new RegExp(`^Port ${port} is already in use: .*set PORT`));
    assert.ok(!/AddrInUse|Uncaught|\bat .*\.ts/.test(stderr), "no stack trace");
  } finally {
    holder.close();
    await Deno.remove(cwd, { recursive: true });
  }
});

Deno.test("no GLM_API_KEY in proxy mode: one warning line at start-up", async (t) => {
  const cwd = await Deno.makeTempDir({ prefix: "keyway_startup_" });
  try {
    for (
      const [label, env, warned] of [
        ["without it", {}, true],
        ["with it", { GLM_API_KEY: "glm-test-key-0123456789" }, false],
      ] as const
    ) {
      await t.step(label, async () => {
        const app = await startMain({ PORT: "0", DENO_KV_PATH: ":memory:", ...env }, cwd);
        try {
          const res = await fetch(`${app.url}/health`);
          assert.equal(res.status, 200);
          await res.body?.cancel();
        } finally {
          await app.stop();
        }
        const { stdout, stderr } = app.output();
        const warnings = (stdout + stderr).split("\n").filter((l) => l.includes("GLM_API_KEY"));
        assert.equal(warnings.length, warned ? 1 : 0, stdout + stderr);
        if (warned) assert.match(warnings[0], /"level":"warn".*503 not_configured/);
      });
    }
  } finally {
    await Deno.remove(cwd, { recursive: true });
  }
});
