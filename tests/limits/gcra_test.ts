/** The GCRA behind rpm and the day counter behind rpd, decided from a state and a clock. */
import assert from "node:assert/strict";
import { decideRate, type RateState, rateView } from "../../lib/limits/gcra.ts";
import { limits, NOON } from "../support/ledger_fixtures.ts";

Deno.test("GCRA: a fresh allowance of rpm admits exactly rpm, then one per interval", () => {
  for (const rpm of [1, 5, 7, 13, 60, 997]) {
    let state: RateState | null = null;
    let admitted = 0;
    for (let i = 0; i < rpm + 5; i++) {
      const d = decideRate(state, limits(rpm), NOON);
      if (d.allowed) {
        admitted++;
        state = d.next;
      }
    }
    assert.equal(admitted, rpm, `rpm ${rpm}`);
  }
  // rpm 5: interval 12 s. Full at NOON; the next slot opens 12 s later, not before.
  let state: RateState | null = null;
  for (let i = 0; i < 5; i++) state = decideRate(state, limits(5), NOON).next;
  const refused = decideRate(state, limits(5), NOON);
  assert.equal(refused.allowed, false);
  assert.equal(refused.retryAfter, 12);
  assert.equal(decideRate(state, limits(5), NOON + 11_999).allowed, false);
  const later = decideRate(state, limits(5), NOON + 12_000);
  assert.equal(later.allowed, true);
  assert.equal(later.after.remainingMinute, 0);
  // A minute of quiet refills the whole allowance, and no more.
  assert.equal(rateView(state, limits(5), NOON + 60_000).remainingMinute, 5);
  assert.equal(rateView(state, limits(5), NOON + 600_000).remainingMinute, 5);
});

Deno.test("GCRA: an operator's rpm change applies at once, the requests already made still count", () => {
  const after = (rpm: number, n: number) => {
    let state: RateState | null = null;
    for (let i = 0; i < n; i++) state = decideRate(state, limits(rpm), NOON).next;
    return state;
  };
  // Raised from 2 to 60 after 2 requests: 58 left now, not the 3 the old pace refilled.
  const slow = after(2, 2);
  assert.equal(rateView(slow, limits(60), NOON + 1_000).remainingMinute, 58);
  assert.equal(decideRate(slow, limits(60), NOON + 1_000).after.remainingMinute, 57);
  // Lowered from 60 to 10 after 30 requests: none left, and a full minute to wait at most.
  const busy = after(60, 30);
  const lowered = decideRate(busy, limits(10), NOON);
  assert.equal(lowered.allowed, false);
  assert.ok(lowered.retryAfter <= 6, `retry after ${lowered.retryAfter} s`);
  assert.equal(rateView(busy, limits(10), NOON + 60_000).remainingMinute, 10);
  // The same rpm: nothing changes.
  assert.equal(rateView(after(5, 5), limits(5), NOON).remainingMinute, 0);
});

Deno.test("day counter: exact, and starts over at 00:00 UTC", () => {
  let state: RateState | null = null;
  const lim = limits(1000, 3);
  for (let i = 0; i < 3; i++) {
    const d = decideRate(state, lim, NOON);
    assert.equal(d.allowed, true);
    state = d.next;
  }
  const refused = decideRate(state, lim, NOON);
  assert.equal(refused.allowed, false);
  assert.equal(refused.retryAfter, 12 * 3600);
  const tomorrow = decideRate(state, lim, NOON + 12 * 3600_000);
  assert.equal(tomorrow.allowed, true);
  assert.equal(tomorrow.next.dayCount, 1);
});
