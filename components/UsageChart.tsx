/** A bar chart of daily values as plain SVG (renders the same on the server and in islands). */
export interface ChartPoint {
  date: string; // YYYY-MM-DD
  value: number;
}

export interface UsageChartProps {
  points: ChartPoint[];
  /** What a bar measures, for the accessible description ("requests", "USD"). */
  label: string;
  format?: (n: number) => string;
  height?: number;
  /** viewBox width: roughly the rendered width, so labels keep a readable size. */
  width?: number;
}

/** A "nice" axis maximum ≥ max: 1, 2 or 5 times a power of ten. */
export function niceMax(max: number): number {
  if (!(max > 0)) return 1;
  const pow = 10 ** Math.floor(Math.log10(max));
  for (const m of [1, 2, 5, 10]) if (m * pow >= max) return m * pow;
  return 10 * pow;
}

export function UsageChart(
  { points, label, format = (n) => n.toLocaleString("en-US"), height = 180, width: W = 640 }:
    UsageChartProps,
) {
  const top = 12, bottom = 22, left = 44, right = 6;
  const plotH = height - top - bottom;
  const plotW = W - left - right;
  const max = niceMax(Math.max(0, ...points.map((p) => p.value)));
  const slot = points.length ? plotW / points.length : plotW;
  const barW = Math.max(2, slot * 0.7);
  const total = points.reduce((n, p) => n + p.value, 0);
  const first = points[0]?.date, last = points[points.length - 1]?.date;
  const summary = points.length
    ? `${label} per day from ${first} to ${last}: ${format(total)} in total, at most ${
      format(Math.max(...points.map((p) => p.value)))
    } on one day.`
    : `No ${label} yet.`;
  return (
    <svg
      class="chart"
      viewBox={`0 0 ${W} ${height}`}
      role="img"
      aria-label={summary}
    >
      <title>{summary}</title>
      {(total > 0 ? [0, 0.5, 1] : [0]).map((f) => {
        const y = top + plotH * (1 - f);
        return (
          <g key={f}>
            <line class="grid-line" x1={left} x2={W - right} y1={y} y2={y} />
            <text x={left - 6} y={y + 4} text-anchor="end">{format(max * f)}</text>
          </g>
        );
      })}
      {points.map((p, i) => {
        const h = max ? (p.value / max) * plotH : 0;
        return (
          <rect
            key={p.date}
            class="bar"
            x={left + i * slot + (slot - barW) / 2}
            y={top + plotH - h}
            width={barW}
            height={Math.max(h, p.value > 0 ? 1 : 0)}
            rx={Math.min(2, barW / 4)}
          >
            <title>{`${p.date}: ${format(p.value)} ${label}`}</title>
          </rect>
        );
      })}
      {points.length > 0 && (
        <>
          <text x={left} y={height - 6}>{first?.slice(5)}</text>
          <text x={W - right} y={height - 6} text-anchor="end">{last?.slice(5)}</text>
        </>
      )}
    </svg>
  );
}

/** The last `n` UTC days (oldest first) with values filled from `byDate` (missing = 0). */
export function lastDays(n: number, byDate: Map<string, number>, now = Date.now()): ChartPoint[] {
  const out: ChartPoint[] = [];
  for (let i = n - 1; i >= 0; i--) {
    const date = new Date(now - i * 86_400_000).toISOString().slice(0, 10);
    out.push({ date, value: byDate.get(date) ?? 0 });
  }
  return out;
}
