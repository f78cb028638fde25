/**
 * A bar chart of daily values in HTML and CSS (not a scaled SVG), so its labels keep their size
 * on a phone. Each bar is a button: tap, click or arrow keys select a day and the readout above
 * says its values (one tab stop: a roving tabindex). Used inside the dashboard island and, as an
 * island of its own, on the server-rendered operator pages.
 */
import { useState } from "preact/hooks";
import { formatCompact, formatDay, formatInt, formatUsd } from "../lib/core/format.ts";

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

const FORMAT = {
  requests: (n: number) => formatInt(n),
  tokens: (n: number) => formatInt(n),
  usd: (n: number) => formatUsd(n),
};
const AXIS = {
  requests: formatCompact,
  tokens: formatCompact,
  usd: (n: number) => (n >= 1000 ? `$${formatCompact(n)}` : formatUsd(n)),
};
const UNIT = { requests: "requests", tokens: "tokens", usd: "" };

/** A "nice" axis maximum ≥ max: 1, 2 or 5 times a power of ten. */
export function niceMax(max: number): number {
  if (!(max > 0)) return 1;
  const pow = 10 ** Math.floor(Math.log10(max));
  for (const m of [1, 2, 5, 10]) if (m * pow >= max) return m * pow;
  return 10 * pow;
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
  const unit = UNIT[kind];
  const say = (p: DailyPoint) =>
    `${formatDay(p.date)}: ${format(p.value)}${unit ? ` ${unit}` : ""}${
      p.detail ? ` · ${p.detail}` : ""
    }`;
  // Whole-number kinds get an axis of at least 2, so its middle label is a whole number too.
  const max = niceMax(Math.max(kind === "usd" ? 0 : 2, ...points.map((p) => p.value)));
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
          {` · ${format(total)}${unit ? ` ${unit}` : ""} in ${points.length} days`}
        </span>
      </figcaption>
      <div class="dc-plot">
        <div class="dc-axis" aria-hidden="true">
          <span>{AXIS[kind](max)}</span>
          <span>{AXIS[kind](max / 2)}</span>
          <span>{AXIS[kind](0)}</span>
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
