/**
 * A labelled progress bar: how much of a limit is used and what is left. With no limit it says
 * "Unlimited" in words and draws no bar (an empty bar would read as "nothing allowed"). Switched
 * `off` (the account is disabled) it is grey and says only what was used: nothing is left to use.
 */
import { formatInt } from "../lib/core/format.ts";

export interface MeterProps {
  label: string;
  used: number;
  /** null = unlimited */
  limit: number | null;
  format?: (n: number) => string;
  /** What resets it, for people ("resets at 00:00 UTC"). */
  note?: string;
  testId?: string;
  /** Nothing can be used (a disabled account): grey, no bar, no "left". */
  off?: boolean;
}

export function Meter(
  { label, used, limit, format = formatInt, note, testId, off = false }: MeterProps,
) {
  if (off) {
    return (
      <div class="meter meter-off" data-testid={testId}>
        <div class="meter-label">
          <span>{label}</span>
          <span>{format(used)} used</span>
        </div>
        <div class="meter-track" aria-hidden="true" />
      </div>
    );
  }
  if (limit === null) {
    return (
      <div class="meter" data-testid={testId}>
        <div class="meter-label">
          <span>{label}</span>
          <span>
            {format(used)} used · <strong>Unlimited</strong>
          </span>
        </div>
      </div>
    );
  }
  const ratio = limit > 0 ? Math.min(1, used / limit) : 1;
  const pct = Math.round(ratio * 100);
  const level = ratio >= 1 ? "full" : ratio >= 0.8 ? "high" : "";
  const left = Math.max(0, limit - used);
  return (
    <div class="meter" data-testid={testId}>
      <div class="meter-label">
        <span>{label}</span>
        <span>
          {format(used)} of {format(limit)}
        </span>
      </div>
      <div
        class="meter-track"
        role="progressbar"
        aria-label={label}
        aria-valuemin={0}
        aria-valuemax={100}
        aria-valuenow={pct}
        aria-valuetext={`${format(used)} of ${format(limit)} used, ${format(left)} left`}
      >
        <div class={`meter-fill ${level}`} style={{ width: `${pct}%` }} />
      </div>
      <p class="meter-note small muted">
        {ratio >= 1 ? <strong class="text-danger">None left</strong> : `${format(left)} left`}
        {note ? ` · ${note}` : ""}
      </p>
    </div>
  );
}
