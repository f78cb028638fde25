/** The shapes of usage totals and their sums, for pages (pure: islands import it). */

/** Requests, tokens and cost over some span: the one totals shape of the API, pages and reports. */
export interface UsageTotals {
  requests: number;
  promptTokens: number;
  completionTokens: number;
  totalTokens: number;
  costUsd: number;
}

/** Requests, tokens and cost over a window: the operator's `usage30d` shape. */
export interface WindowTotals {
  requests: number;
  totalTokens: number;
  costUsd: number;
}

/** Adds up days (or any rows) of usage. */
export function sumUsage(rows: readonly WindowTotals[]): WindowTotals {
  const total = { requests: 0, totalTokens: 0, costUsd: 0 };
  for (const r of rows) {
    total.requests += r.requests;
    total.totalTokens += r.totalTokens;
    total.costUsd += r.costUsd;
  }
  return total;
}
