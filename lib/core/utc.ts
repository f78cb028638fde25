/** Every UTC date helper: the days and months usage is counted in, and when they turn over. */
import { systemClock } from "./clock.ts";

export type Day = string; // YYYY-MM-DD (UTC)
export type Month = string; // YYYY-MM (UTC)

export const DAY_MS = 86_400_000;

/** The last day formatted (utcDay/utcMonth run several times per gateway request). */
let memoDayNumber = NaN;
let memoDay = "";

/** UTC date of a timestamp as YYYY-MM-DD. */
export function utcDay(ms: number = systemClock()): Day {
  const n = Math.floor(ms / DAY_MS);
  if (n !== memoDayNumber) {
    memoDay = new Date(ms).toISOString().slice(0, 10);
    memoDayNumber = n;
  }
  return memoDay;
}

export function utcMonth(ms: number = systemClock()): Month {
  return utcDay(ms).slice(0, 7);
}

/** The day `n` days after `day` (before it for a negative n). */
export function addDays(day: Day, n: number): Day {
  return utcDay(Date.parse(`${day}T00:00:00Z`) + n * DAY_MS);
}

/** True for a real calendar date written YYYY-MM-DD (2026-02-30 is not). */
export function isDay(value: string): boolean {
  if (!/^\d{4}-\d{2}-\d{2}$/.test(value)) return false;
  const ms = Date.parse(`${value}T00:00:00Z`);
  return Number.isFinite(ms) && utcDay(ms) === value;
}

export function msUntilNextDay(now: number): number {
  return DAY_MS - (now % DAY_MS);
}

export function msUntilNextMonth(now: number): number {
  const d = new Date(now);
  return Date.UTC(d.getUTCFullYear(), d.getUTCMonth() + 1, 1) - now;
}
