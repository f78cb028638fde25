/**
 * Every number and date a person reads, formatted one way (pages, islands, the report CLI):
 * `Intl.NumberFormat("en-US")` and `Intl.DateTimeFormat` in UTC. No dependencies, so islands
 * import it as they are. Machine-readable output (JSON, CSV) keeps raw numbers.
 *
 * Rules:
 * - counts and tokens: whole numbers with separators ("16,300"); the compact form ("16.3K") only
 *   on chart axes, where space demands it; a count with its noun agrees with it ("1 request",
 *   "2 requests"): `formatCount`;
 * - money: dollars and cents ("$1,234.56"); a non-zero amount below a cent is "<$0.01" (never
 *   "$0.00", which would say it was free); aligned report columns use `formatUsdFixed`;
 * - a limit of null is "Unlimited", in words;
 * - dates in UTC, always labelled so.
 */

const INT = new Intl.NumberFormat("en-US", { maximumFractionDigits: 0 });
const COMPACT = new Intl.NumberFormat("en-US", {
  notation: "compact",
  maximumFractionDigits: 1,
});
const USD = new Intl.NumberFormat("en-US", {
  style: "currency",
  currency: "USD",
  minimumFractionDigits: 2,
  maximumFractionDigits: 2,
});
const FIXED = new Map<number, Intl.NumberFormat>();

/** A count: "3,977". */
export function formatInt(n: number): string {
  return INT.format(n);
}

/** A count and its noun, singular for exactly one: "1 request", "16,300 tokens", "2 people". */
export function formatCount(n: number, singular: string, plural = `${singular}s`): string {
  return `${INT.format(n)} ${n === 1 ? singular : plural}`;
}

/** Tokens: the same as counts, so neighbouring figures always agree. */
export const formatTokens = formatInt;

/** Axis labels only: "16.3K", whole numbers below 10,000. */
export function formatCompact(n: number): string {
  return Math.abs(n) >= 10_000 ? COMPACT.format(n) : INT.format(n);
}

/**
 * Money for people, the same on every page, table and task: "$1,234.56", "<$0.01" for a
 * non-zero amount under a cent (never rounded up to a cent it is not), "$0.00".
 */
export function formatUsd(n: number): string {
  if (n > 0 && n < 0.01) return "<$0.01";
  return USD.format(n);
}

const USD_EXACT = new Intl.NumberFormat("en-US", {
  style: "currency",
  currency: "USD",
  minimumFractionDigits: 2,
  maximumFractionDigits: 6,
});

/**
 * Money to the millionth of a dollar, for messages about limits where "<$0.01" would hide the
 * figure: "$0.000044", "$1,250.00".
 */
export function formatUsdExact(n: number): string {
  return USD_EXACT.format(n);
}

/** Money with a fixed number of decimals, for columns that must line up (report table). */
export function formatUsdFixed(n: number, decimals: number): string {
  let format = FIXED.get(decimals);
  if (!format) {
    format = new Intl.NumberFormat("en-US", {
      style: "currency",
      currency: "USD",
      minimumFractionDigits: decimals,
      maximumFractionDigits: decimals,
    });
    FIXED.set(decimals, format);
  }
  return format.format(n);
}

/** A limit: the formatted number, or "Unlimited" when there is none. */
export function formatLimit(limit: number | null, format: (n: number) => string = formatInt) {
  return limit === null ? "Unlimited" : format(limit);
}

const DAY = new Intl.DateTimeFormat("en-US", { month: "short", day: "numeric", timeZone: "UTC" });
const DATE = new Intl.DateTimeFormat("en-US", {
  year: "numeric",
  month: "short",
  day: "numeric",
  timeZone: "UTC",
});
const DATE_TIME = new Intl.DateTimeFormat("en-US", {
  year: "numeric",
  month: "short",
  day: "numeric",
  hour: "2-digit",
  minute: "2-digit",
  hourCycle: "h23",
  timeZone: "UTC",
});

const toDate = (value: string | number | Date) =>
  value instanceof Date ? value : new Date(
    typeof value === "string" && /^\d{4}-\d{2}-\d{2}$/.test(value) ? `${value}T00:00:00Z` : value,
  );

/** A UTC day, short: "Nov 26". Takes "YYYY-MM-DD", an ISO time or ms. */
export function formatDay(value: string | number | Date): string {
  return DAY.format(toDate(value));
}

/** A UTC date: "Nov 26, 2026". */
export function formatDate(value: string | number | Date): string {
  return DATE.format(toDate(value));
}

/** A UTC date and time: "Nov 26, 2026, 05:45 UTC". */
export function formatDateTime(value: string | number | Date): string {
  return `${DATE_TIME.format(toDate(value))} UTC`;
}

/** A wait for people: "45 min", "3 h 5 min", "4 days". */
export function formatWait(ms: number): string {
  const minutes = Math.max(1, Math.ceil(ms / 60_000));
  if (minutes < 60) return `${minutes} min`;
  const hours = Math.floor(minutes / 60);
  if (hours < 48) {
    const rest = minutes % 60;
    return rest ? `${hours} h ${rest} min` : `${hours} h`;
  }
  return `${Math.round(hours / 24)} days`;
}

const LOG_TIME = new Intl.DateTimeFormat("en-US", {
  month: "short",
  day: "numeric",
  hour: "2-digit",
  minute: "2-digit",
  second: "2-digit",
  hourCycle: "h23",
  timeZone: "UTC",
});

/** A moment in a log, to the second: "Dec 6, 14:02:05" (UTC). */
export function formatLogTime(value: string | number | Date): string {
  return LOG_TIME.format(toDate(value));
}

/** A duration for people: "850 ms", "2.4 s", "3 min 5 s". */
export function formatDuration(ms: number): string {
  if (ms < 1000) return `${formatInt(Math.round(ms))} ms`;
  if (ms < 60_000) return `${(Math.round(ms / 100) / 10).toFixed(1)} s`;
  const s = Math.round(ms / 1000);
  return `${Math.floor(s / 60)} min ${s % 60} s`;
}

/** How long ago, for people: "12 seconds ago", "3 min ago", "2 h 5 min ago". */
export function formatAgo(ms: number): string {
  const seconds = Math.max(0, Math.floor(ms / 1000));
  if (seconds < 60) return `${formatCount(seconds, "second")} ago`;
  return `${formatWait(Math.floor(ms / 60_000) * 60_000)} ago`;
}

/**
 * Text from people's input (e-mails, ids, model names) made safe to print or export: control
 * characters (terminal escape sequences among them), the bidi embeddings, overrides and isolates
 * (U+202A–202E, U+2066–2069, which reorder what a terminal or spreadsheet shows) and the line and
 * paragraph separators removed.
 */
export function printable(text: string): string {
  // deno-lint-ignore no-control-regex
  return text.replace(/[\u0000-\u001f\u007f-\u009f\u2028\u2029\u202a-\u202e\u2066-\u2069]/g, "");
}
