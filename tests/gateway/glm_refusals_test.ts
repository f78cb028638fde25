/**
 * GLM's refusals of the operator's account (CONTRACT §5 "Upstream refusals"): answered as
 * Keyway's own 503, not counted, GLM's words kept for the operator's log.
 */
import assert from "node:assert/strict";
import { GLM_REFUSALS, type GlmRefusal } from "../../testing/fakes/glm.ts";
import { serveGateway } from "../support/helpers.ts";
import { post } from "../support/gateway_setup.ts";

Deno.test("GLM's refusals of the operator's account: Keyway's own 503, nothing counted, GLM's words kept from users", async (t) => {
  // One pool key: a refused key is left out for UPSTREAM_KEY_COOLDOWN_MS (here the least, 1 s).
  const s = await serveGateway(
    { RATE_LIMIT_RPM: "3", UPSTREAM_KEY_COOLDOWN_MS: "1000" },
    "user_refusals",
  );
  try {
    const cases: Array<[GlmRefusal, number, string]> = [
      ["balance", 503, "upstream_unavailable"],
      ["key_rejected", 503, "upstream_unavailable"],
      ["concurrency", 503, "upstream_busy"],
      ["frequency", 503, "upstream_busy"],
    ];
    for (const [refusal, status, code] of cases) {
      await t.step(`GLM ${GLM_REFUSALS[refusal].code} → ${status} ${code}`, async () => {
        s.fake.refusal = refusal;
        const res = await post(s.url, s.apiKey);
        assert.equal(res.status, status);
        assert.match(res.headers.get("content-type") ?? "", /application\/json/);
        const text = await res.text();
        const body = JSON.parse(text);
        assert.equal(body.error.code, code);
        assert.match(body.error.message, /Nothing was counted/);
        // GLM's own message ("recharge your account") never reaches the user.
        assert.ok(!text.includes(GLM_REFUSALS[refusal].message), text);
        assert.ok(!text.includes(GLM_REFUSALS[refusal].code), text);
        if (code === "upstream_busy") assert.match(res.headers.get("retry-after") ?? "", /^\d+$/);
        // The account's refusals need the operator: SDKs are told not to retry them at once.
        assert.equal(
          res.headers.get("x-should-retry"),
          code === "upstream_unavailable" ? "false" : null,
        );
        // Given back to rpm 3, and the answer's headers say so.
        assert.equal(res.headers.get("x-ratelimit-remaining-requests"), "3");
        // The operator's log has GLM's code and words.
        assert.ok(
          s.app.logs.some((l) =>
            l.includes(`"upstreamCode":"${GLM_REFUSALS[refusal].code}"`) &&
            l.includes(GLM_REFUSALS[refusal].message)
          ),
        );
        // The only key was left out of the pool: back in service after its cool-down.
        if (code === "upstream_unavailable") await new Promise((r) => setTimeout(r, 1_100));
      });
    }
    await t.step(
      "none of those counted: not a request, not a token, not against rpm 3",
      async () => {
        assert.deepEqual(await s.today(), {
          requests: 0,
          promptTokens: 0,
          completionTokens: 0,
          totalTokens: 0,
          costUsd: 0,
        });
        s.fake.refusal = null;
        const statuses = [];
        for (let i = 0; i < 4; i++) {
          const res = await post(s.url, s.apiKey);
          await res.body?.cancel();
          statuses.push(res.status);
        }
        assert.deepEqual(statuses, [200, 200, 200, 429]);
      },
    );
    await t.step("the Anthropic endpoint answers in Anthropic's shape", async () => {
      s.fake.refusal = "balance";
      // The minute's allowance is spent by now: a fresh user.
      const { apiKey } = await s.app.services.users.provision("user_anthropic");
      const res = await post(s.url, apiKey, {
        model: "glm-4.6",
        max_tokens: 10,
        messages: [{ role: "user", content: "hi" }],
      }, "/v1/messages");
      assert.equal(res.status, 503);
      const body = await res.json();
      assert.equal(body.type, "error");
      assert.equal(body.error.type, "overloaded_error");
      assert.equal(body.error.code, "upstream_unavailable");
      await new Promise((r) => setTimeout(r, 1_100)); // the key's cool-down
    });
    await t.step(
      "the user's own mistake (1214) is relayed with GLM's status and body",
      async () => {
        s.fake.refusal = "bad_parameter";
        // The minute's allowance is spent by now: a fresh user.
        const { apiKey } = await s.app.services.users.provision("user_mistake");
        const res = await post(s.url, apiKey);
        assert.equal(res.status, 400);
        assert.equal((await res.json()).error.code, "1214");
      },
    );
  } finally {
    await s.close();
  }
});
