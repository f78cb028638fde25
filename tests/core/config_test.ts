import assert from "node:assert/strict";
import { ConfigError, loadConfig } from "../../lib/core/config.ts";
import { ClerkIssuer } from "../../testing/fakes/clerk_issuer.ts";
import { runMainToExit } from "../support/subprocess.ts";

const issuer = await ClerkIssuer.create();
const GOOD_SECRET = "a-perfectly-good-encryption-secret-0123456789";

/** The problems loadConfig reports for an environment (fails if it does not throw). */
function problems(env: Record<string, string>): string[] {
  try {
    loadConfig(env);
  } catch (err) {
    assert.ok(err instanceof ConfigError, `expected ConfigError, got ${err}`);
    assert.equal(err.message.split("\n").length, err.problems.length + 1);
    return err.problems;
  }
  assert.fail(`no ConfigError for ${JSON.stringify(env)}`);
}

Deno.test("config: each bad value is one line naming its variable", async (t) => {
  const cases: Array<[Record<string, string>, string]> = [
    [{ PORT: "abc" }, "PORT"],
    [{ PORT: "70000" }, "PORT"],
    [{ PORT: "80.5" }, "PORT"],
    [{ KEY_MODE: "weird" }, "KEY_MODE"],
    [{ PRICING: "not json" }, "PRICING"],
    [{ PRICING: '{"glm-4.6": {"input": "cheap"}}' }, "PRICING"],
    [{ PRICING: '{"glm-4.6": {"input": 1, "output": 2, "cachedInput": -1}}' }, "PRICING"],
    [{ MODEL_ALIASES: "claude=glm" }, "MODEL_ALIASES"],
    [{ MODEL_ALIASES: '{"claude-*": 5}' }, "MODEL_ALIASES"],
    [{ GLM_ANTHROPIC_BASE_URL: "anthropic" }, "GLM_ANTHROPIC_BASE_URL"],
    [{ CONCURRENCY_LIMIT: "0" }, "CONCURRENCY_LIMIT"],
    [{ OUTPUT_RESERVE_TOKENS: "many" }, "OUTPUT_RESERVE_TOKENS"],
    [{ RATE_LIMIT_RPM: "-1" }, "RATE_LIMIT_RPM"],
    [{ RATE_LIMIT_RPM: "0" }, "RATE_LIMIT_RPM"],
    [{ RATE_LIMIT_RPD: "lots" }, "RATE_LIMIT_RPD"],
    [{ TOKEN_LIMIT_DAILY: "-5" }, "TOKEN_LIMIT_DAILY"],
    [{ BUDGET_USD_MONTHLY: "free" }, "BUDGET_USD_MONTHLY"],
    [{ UPSTREAM_TIMEOUT_MS: "0" }, "UPSTREAM_TIMEOUT_MS"],
    [{ MAX_REQUEST_BYTES: "32MiB" }, "MAX_REQUEST_BYTES"],
    [{ MAX_REQUEST_BYTES: "0" }, "MAX_REQUEST_BYTES"],
    [{ CLERK_JWT_KEY: "garbage" }, "CLERK_JWT_KEY"],
    [{ CLERK_PUBLISHABLE_KEY: "pk_nope" }, "CLERK_PUBLISHABLE_KEY"],
    [{ CLERK_SECRET_KEY: "not-a-secret-key" }, "CLERK_SECRET_KEY"],
    [{ CLERK_WEBHOOK_SECRET: "whsec_ok whsec_b@d!" }, "CLERK_WEBHOOK_SECRET"],
    [{ CLERK_API_URL: "ftp://clerk" }, "CLERK_API_URL"],
    [{ PUBLIC_URL: "not a url" }, "PUBLIC_URL"],
    [{ GLM_BASE_URL: "bigmodel" }, "GLM_BASE_URL"],
    [{ KEY_ENCRYPTION_SECRET: "too-short" }, "KEY_ENCRYPTION_SECRET"],
    [{ COST_CRON: "hourly" }, "COST_CRON"],
    [{ KEY_MODE: "shared" }, "GLM_API_KEY"],
    [{ REQUEST_LOG_DAYS: "-1" }, "REQUEST_LOG_DAYS"],
    [{ REQUEST_LOG_DAYS: "two weeks" }, "REQUEST_LOG_DAYS"],
    [{ REQUEST_LOG_DAYS: "3651" }, "REQUEST_LOG_DAYS"],
    [{ METRICS_TOKEN: "short" }, "METRICS_TOKEN"],
    [{ METRICS_TOKEN: "has a space in it somewhere" }, "METRICS_TOKEN"],
  ];
  for (const [env, variable] of cases) {
    await t.step(`${Object.entries(env).map(([k, v]) => `${k}=${v}`).join(" ")}`, () => {
      const lines = problems(env);
      assert.equal(lines.length, 1, lines.join("\n"));
      assert.ok(lines[0].includes(variable), `"${lines[0]}" should name ${variable}`);
    });
  }

  await t.step("several bad values: one line each", () => {
    const lines = problems({ PORT: "abc", KEY_MODE: "weird", RATE_LIMIT_RPM: "-1" });
    assert.equal(lines.length, 3);
    for (const name of ["PORT", "KEY_MODE", "RATE_LIMIT_RPM"]) {
      assert.equal(lines.filter((l) => l.includes(name)).length, 1, name);
    }
  });

  await t.step("secret values never appear in the message", () => {
    const secrets = {
      KEY_ENCRYPTION_SECRET: "short-SECRET-xyz",
      CLERK_SECRET_KEY: "sk_nottherightshape_SECRET",
      CLERK_WEBHOOK_SECRET: "whsec_SECRET!!",
      CLERK_JWT_KEY: "SECRET-jwt-key-material",
    };
    let message = "";
    try {
      loadConfig(secrets);
    } catch (err) {
      assert.ok(err instanceof ConfigError);
      message = err.message;
    }
    assert.equal(message.split("\n").length, 5);
    for (const [name, value] of Object.entries(secrets)) {
      assert.ok(message.includes(name), name);
      assert.ok(!message.includes(value), `${name}'s value leaked`);
    }
  });
});

Deno.test("config: production needs Clerk and KEY_ENCRYPTION_SECRET", async (t) => {
  const prods: Record<string, string>[] = [{ APP_ENV: "production" }, {
    DENO_DEPLOYMENT_ID: "dpl_123",
  }];
  for (const prod of prods) {
    await t.step(`${Object.keys(prod)[0]} with nothing else`, () => {
      const lines = problems(prod);
      assert.equal(lines.length, 2, lines.join("\n"));
      assert.ok(lines.some((l) => l.includes("CLERK_JWT_KEY") && l.includes("CLERK_SECRET_KEY")));
      assert.ok(lines.some((l) => l.includes("KEY_ENCRYPTION_SECRET")));
    });
  }
  await t.step("production with Clerk but no encryption secret", () => {
    const lines = problems({ APP_ENV: "production", CLERK_JWT_KEY: issuer.publicKeyPem });
    assert.equal(lines.length, 1);
    assert.match(lines[0], /KEY_ENCRYPTION_SECRET/);
  });
  await t.step("Clerk mode outside production also needs it", () => {
    const lines = problems({ CLERK_SECRET_KEY: "sk_test_abc123" });
    assert.deepEqual(lines.map((l) => l.includes("KEY_ENCRYPTION_SECRET")), [true]);
  });
  await t.step("production with both is accepted, not in local mode", () => {
    const config = loadConfig({
      APP_ENV: "production",
      CLERK_JWT_KEY: issuer.publicKeyPem,
      KEY_ENCRYPTION_SECRET: GOOD_SECRET,
    });
    assert.equal(config.production, true);
    assert.equal(config.localMode, false);
  });
});

Deno.test("config: defaults and parsing of good values", () => {
  const local = loadConfig({});
  assert.equal(local.port, 8000);
  assert.equal(local.publicUrl, "http://localhost:8000");
  assert.equal(local.localMode, true);
  assert.equal(local.keyMode, "proxy");
  assert.deepEqual(local.limits, { rpm: 60, rpd: 1000, tokensPerDay: 0, budgetUsdMonthly: 0 });
  assert.equal(local.clerk.apiUrl, "https://api.clerk.com");
  assert.deepEqual(local.clerk.authorizedParties, ["http://localhost:8000"]);
  assert.equal(local.costCron, "0 * * * *");
  assert.equal(local.maxRequestBytes, 32 * 1024 * 1024, "MAX_REQUEST_BYTES: 32 MiB by default");
  assert.equal(local.requestLogDays, 14, "REQUEST_LOG_DAYS: 14 by default");
  assert.equal(local.metricsToken, undefined, "no METRICS_TOKEN: /metrics is off");
  assert.equal(loadConfig({ REQUEST_LOG_DAYS: "0" }).requestLogDays, 0, "0: no log");
  assert.equal(
    loadConfig({ METRICS_TOKEN: "scrape-0123456789abcdef" }).metricsToken,
    "scrape-0123456789abcdef",
  );

  const set = loadConfig({
    PORT: "9001",
    PUBLIC_URL: "https://keyway.example/",
    CLERK_JWT_KEY: issuer.publicKeyPem.replaceAll("\n", "\\n"),
    CLERK_WEBHOOK_SECRET: " whsec_abc  whsec_def ",
    CLERK_AUTHORIZED_PARTIES: "https://a.example, https://b.example",
    KEY_ENCRYPTION_SECRET: GOOD_SECRET,
    RATE_LIMIT_RPM: "5",
    MAX_REQUEST_BYTES: "200000",
    ALLOWED_MODELS: "*",
    PRICING: '{"glm-x": {"input": 1, "output": 2}}',
  });
  assert.equal(set.port, 9001);
  assert.equal(set.publicUrl, "https://keyway.example");
  assert.equal(set.clerk.jwtKey, issuer.publicKeyPem, "escaped newlines in a PEM are restored");
  assert.deepEqual(set.clerk.webhookSecrets, ["whsec_abc", "whsec_def"]);
  assert.deepEqual(set.clerk.authorizedParties, ["https://a.example", "https://b.example"]);
  assert.equal(set.limits.rpm, 5);
  assert.equal(set.maxRequestBytes, 200_000);
  assert.equal(set.allowAnyModel, true);
  assert.deepEqual(set.pricing, { "glm-x": { input: 1, output: 2 } });
});

Deno.test("main.ts with a bad variable exits 1 naming it, without printing secrets", async () => {
  const cwd = await Deno.makeTempDir({ prefix: "keyway_config_" });
  try {
    const secrets = {
      GLM_API_KEY: "glm-master-SECRET-value-0123456789",
      KEY_ENCRYPTION_SECRET: "too-short-SECRET",
      CLERK_SECRET_KEY: "sk_test_SECRETclerkkey0123456789",
    };
    const { code, stdout, stderr } = await runMainToExit(
      { ...secrets, PORT: "abc", RATE_LIMIT_RPM: "-1", DENO_KV_PATH: ":memory:" },
      cwd,
    );
    assert.equal(code, 1, stderr);
    const lines = stderr.trim().split("\n");
    assert.ok(lines.some((l) => /PORT/.test(l)), stderr);
    assert.ok(lines.some((l) => /RATE_LIMIT_RPM/.test(l)), stderr);
    assert.ok(lines.some((l) => /KEY_ENCRYPTION_SECRET/.test(l)), stderr);
    assert.ok(!/error: Uncaught|at .*main\.ts/.test(stderr), "a clean message, not a stack trace");
    for (const [name, value] of Object.entries(secrets)) {
      assert.ok(!stdout.includes(value) && !stderr.includes(value), `${name} was printed`);
    }
    // It stopped before opening KV: nothing was written to the working directory.
    assert.deepEqual(await Array.fromAsync(Deno.readDir(cwd)), []);
  } finally {
    await Deno.remove(cwd, { recursive: true });
  }
});

Deno.test("a KV Connect URL needs its access token", () => {
  assert.throws(
    () => loadConfig({ DENO_KV_PATH: "https://kv.example.com/db" }),
    /DENO_KV_ACCESS_TOKEN is required/,
  );
  const config = loadConfig({
    DENO_KV_PATH: "https://kv.example.com/db",
    DENO_KV_ACCESS_TOKEN: "token-0123456789",
  });
  assert.equal(config.kvAccessToken, "token-0123456789");
});

Deno.test("DENO_KV_PATH: a URL other than http(s) is refused, naming the variable", () => {
  for (const path of ["ftp://kv.example.com/db", "file:///tmp/kv.sqlite3"]) {
    assert.throws(() => loadConfig({ DENO_KV_PATH: path }), /DENO_KV_PATH must be a file path/);
  }
  assert.equal(loadConfig({ DENO_KV_PATH: "./data/k.sqlite3" }).kvPath, "./data/k.sqlite3");
});
