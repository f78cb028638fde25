/** How limits are worded: OpenAI-style durations, and when a quota reservation is refused. */
import assert from "node:assert/strict";
import { quotaRefusal } from "../../lib/limits/policy.ts";
import { type EffectiveLimits, formatDuration } from "../../lib/limits/policy.ts";
import { NOON } from "../support/ledger_fixtures.ts";

Deno.test("formatDuration is OpenAI-style", () => {
  assert.equal(formatDuration(0), "0s");
  assert.equal(formatDuration(20), "20ms");
  assert.equal(formatDuration(1000), "1s");
  assert.equal(formatDuration(1500), "1.5s");
  assert.equal(formatDuration(12_000), "12s");
  assert.equal(formatDuration(60_000), "1m0s");
  assert.equal(formatDuration(90_500), "1m31s");
  assert.equal(formatDuration(5 * 3600_000 + 3 * 60_000), "5h3m0s");
});

Deno.test("quotas: a reservation must fit what is left; in-flight reservations only delay", () => {
  const lim: EffectiveLimits = { rpm: 1, rpd: 1, tokensPerDay: 100, budgetUsdMonthly: 2 };
  const at = (f: Partial<Parameters<typeof quotaRefusal>[3]>) =>
    quotaRefusal(lim, NOON, {}, {
      usedTokens: 0,
      usedNano: 0,
      heldTokens: 0,
      heldNano: 0,
      reserveTokens: 0,
      reserveNano: 0,
      reserveOutput: 0,
      ...f,
    });
  assert.equal(at({ usedTokens: 99 }), null, "nothing reserved: refused only once reached");
  assert.equal(at({ usedTokens: 60, reserveTokens: 40 }), null, "fits exactly");
  const spent = at({ usedTokens: 100 });
  assert.equal(spent?.code, "quota_exceeded");
  assert.equal(spent?.headers["retry-after"], String(12 * 3600));
  assert.equal(spent?.headers["x-should-retry"], "false");
  const tooBig = at({ usedTokens: 60, reserveTokens: 41, reserveOutput: 30 });
  assert.equal(tooBig?.headers["x-should-retry"], "false");
  assert.match(tooBig!.message, /reserves 41 tokens .*up to 30 output tokens.* 40 tokens of/);
  // One token left: the noun and the verb agree.
  const one = at({ usedTokens: 99, reserveTokens: 2, reserveOutput: 1 });
  assert.match(one!.message, /up to 1 output token\) but 1 token of .* is left;/);
  // Fits alone, not beside requests in flight: they settle soon, so retry in a second.
  const busy = at({ usedTokens: 50, heldTokens: 30, reserveTokens: 30 });
  assert.equal(busy?.code, "quota_exceeded");
  assert.equal(busy?.headers["retry-after"], "1");
  assert.equal(busy?.headers["x-should-retry"], undefined);
  assert.equal(at({ usedNano: 1_999_999_999 }), null);
  const budget = at({ usedNano: 2_000_000_000 });
  assert.equal(budget?.code, "quota_exceeded");
  // Nov 25 12:00 → Dec 1 00:00 = 5.5 days.
  assert.equal(budget?.headers["retry-after"], String(5.5 * 86_400));
});
