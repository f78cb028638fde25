/** SUPPORT_URL (CONTRACT §2): an https:// page or a mailto: address, else one line naming it. */
import assert from "node:assert/strict";
import { ConfigError, loadConfig } from "../../lib/core/config.ts";

Deno.test("config: SUPPORT_URL takes an https page or a mailto address", async (t) => {
  await t.step("unset: none", () => {
    assert.equal(loadConfig({}).supportUrl, null);
    assert.equal(loadConfig({ SUPPORT_URL: "  " }).supportUrl, null);
  });
  await t.step("accepted as given", () => {
    for (const url of ["https://help.example.com/keyway", "mailto:help@example.com"]) {
      assert.equal(loadConfig({ SUPPORT_URL: url }).supportUrl, url);
    }
  });
  await t.step("anything else: one problem naming the variable, the value not echoed", () => {
    for (
      const bad of [
        "http://help.example.com",
        "ops@example.org",
        "javascript:alert(1)",
        "mailto:",
        "ftp://x",
      ]
    ) {
      try {
        loadConfig({ SUPPORT_URL: bad });
        assert.fail(`accepted ${bad}`);
      } catch (err) {
        assert.ok(err instanceof ConfigError, String(err));
        assert.equal(err.problems.length, 1, err.message);
        assert.match(
          err.problems[0],
          /^SUPPORT_URL must be an https:\/\/ page or a mailto: address/,
        );
        if (bad.length > 8) assert.ok(!err.message.includes(bad), err.message);
      }
    }
  });
});
