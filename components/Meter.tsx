/** A labelled progress bar: how much of a limit is used. `limit` null = unlimited. */
export interface MeterProps {
  label: string;
  used: number;
  limit: number | null;
  format?: (n: number) => string;
  /** Data not loaded yet: same size, placeholder value. */
  pending?: boolean;
}

export function Meter(
  { label, used, limit, format = (n) => n.toLocaleString("en-US"), pending = false }: MeterProps,
) {
  const ratio = limit ? Math.min(1, used / limit) : 0;
  const pct = Math.round(ratio * 100);
  const level = ratio >= 1 ? "full" : ratio >= 0.8 ? "high" : "";
  return (
    <div class="meter">
      <div class="meter-label">
        <span>{label}</span>
        <span>
          {pending
            ? <span class="skeleton">0 of 0</span>
            : limit === null
            ? `${format(used)} · unlimited`
            : `${format(used)} of ${format(limit)}`}
        </span>
      </div>
      <div
        class="meter-track"
        role="progressbar"
        aria-label={label}
        aria-valuemin={0}
        aria-valuemax={100}
        aria-valuenow={limit === null ? undefined : pct}
        aria-valuetext={limit === null ? `${format(used)} used, unlimited` : `${pct}% used`}
      >
        <div
          class={`meter-fill ${level}`}
          style={{ width: `${limit === null || pending ? 0 : pct}%` }}
        />
      </div>
    </div>
  );
}
