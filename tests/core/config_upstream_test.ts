/** CONTRACT §2: UPSTREAM_USER_SHARE, UPSTREAM_QUEUE_MAX and COUNT_TOKENS_RPM. */
import assert from "node:assert/strict";
import { ConfigError, loadConfig } from "../../lib/core/config.ts";

function problems(env: Record<string, string>): string[] {
  try {
    loadConfig(env);
  } catch (err) {
    assert.ok(err instanceof ConfigError, `expected ConfigError, got ${err}`);
    return err.problems;
  }
  assert.fail(`no ConfigError for ${JSON.stringify(env)}`);
}

Deno.test("config: the fair-share variables default to 0.5, 1000 and 120", () => {
  const config = loadConfig({});
  assert.equal(config.glm.userShare, 0.5);
  assert.equal(config.glm.queueMax, 1000);
  assert.equal(config.countTokensRpm, 120);
});

Deno.test("config: good fair-share values are read", () => {
  const config = loadConfig({
    UPSTREAM_USER_SHARE: "1",
    UPSTREAM_QUEUE_MAX: "3",
    COUNT_TOKENS_RPM: "7",
  });
  assert.equal(config.glm.userShare, 1);
  assert.equal(config.glm.queueMax, 3);
  assert.equal(config.countTokensRpm, 7);
  assert.equal(loadConfig({ UPSTREAM_USER_SHARE: "0.25" }).glm.userShare, 0.25);
});

Deno.test("config: a bad fair-share value is one line naming its variable", async (t) => {
  const cases: Array<[string, string]> = [
    ["UPSTREAM_USER_SHARE", "0"],
    ["UPSTREAM_USER_SHARE", "-0.5"],
    ["UPSTREAM_USER_SHARE", "1.5"],
    ["UPSTREAM_USER_SHARE", "half"],
    ["UPSTREAM_QUEUE_MAX", "0"],
    ["UPSTREAM_QUEUE_MAX", "1.5"],
    ["UPSTREAM_QUEUE_MAX", "many"],
    ["COUNT_TOKENS_RPM", "0"],
    ["COUNT_TOKENS_RPM", "-3"],
  ];
  for (const [name, value] of cases) {
    await t.step(`${name}=${value}`, () => {
      const lines = problems({ [name]: value });
      assert.equal(lines.length, 1, lines.join("\n"));
      assert.ok(lines[0].includes(name), `"${lines[0]}" should name ${name}`);
    });
  }
});
