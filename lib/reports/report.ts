/**
 * Usage and cost reports (CONTRACT §7): reads each day from its summary when that is current,
 * else from the live day-major counters (always for today), and renders table, JSON or CSV.
 */
import { z } from "zod";
import { flagIssue, parseFlags, UsageError } from "../core/cli.ts";
import { systemClock } from "../core/clock.ts";
import { formatCount, formatInt, formatUsd, printable } from "../core/format.ts";
import { keys, u64 } from "../core/kv.ts";
import { getManyChunked } from "../core/kv_ops.ts";
import { costUsd, priceOf, type Pricing, roundUsd } from "../usage/pricing.ts";
import { readDaySummary, type SummaryMeta } from "./summary.ts";
import { clip, renderTable } from "./text_table.ts";
import { readDayCounters, type UsageRow } from "../usage/read.ts";
import type { UsageTotals } from "../usage/totals.ts";
import type { UserRecord } from "../identity/users.ts";
import { addDays, type Day, DAY_MS, isDay, utcDay } from "../core/utc.ts";

export interface UserLine extends UsageTotals {
  userId: string;
  email: string | null;
}

export interface ModelLine extends UsageTotals {
  model: string;
  priced: boolean;
}

export interface DayUserLine extends UserLine {
  date: Day;
}

export interface Report {
  from: Day;
  to: Day;
  users: UserLine[];
  models: ModelLine[];
  totals: UsageTotals;
  /** One line per user and day (for CSV); empty unless asked for with `perDay`. */
  daily: DayUserLine[];
  /** Where each day with usage was read from. */
  sources: { summary: number; live: number };
}

export interface ReportQuery {
  from: Day;
  to: Day;
  userId?: string;
  perDay?: boolean;
  now?: number;
  onProgress?: (p: { day: Day; index: number; total: number }) => void;
}

const READ_CONCURRENCY = 4;

/** Builds the report over [from, to] (inclusive UTC days), reading only days that had usage. */
export async function buildReport(
  kv: Deno.Kv,
  pricing: Pricing,
  query: ReportQuery,
): Promise<Report> {
  const today = utcDay(query.now ?? systemClock());
  // The version index has one entry per day with usage: a range read skips empty days cheaply.
  const days: { day: Day; version: number }[] = [];
  for await (
    const entry of kv.list({
      start: keys.usageDayVersion(query.from),
      end: keys.usageDayVersion(addDays(query.to, 1)),
    })
  ) {
    const day = entry.key[1];
    if (typeof day === "string") days.push({ day, version: u64(entry.value) });
  }
  const metas = new Map<Day, SummaryMeta | null>();
  if (query.userId === undefined) {
    const closed = days.filter((d) => d.day < today);
    const entries = await getManyChunked<SummaryMeta>(
      kv,
      closed.map((d) => keys.costSummaryMeta(d.day)),
    );
    closed.forEach((d, j) => metas.set(d.day, entries[j].value));
  }

  const byUserModel = new Map<string, Map<string, UsageRow>>();
  const daily: { date: Day; userId: string; rows: UsageRow[] }[] = [];
  const sources = { summary: 0, live: 0 };
  const readDay = async (day: Day, version: number): Promise<UsageRow[]> => {
    const meta = metas.get(day);
    // One user's rows are a short prefix read; summaries only pay off over everyone.
    if (day < today && query.userId === undefined && meta) {
      const rows = await readDaySummary(kv, day, version, meta);
      if (rows) {
        sources.summary++;
        return rows;
      }
    }
    sources.live++;
    return await readDayCounters(kv, day, query.userId);
  };
  const addDay = (day: Day, rows: UsageRow[]) => {
    let dayUser: { date: Day; userId: string; rows: UsageRow[] } | undefined;
    for (const row of rows) {
      let models = byUserModel.get(row.userId);
      if (!models) byUserModel.set(row.userId, models = new Map());
      const acc = models.get(row.model);
      if (acc) addInto(acc, row);
      else models.set(row.model, { ...row });
      if (query.perDay) {
        if (dayUser?.userId !== row.userId) {
          dayUser = { date: day, userId: row.userId, rows: [] };
          daily.push(dayUser);
        }
        dayUser.rows.push(row);
      }
    }
  };
  // A few days in flight at once: KV reads overlap (a remote KV's round trips most of all).
  let next = 0;
  let done = 0;
  const worker = async () => {
    while (next < days.length) {
      const { day, version } = days[next++];
      addDay(day, await readDay(day, version));
      query.onProgress?.({ day, index: done++, total: days.length });
    }
  };
  await Promise.all(Array.from({ length: Math.min(READ_CONCURRENCY, days.length) }, worker));

  const emails = await lookUpEmails(kv, [...byUserModel.keys()]);
  const modelRows = new Map<string, UsageRow>();
  const users: UserLine[] = [];
  for (const [userId, models] of byUserModel) {
    const rows = [...models.values()];
    users.push({ userId, email: emails.get(userId) ?? null, ...totalsOf(pricing, rows) });
    for (const row of rows) {
      const acc = modelRows.get(row.model);
      if (acc) addInto(acc, row);
      else modelRows.set(row.model, { ...row });
    }
  }
  const models: ModelLine[] = [...modelRows.values()].map((row) => ({
    model: row.model,
    ...totalsOf(pricing, [row]),
    priced: priceOf(pricing, row.model) !== undefined,
  }));
  const byCost = <T extends UsageTotals>(key: (x: T) => string) => (a: T, b: T) =>
    b.costUsd - a.costUsd || b.totalTokens - a.totalTokens || cmp(key(a), key(b));
  users.sort(byCost((u) => u.userId));
  models.sort(byCost((m) => m.model));
  const totals = sumTotals(models);
  const dailyLines = daily
    .map((d) => ({
      date: d.date,
      userId: d.userId,
      email: emails.get(d.userId) ?? null,
      ...totalsOf(pricing, d.rows),
    }))
    .sort((a, b) => cmp(a.date, b.date) || cmp(a.userId, b.userId));
  return { from: query.from, to: query.to, users, models, totals, daily: dailyLines, sources };
}

/** The report as CONTRACT §7's JSON document. */
export function reportJson(report: Report) {
  return {
    from: report.from,
    to: report.to,
    users: report.users.map((u) => ({
      userId: u.userId,
      email: u.email,
      ...pickTotals(u),
    })),
    models: report.models.map((m) => ({ model: m.model, ...pickTotals(m), priced: m.priced })),
    totals: pickTotals(report.totals),
  };
}

const CSV_COLUMNS = [
  "date",
  "userId",
  "email",
  "requests",
  "promptTokens",
  "completionTokens",
  "totalTokens",
  "costUsd",
] as const;

/** One CSV row per user and day (RFC 4180 quoting, CRLF line ends). Needs `perDay`. */
export function reportCsv(report: Report): string {
  return [...reportCsvParts(report)].join("");
}

/** The CSV in parts of a few thousand lines, so a big report streams out without one huge string. */
export function* reportCsvParts(report: Report, linesPerPart = 5000): Generator<string> {
  let lines = [CSV_COLUMNS.join(",")];
  for (const d of report.daily) {
    lines.push(CSV_COLUMNS.map((c) => csvField(d[c])).join(","));
    if (lines.length >= linesPerPart) {
      yield lines.join("\r\n") + "\r\n";
      lines = [];
    }
  }
  if (lines.length) yield lines.join("\r\n") + "\r\n";
}

/**
 * One CSV cell: control characters and bidi overrides removed (as in the table), then a text that
 * a spreadsheet would read as a formula (it starts with `=`, `+`, `-`, `@`, a tab or a carriage
 * return) prefixed with `'` (OWASP's CSV injection advice); numbers are written as numbers.
 */
export function csvField(value: string | number | null): string {
  let text = value === null ? "" : typeof value === "string" ? csvText(value) : String(value);
  if (typeof value === "string" && /^[=+\-@\t\r]/.test(text)) text = `'${text}`;
  return /[",\r\n]/.test(text) ? `"${text.replaceAll('"', '""')}"` : text;
}

/**
 * `printable`, but a tab or a carriage return stays: inside a quoted cell they are data, and a cell
 * that starts with one gets the `'` prefix like a formula would (OWASP lists both).
 */
function csvText(text: string): string {
  return text.split(/([\t\r])/).map((part) => /^[\t\r]$/.test(part) ? part : printable(part))
    .join("");
}

/** The report for people: aligned per-user and per-model tables with totals rows. */
export function reportTable(report: Report): string {
  const dayCount = Math.round(
    (Date.parse(`${report.to}T00:00:00Z`) - Date.parse(`${report.from}T00:00:00Z`)) / DAY_MS,
  ) + 1;
  const out = [
    `Keyway usage ${report.from} → ${report.to} (${formatCount(dayCount, "UTC day")})`,
    "",
  ];
  const numbers = (t: UsageTotals) => [
    int(t.requests),
    int(t.promptTokens),
    int(t.completionTokens),
    int(t.totalTokens),
    formatUsd(t.costUsd),
  ];
  const numberHeads = ["Requests", "Prompt", "Completion", "Total tokens", "Cost"];
  out.push(
    ...renderTable(
      ["User", "E-mail", ...numberHeads],
      report.users.map((
        u,
      ) => [printable(u.userId), clip(printable(u.email ?? "—"), 40), ...numbers(u)]),
      [
        "Total",
        formatCount(report.users.length, "user"),
        ...numbers(report.totals),
      ],
      2,
    ),
    "",
  );
  const unpriced = report.models.some((m) => !m.priced);
  out.push(
    ...renderTable(
      ["Model", ...numberHeads],
      report.models.map((m) => [printable(m.priced ? m.model : `${m.model} *`), ...numbers(m)]),
      ["Total", ...numbers(report.totals)],
      1,
    ),
  );
  if (unpriced) {
    out.push("", '* unpriced: not in the pricing table and no "*" entry, counted as $0.');
  }
  if (!report.users.length) out.push("", `No usage from ${report.from} to ${report.to}.`);
  return out.join("\n") + "\n";
}

const int = formatInt;

function cmp(a: string, b: string): number {
  return a < b ? -1 : a > b ? 1 : 0;
}

function addInto(acc: UsageRow, row: UsageRow) {
  acc.requests += row.requests;
  acc.promptTokens += row.promptTokens;
  acc.completionTokens += row.completionTokens;
  if (row.cachedTokens) acc.cachedTokens = (acc.cachedTokens ?? 0) + row.cachedTokens;
}

/** UsageTotals of rows, priced per model with the given table. */
function totalsOf(pricing: Pricing, rows: UsageRow[]): UsageTotals {
  return sumTotals(rows.map((r) => ({
    requests: r.requests,
    promptTokens: r.promptTokens,
    completionTokens: r.completionTokens,
    totalTokens: r.promptTokens + r.completionTokens,
    costUsd: costUsd(pricing, r.model, r.promptTokens, r.completionTokens, r.cachedTokens),
  })));
}

function sumTotals(lines: UsageTotals[]): UsageTotals {
  const t: UsageTotals = {
    requests: 0,
    promptTokens: 0,
    completionTokens: 0,
    totalTokens: 0,
    costUsd: 0,
  };
  for (const l of lines) {
    t.requests += l.requests;
    t.promptTokens += l.promptTokens;
    t.completionTokens += l.completionTokens;
    t.totalTokens += l.totalTokens;
    t.costUsd += l.costUsd;
  }
  t.costUsd = roundUsd(t.costUsd);
  return t;
}

function pickTotals(t: UsageTotals): UsageTotals {
  return {
    requests: t.requests,
    promptTokens: t.promptTokens,
    completionTokens: t.completionTokens,
    totalTokens: t.totalTokens,
    costUsd: t.costUsd,
  };
}

async function lookUpEmails(kv: Deno.Kv, userIds: string[]): Promise<Map<string, string>> {
  const emails = new Map<string, string>();
  if (userIds.length > 500) {
    // Many users: one range read of the user table beats thousands of point reads.
    const wanted = new Set(userIds);
    for await (const e of kv.list<UserRecord>({ prefix: keys.users() }, { batchSize: 1000 })) {
      if (wanted.has(e.value.id) && e.value.email) emails.set(e.value.id, e.value.email);
    }
    return emails;
  }
  const entries = await getManyChunked<UserRecord>(kv, userIds.map((u) => keys.user(u)));
  for (const e of entries) if (e.value?.email) emails.set(e.value.id, e.value.email);
  return emails;
}

// ——— flags ———

export type ReportFormat = "table" | "json" | "csv";

export interface ReportFlags {
  from: Day;
  to: Day;
  userId?: string;
  format: ReportFormat;
  help: boolean;
}

export const REPORT_USAGE =
  `Usage: deno task report [--from YYYY-MM-DD] [--to YYYY-MM-DD] [--user ID|E-MAIL]
                        [--format table|json|csv]

Usage and cost per user and model over UTC days, both ends included.

  --from YYYY-MM-DD   first day (default: 29 days before --to)
  --to YYYY-MM-DD     last day (default: today, UTC)
  --user ID|E-MAIL    only this user (a user id, or the e-mail of one)
  --format FORMAT     table (default), json or csv (one row per user and day)

json is one document: {from, to, users, models, totals} (README, "Usage and cost report").
An unknown --user is an error (exit 2), not an empty report.
  --help              this text
`;

const day = (flag: string) =>
  z.string().refine(isDay, { message: `${flag} must be a real date written YYYY-MM-DD` });

const flagsSchema = z.object({
  from: day("--from").optional(),
  to: day("--to").optional(),
  user: z.string().trim().min(1, { message: "--user needs a user id or an e-mail" }).optional(),
  format: z.enum(["table", "json", "csv"], { message: "--format must be table, json or csv" })
    .default("table"),
  help: z.literal(true).optional(),
});

/** Parses and validates `deno task report` flags; throws UsageError naming the bad flag. */
export function parseReportFlags(args: string[], now = systemClock()): ReportFlags {
  const raw = parseFlags(args, {
    from: "string",
    to: "string",
    user: "string",
    format: "string",
    help: "boolean",
  });
  const parsed = flagsSchema.safeParse(raw);
  if (!parsed.success) throw new UsageError(flagIssue(parsed.error.issues[0]));
  const f = parsed.data;
  const to = f.to ?? utcDay(now);
  const from = f.from ?? addDays(to, -29);
  if (from > to) throw new UsageError(`--from ${from} is after --to ${to}`);
  return { from, to, userId: f.user, format: f.format, help: f.help === true };
}
