/**
 * The operator's users list (CONTRACT §5 Operator, `GET /api/admin/users`): every user with their
 * status — paused included, and by what — their 30-day usage, searched, filtered, ordered by
 * 30-day cost (highest first, then user id) and cut into pages.
 *
 * The page cursor is the last row's place in that order (cost in nano-dollars and user id), not an
 * offset: a user whose cost changes between two pages moves, but no one else is skipped or listed
 * twice for it. The 30-day usage comes from the cost report (summaries where current, one list
 * per day); the paused state is read only for users it can apply to — some requests today, or a
 * monthly budget in force — with one getMany each.
 */
import type { Config } from "../core/config.ts";
import { u64 } from "../core/kv.ts";
import { systemClock } from "../core/clock.ts";
import { utcDay } from "../core/utc.ts";
import type { UserRecord, Users } from "../identity/users.ts";
import { type AccountState, accountState } from "../limits/account_state.ts";
import { usedKeys } from "../limits/lease_record.ts";
import { effectiveLimits } from "../limits/policy.ts";
import { limitStatus } from "../limits/status.ts";
import type { WindowTotals } from "../usage/totals.ts";
import { operatorOverview } from "./overview.ts";

export type ListStatus = "active" | "paused" | "disabled" | "deleted";
export type PausedBy = "requests" | "tokens" | "budget";

export interface UserListQuery {
  /** Case-insensitive substring of the e-mail or the user id. */
  query?: string;
  status?: ListStatus;
  limit: number;
  /** From `next` of the previous page. */
  cursor?: string;
}

export interface UserListRow {
  user: UserRecord;
  status: ListStatus;
  pausedBy: PausedBy | null;
  /** When a paused user works again (ISO). */
  pausedUntil: string | null;
  usage30d: WindowTotals;
  /** The latest UTC day with usage in the last 30 (YYYY-MM-DD). */
  lastActive: string | null;
}

export interface UserListPage {
  rows: UserListRow[];
  next: string | null;
  /** Users matching the query and status, over all pages. */
  total: number;
}

const PAUSED_BY: Record<string, PausedBy> = {
  requests_per_day: "requests",
  tokens_per_day: "tokens",
  budget_monthly: "budget",
};

const NO_USAGE: WindowTotals = { requests: 0, totalTokens: 0, costUsd: 0 };

/** A cursor is `<nano-dollars>.<user id>` in base64url: opaque to clients, checked when read. */
export function encodeCursor(costUsd: number, userId: string): string {
  const text = `${Math.round(costUsd * 1e9)}.${userId}`;
  return btoa(text).replaceAll("+", "-").replaceAll("/", "_").replace(/=+$/, "");
}

/** The cursor's place, or null when it is not one this module wrote. */
export function decodeCursor(cursor: string): { nano: number; userId: string } | null {
  try {
    const text = atob(cursor.replaceAll("-", "+").replaceAll("_", "/"));
    const m = text.match(/^(\d{1,18})\.([A-Za-z0-9_.:-]{1,200})$/);
    return m ? { nano: Number(m[1]), userId: m[2] } : null;
  } catch {
    return null;
  }
}

/** Cost first (highest first), then the user id, so the order is total and stable. */
function before(a: { nano: number; userId: string }, b: { nano: number; userId: string }) {
  return a.nano !== b.nano ? a.nano > b.nano : a.userId < b.userId;
}

async function pausedState(
  kv: Deno.Kv,
  config: Config,
  user: UserRecord,
  now: number,
): Promise<AccountState> {
  const [tokensKey, spendKey] = usedKeys(user.id, now);
  const [status, used] = await Promise.all([
    limitStatus(kv, config, user.id, now),
    kv.getMany<[Deno.KvU64, Deno.KvU64]>([tokensKey, spendKey]),
  ]);
  return accountState(status.user ?? user, status.limits, {
    requestsLeftToday: status.view.remainingDay,
    tokensToday: u64(used[0].value),
    spendNanoMonth: u64(used[1].value),
  }, now);
}

/** One page of the users list. */
export async function listUsers(
  kv: Deno.Kv,
  config: Config,
  users: Users,
  q: UserListQuery,
  now = systemClock(),
): Promise<UserListPage> {
  const after = q.cursor === undefined ? null : decodeCursor(q.cursor);
  const needle = q.query?.trim().toLowerCase() ?? "";
  const overview = await operatorOverview(kv, config.pricing, now);
  const today = utcDay(now);
  const matching: { nano: number; userId: string; row: UserListRow }[] = [];
  const candidates: UserListRow[] = [];
  for await (const user of users.list()) {
    if (
      needle && !user.id.toLowerCase().includes(needle) &&
      !(user.email ?? "").toLowerCase().includes(needle)
    ) continue;
    const usage = overview.users.get(user.id) ?? NO_USAGE;
    const lastActive = overview.lastActive.get(user.id) ?? null;
    const row: UserListRow = {
      user,
      status: user.status,
      pausedBy: null,
      pausedUntil: null,
      usage30d: usage,
      lastActive,
    };
    // Only a day's use or a monthly budget can pause an account.
    if (
      user.status === "active" &&
      (lastActive === today || effectiveLimits(config, user).budgetUsdMonthly !== null)
    ) candidates.push(row);
    matching.push({ nano: Math.round(usage.costUsd * 1e9), userId: user.id, row });
  }
  // Read in small batches: each read is one getMany of 8 keys and one of 2.
  for (let i = 0; i < candidates.length; i += 16) {
    await Promise.all(
      candidates.slice(i, i + 16).map(async (row) => {
        const state = await pausedState(kv, config, row.user, now);
        if (state.status !== "paused") return;
        row.status = "paused";
        row.pausedBy = PAUSED_BY[state.reason];
        row.pausedUntil = state.until;
      }),
    );
  }
  const filtered = matching.filter((m) => !q.status || m.row.status === q.status);
  filtered.sort((a, b) => (before(a, b) ? -1 : before(b, a) ? 1 : 0));
  const start = after ? filtered.findIndex((m) => before(after, m)) : 0;
  const from = start < 0 ? filtered.length : start;
  const page = filtered.slice(from, from + q.limit);
  const last = page.at(-1);
  const more = from + q.limit < filtered.length;
  return {
    rows: page.map((m) => m.row),
    next: more && last ? encodeCursor(last.row.usage30d.costUsd, last.userId) : null,
    total: filtered.length,
  };
}
