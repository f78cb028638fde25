/**
 * Security findings about configuration, exports, the gateway's body check, key rotation and
 * logs — each attack replayed against a real process (main.ts or the report task).
 */
import assert from "node:assert/strict";
import { keys } from "../../../lib/core/kv.ts";
import { recordUsage } from "../../../lib/usage/usage.ts";
import { ClerkIssuer } from "../../../testing/fakes/clerk_issuer.ts";
import { FakeGlm } from "../../../testing/fakes/glm.ts";
import { ENCRYPTION_SECRET, MASTER_KEY, processEnv, runReport } from "../../support/helpers.ts";
import { runMainToExit, startMain } from "../../support/subprocess.ts";

const issuer = await ClerkIssuer.create();

Deno.test("configuration that would open or weaken a server is refused, without echoing values", async (t) => {
  const dir = await Deno.makeTempDir();
  try {
    const cases: Array<[string, Record<string, string>, string]> = [
      ["APP_ENV=Production without Clerk", { APP_ENV: "Production" }, "CLERK_JWT_KEY"],
      ["APP_ENV=PRODUCTION without Clerk", { APP_ENV: "PRODUCTION" }, "CLERK_JWT_KEY"],
      ["APP_ENV=prod without Clerk", { APP_ENV: "prod" }, "CLERK_JWT_KEY"],
      ["a publishable key alone in production", {
        APP_ENV: "production",
        CLERK_PUBLISHABLE_KEY: "pk_live_Y2xlcmsua2V5d2F5LnRlc3Qk",
        KEY_ENCRYPTION_SECRET: ENCRYPTION_SECRET,
      }, "CLERK_JWT_KEY or CLERK_SECRET_KEY"],
      ["a key-encryption secret of one repeated letter", {
        CLERK_JWT_KEY: issuer.publicKeyPem,
        KEY_ENCRYPTION_SECRET: "a".repeat(40),
      }, "KEY_ENCRYPTION_SECRET looks guessable"],
    ];
    for (const [name, env, expected] of cases) {
      await t.step(name, async () => {
        const { code, stdout, stderr } = await runMainToExit({ PORT: "0", ...env }, dir);
        assert.equal(code, 1, `${name}: ${stdout}${stderr}`);
        assert.match(stderr, new RegExp(expected.replace(/[*+?()]/g, "\\$&")));
        assert.ok(!stdout.includes("listening"), "no server started");
      });
    }
    await t.step("a master key pasted into GLM_BASE_URL is not echoed", async () => {
      const { code, stderr } = await runMainToExit({ PORT: "0", GLM_BASE_URL: MASTER_KEY }, dir);
      assert.equal(code, 1);
      assert.match(stderr, /GLM_BASE_URL must be an http\(s\) URL/);
      assert.ok(!stderr.includes(MASTER_KEY) && !stderr.includes("zzTopSecret"));
    });
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("deno task report: CSV cells cannot become formulas, the table prints no escapes", async (t) => {
  const dir = await Deno.makeTempDir();
  const kvPath = `${dir}/kv.sqlite3`;
  try {
    const kv = await Deno.openKv(kvPath);
    const hostile = [
      ["user_eq", '=HYPERLINK("http://evil")@x.test'],
      ["user_plus", "+1+1@x.test"],
      ["user_minus", "-2@x.test"],
      ["user_at", "@SUM(A1)@x.test"],
      ["user_tab", "\tcmd@x.test"],
      ["user_esc", "\u001b[2J\u001b[31mred@x.test"],
    ];
    const today = new Date().toISOString().slice(0, 10);
    for (const [id, email] of hostile) {
      await kv.set(keys.user(id), { id, email, status: "active", limits: {}, key: null });
      await recordUsage(kv, {}, {
        userId: id,
        model: "glm-4.6",
        promptTokens: 1,
        completionTokens: 1,
      });
    }
    kv.close();
    await t.step("csv", async () => {
      const r = await runReport(["--from", today, "--to", today, "--format", "csv"], kvPath);
      assert.equal(r.code, 0, r.stderr);
      for (const [, email] of hostile.slice(0, 5)) {
        const quoted = email.includes('"') ? `"'${email.replaceAll('"', '""')}"` : `'${email}`;
        assert.ok(r.stdout.includes(quoted), `${JSON.stringify(email)} in ${r.stdout}`);
      }
      for (const line of r.stdout.split("\r\n").slice(1)) {
        for (const cell of line.split(",")) assert.ok(!/^[=+\-@\t]/.test(cell), cell);
      }
    });
    await t.step("table", async () => {
      const r = await runReport(["--from", today, "--to", today], kvPath);
      assert.equal(r.code, 0, r.stderr);
      // deno-lint-ignore no-control-regex
      assert.ok(!/[\u0000-\u0008\u000b-\u001f\u007f]/.test(r.stdout), "no control characters");
      // The escapes are removed (CONTRACT §7), what they wrapped stays.
      assert.ok(r.stdout.includes("[2J[31mred@x.test"), r.stdout);
    });
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("a real server: duplicate JSON keys refused, rotation throttled, request ids its own", async (t) => {
  const dir = await Deno.makeTempDir();
  const glm = new FakeGlm();
  const app = await startMain(processEnv(`${dir}/kv.sqlite3`, glm, issuer), dir);
  try {
    const token = await issuer.token("user_sec", { ttlSeconds: 600 });
    const session = { authorization: `Bearer ${token}` };
    const { apiKey } = await (await fetch(`${app.url}/api/key`, { headers: session })).json();
    await t.step("two model keys: checked one, would forward both → 400", async () => {
      const res = await fetch(`${app.url}/v1/chat/completions`, {
        method: "POST",
        headers: { authorization: `Bearer ${apiKey}`, "content-type": "application/json" },
        body: '{"model":"glm-4.6","messages":[{"role":"user","content":"hi"}],"model":"secret-x"}',
      });
      assert.equal(res.status, 400);
      const body = await res.json();
      assert.equal(body.error.code, "invalid_request");
      assert.match(body.error.message, /"model" appears twice/);
      assert.equal(glm.count, 0);
    });
    await t.step("a client's x-request-id does not reach the logs", async () => {
      const res = await fetch(`${app.url}/v1/models`, {
        headers: { authorization: `Bearer ${apiKey}`, "x-request-id": "FORGED-LOG-ENTRY" },
      });
      assert.equal(res.status, 200);
      await res.body?.cancel();
      assert.notEqual(res.headers.get("x-request-id"), "FORGED-LOG-ENTRY");
      const res2 = await fetch(`${app.url}/api/key`, {
        headers: { ...session, "x-request-id": "FORGED-LOG-ENTRY" },
      });
      await res2.body?.cancel();
      await new Promise((r) => setTimeout(r, 100)); // access lines are flushed every 20 ms
      assert.ok(!app.output().stdout.includes("FORGED-LOG-ENTRY"));
    });
    await t.step("key rotation: 10 an hour, then 429 with Retry-After", async () => {
      const statuses: number[] = [];
      let last: Response | undefined;
      for (let i = 0; i < 11; i++) {
        last = await fetch(`${app.url}/api/key/rotate`, { method: "POST", headers: session });
        statuses.push(last.status);
        if (i < 10) await last.body?.cancel();
      }
      // Rotations already made this hour (by the clock) count; none were before this test.
      assert.deepEqual(statuses.slice(0, 10), Array(10).fill(200));
      assert.equal(statuses[10], 429);
      const retry = Number(last!.headers.get("retry-after"));
      assert.ok(retry >= 1 && retry <= 3600, String(retry));
      assert.equal((await last!.json()).error.code, "rate_limit_exceeded");
    });
  } finally {
    await app.stop();
    await glm.close();
    await Deno.remove(dir, { recursive: true });
  }
});
