import assert from "node:assert/strict";
import { summarizeText } from "../../tasks/summarize.ts";
import type { SummarizedDay } from "../../lib/reports/summary.ts";

const day = (d: Partial<SummarizedDay> & { day: SummarizedDay["day"] }): SummarizedDay => ({
  version: 9,
  users: 1,
  requests: 9,
  totalTokens: 9_900,
  costUsd: 0.0123,
  chunks: 1,
  written: true,
  ...d,
});

Deno.test("summarize: an aligned table of the days written, with totals, in people's words", () => {
  const text = summarizeText({
    days: [
      day({ day: "2026-11-20" }),
      day({
        day: "2026-11-21",
        users: 1_204,
        requests: 1_234_567,
        totalTokens: 98_765_432,
        costUsd: 41.5,
      }),
      day({ day: "2026-11-22", users: 1, requests: 1, written: false }),
    ],
    upToDate: 1,
    alerts: [{ userId: "u", month: "2026-11", threshold: 0.8, spendUsd: 8, budgetUsd: 10 }],
    ms: 1234.4,
  });
  const lines = text.split("\n");
  assert.equal(lines[0], "Summarized 3 UTC days; 1 more already current (1,234 ms).");
  assert.match(lines[2], /^UTC day\s+Users\s+Requests\s+Tokens\s+Cost$/);
  // Every row is as wide as the header: the columns line up.
  const table = lines.slice(2, 9);
  assert.equal(new Set(table.map((l) => l.length)).size, 1, table.join("\n"));
  assert.match(lines[5], /^2026-11-21\s+1,204\s+1,234,567\s+98,765,432\s+\$41\.50$/);
  assert.match(lines[6], /^2026-11-22 \*\s+1\s+1\s+9,900\s+\$0\.01$/);
  assert.match(lines[8], /^Total\s+1,234,577\s+98,785,232\s+\$41\.52$/);
  assert.match(text, /\* Another run wrote this day's summary first/);
  assert.match(text, /1 budget alert queued/);
  // No internal words.
  assert.doesNotMatch(text, /version|chunk|\(s\)/);
});

Deno.test("summarize: nothing to do says so in one line", () => {
  assert.equal(
    summarizeText({ days: [], upToDate: 1, alerts: [], ms: 3 }),
    "Nothing to summarize: 1 UTC day with usage, every summary current (3 ms).",
  );
});
