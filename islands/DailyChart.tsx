/**
 * A bar chart of daily values in HTML and CSS (not a scaled SVG), so its labels keep their size
 * on a phone. Each bar is a button: tap, click or arrow keys select a day and the readout above
 * says its values (one tab stop: a roving tabindex). Used inside the dashboard island and, as an
 * island of its own, on the server-rendered operator pages.
 */
import { useState } from "preact/hooks";
import {
  formatCompact,
  formatCount,
  formatDay,
  formatUsd,
  formatUsdFixed,
} from "../lib/core/format.ts";

export interface DailyPoint {
  /** YYYY-MM-DD (UTC) */
  date: string;
  value: number;
  /** More about the day for the readout, already formatted ("13,200 tokens · $0.02"). */
  detail?: string;
}

export interface DailyChartProps {
  [key: string]: unknown;
  points: DailyPoint[];
  /** What a bar measures. */
  kind: "requests" | "usd" | "tokens";
  /** Accessible name of the chart ("Requests per day, last 30 days"). */
  title: string;
  testId?: string;
}

/** A value as the readout says it: "1 request", "13,200 tokens", "$0.02". */
const FORMAT = {
  requests: (n: number) => formatCount(n, "request"),
  tokens: (n: number) => formatCount(n, "token"),
  usd: (n: number) => formatUsd(n),
};

/**
 * The axis: 0, a middle gridline and a top, where the middle step is 1, 2, 2.5 or 5 times a power
 * of ten (the top twice that), so every label is exactly the value its gridline stands at. Counts
 * get whole-number steps only (a 0–5 axis would put "2.5" in the middle): 0/1/2, 0/3/6, 0/25/50 …
 */
export function axisTicks(max: number, whole: boolean): { step: number; top: number } {
  const half = max > 0 ? max / 2 : 0.5;
  // Small counts: any whole step reads well (0/3/6), and 5 requests fill the plot rather than half.
  if (whole && half <= 10) {
    const step = Math.max(1, Math.ceil(half));
    return { step, top: 2 * step };
  }
  const pow = 10 ** Math.floor(Math.log10(half));
  for (const m of [1, 2, 2.5, 5, 10]) {
    const step = m * pow;
    if (whole && (step < 1 || !Number.isInteger(step))) continue;
    if (step >= half * (1 - 1e-9)) return { step, top: 2 * step };
  }
  return { step: 10 * pow, top: 20 * pow };
}

/** An axis label that never rounds its value: "$0.025", "$2.50", "$1.5K", "7,500", "25K". */
function axisLabel(kind: DailyChartProps["kind"], n: number): string {
  if (kind !== "usd") return formatCompact(n);
  if (n >= 1000) return `$${formatCompact(n)}`;
  let decimals = 2;
  while (decimals < 6 && Math.abs(n * 10 ** decimals - Math.round(n * 10 ** decimals)) > 1e-6) {
    decimals++;
  }
  return n === 0 ? formatUsd(0) : formatUsdFixed(n, decimals);
}

/** The last `n` UTC days (oldest first) with values from `byDate` (missing = 0). */
export function lastDays(
  n: number,
  byDate: Map<string, { value: number; detail?: string }>,
  now = Date.now(),
): DailyPoint[] {
  const out: DailyPoint[] = [];
  for (let i = n - 1; i >= 0; i--) {
    const date = new Date(now - i * 86_400_000).toISOString().slice(0, 10);
    out.push({ date, value: 0, ...byDate.get(date) });
  }
  return out;
}

export default function DailyChart({ points, kind, title, testId }: DailyChartProps) {
  const [selected, setSelected] = useState(points.length - 1);
  const format = FORMAT[kind];
  const say = (p: DailyPoint) =>
    `${formatDay(p.date)}: ${format(p.value)}${p.detail ? ` · ${p.detail}` : ""}`;
  const { step, top: max } = axisTicks(Math.max(0, ...points.map((p) => p.value)), kind !== "usd");
  const total = points.reduce((n, p) => n + p.value, 0);
  const current = points[selected];
  const move = (to: number, e: KeyboardEvent) => {
    const next = Math.max(0, Math.min(points.length - 1, to));
    setSelected(next);
    const bars = (e.currentTarget as HTMLElement).parentElement?.children;
    (bars?.[next] as HTMLElement | undefined)?.focus();
    e.preventDefault();
  };
  return (
    <figure class="daily-chart" data-testid={testId}>
      <figcaption class="dc-readout" aria-live="polite">
        {current ? say(current) : "No data"}
        <span class="muted">
          {` · ${format(total)} in ${formatCount(points.length, "day")}`}
        </span>
      </figcaption>
      <div class="dc-plot">
        <div class="dc-axis" aria-hidden="true">
          <span>{axisLabel(kind, max)}</span>
          <span>{axisLabel(kind, step)}</span>
          <span>{axisLabel(kind, 0)}</span>
        </div>
        <div class="dc-bars" role="group" aria-label={`${title}: choose a day to hear its values`}>
          {points.map((p, i) => (
            <button
              key={p.date}
              type="button"
              class={`dc-bar${i === selected ? " selected" : ""}`}
              tabIndex={i === selected ? 0 : -1}
              aria-pressed={i === selected}
              aria-label={say(p)}
              title={say(p)}
              onClick={() => setSelected(i)}
              onKeyDown={(e) => {
                if (e.key === "ArrowLeft") move(i - 1, e);
                else if (e.key === "ArrowRight") move(i + 1, e);
                else if (e.key === "Home") move(0, e);
                else if (e.key === "End") move(points.length - 1, e);
              }}
            >
              <span
                class="dc-fill"
                style={{ height: `${p.value > 0 ? Math.max(2, (p.value / max) * 100) : 0}%` }}
              />
            </button>
          ))}
        </div>
      </div>
      {points.length > 0 && (
        <div class="dc-x" aria-hidden="true">
          <span>{formatDay(points[0].date)}</span>
          <span>{formatDay(points[Math.floor(points.length / 2)].date)}</span>
          <span>{formatDay(points[points.length - 1].date)}</span>
        </div>
      )}
    </figure>
  );
}
