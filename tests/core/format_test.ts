import assert from "node:assert/strict";
import {
  formatCompact,
  formatCount,
  formatInt,
  formatUsd,
  formatUsdExact,
} from "../../lib/core/format.ts";

Deno.test("formatCount: the noun agrees with the number, which has separators", () => {
  assert.equal(formatCount(0, "request"), "0 requests");
  assert.equal(formatCount(1, "request"), "1 request");
  assert.equal(formatCount(2, "user"), "2 users");
  assert.equal(formatCount(200_000, "token"), "200,000 tokens");
  assert.equal(formatCount(1, "person", "people"), "1 person");
  assert.equal(formatCount(3, "person", "people"), "3 people");
  assert.equal(formatCount(1, "output token"), "1 output token");
});

Deno.test("numbers a person reads: separators, money never rounded to free", () => {
  assert.equal(formatInt(5_817_924), "5,817,924");
  assert.equal(formatCompact(9_999), "9,999");
  assert.equal(formatCompact(16_300), "16.3K");
  assert.equal(formatUsd(0.004), "<$0.01");
  assert.equal(formatUsd(1234.5), "$1,234.50");
  assert.equal(formatUsdExact(0.000044), "$0.000044");
  assert.equal(formatUsdExact(1250), "$1,250.00");
});
