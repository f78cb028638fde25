/**
 * The operator's users list, one page at a time from GET /api/admin/users (ordered by 30-day
 * cost, highest first): searchable by e-mail or id, filterable by status — paused included, with
 * what paused them — one line per user on wide screens and one card per user on phones (the same
 * markup, restyled), with disable behind a confirmation step, limits editing, and a link to each
 * user's page.
 */
import { Fragment } from "preact";
import { useEffect, useRef, useState } from "preact/hooks";
import {
  formatCount,
  formatDate,
  formatDateTime,
  formatDay,
  formatInt,
  formatTokens,
  formatUsd,
} from "../lib/core/format.ts";
import type { AdminUsersBody } from "../lib/api_types.ts";
import { api, ApiError, type AuthMode } from "./client.ts";
import {
  type AdminUser,
  type Defaults,
  LimitsForm,
  type Notice,
  overridesText,
  StatusControl,
} from "./UserActions.tsx";

export interface AdminUsersProps {
  [key: string]: unknown;
  mode: AuthMode;
  /** The configured defaults, shown as placeholders for the overrides. */
  defaults: Defaults;
  /** The signed-in operator (who cannot disable themselves). */
  selfId: string;
  /** Users per page. */
  pageSize: number;
}

type StatusFilter = "" | "active" | "paused" | "disabled" | "deleted";

const STATUS_OPTIONS: [StatusFilter, string][] = [
  ["", "All statuses"],
  ["active", "Active"],
  ["paused", "Paused"],
  ["disabled", "Disabled"],
  ["deleted", "Deleted"],
];

const PAUSED_BY_TEXT = {
  requests: "day's requests",
  tokens: "day's tokens",
  budget: "month's budget",
} as const;
/** The badge's short form (the title has the sentence). */
const PAUSED_BY_SHORT = { requests: "requests", tokens: "tokens", budget: "budget" } as const;

/** How long typing may pause before the search runs. */
const SEARCH_DEBOUNCE_MS = 250;
const COLUMNS = 8;

function StatusBadge({ user }: { user: AdminUser }) {
  const tone = user.status === "active"
    ? "status-ok"
    : user.status === "paused" || user.status === "disabled"
    ? "status-warn"
    : "status-danger";
  const until = user.pausedUntil ? ` until ${formatDateTime(user.pausedUntil)}` : "";
  return (
    <span
      class={`status ${tone}`}
      data-testid="user-status"
      title={user.pausedBy
        ? `Paused: the ${PAUSED_BY_TEXT[user.pausedBy]} are used up${until}`
        : undefined}
    >
      {user.status}
      {user.pausedBy && <span class="paused-by">· {PAUSED_BY_SHORT[user.pausedBy]}</span>}
    </span>
  );
}

export default function AdminUsers(props: AdminUsersProps) {
  const [page, setPage] = useState<AdminUsersBody | null>(null);
  const [error, setError] = useState<string | null>(null);
  const [query, setQuery] = useState("");
  const [status, setStatus] = useState<StatusFilter>("");
  /** The cursors of the pages seen so far: [undefined (the first), next of page 1, …]. */
  const [cursors, setCursors] = useState<(string | undefined)[]>([undefined]);
  const [editing, setEditing] = useState<string | null>(null);
  const [notice, setNotice] = useState<Notice>(null);
  const [loading, setLoading] = useState(true);
  const latest = useRef(0);
  const index = cursors.length - 1;

  const load = async (q: string, s: StatusFilter, cursor: string | undefined) => {
    const ticket = ++latest.current;
    setLoading(true);
    const params = new URLSearchParams({ limit: String(props.pageSize) });
    if (q.trim()) params.set("query", q.trim());
    if (s) params.set("status", s);
    if (cursor) params.set("cursor", cursor);
    try {
      const data = await api<AdminUsersBody>(props.mode, `/api/admin/users?${params}`);
      // An answer to a search typed over since is dropped.
      if (ticket !== latest.current) return;
      setPage(data);
      setError(null);
    } catch (err) {
      if (ticket !== latest.current) return;
      setError(
        err instanceof ApiError && err.status === 404
          ? "The operator API is not available on this server yet."
          : `Users could not be loaded: ${err instanceof Error ? err.message : String(err)}`,
      );
    } finally {
      if (ticket === latest.current) setLoading(false);
    }
  };

  // A new search or filter starts again at the first page (typing waits for a pause).
  useEffect(() => {
    const timer = setTimeout(() => {
      setCursors([undefined]);
      setEditing(null);
      load(query, status, undefined);
    }, page === null ? 0 : SEARCH_DEBOUNCE_MS);
    return () => clearTimeout(timer);
  }, [query, status]);

  const go = (next: (string | undefined)[]) => {
    setCursors(next);
    setEditing(null);
    load(query, status, next[next.length - 1]);
  };

  // Answers of the write endpoints carry the user's state now; the list's usage stays.
  const replace = (user: AdminUser) =>
    setPage((p) =>
      p && {
        ...p,
        users: p.users.map((u) =>
          u.userId === user.userId
            ? { ...u, ...user, usage30d: u.usage30d, lastActiveAt: u.lastActiveAt }
            : u
        ),
      }
    );

  const users = page?.users ?? null;
  const first = index * props.pageSize + 1;
  const range = page && users?.length && page.total > users.length
    ? `${formatInt(first)}–${formatInt(first + users.length - 1)} of ${
      formatCount(page.total, "user")
    }`
    : page
    ? formatCount(page.total, "user")
    : "Loading…";

  return (
    <section class="card" aria-labelledby="users-title">
      <div class="card-head">
        <h2 id="users-title">Users</h2>
        <p class="muted small" data-testid="users-range" aria-live="polite">
          {range} · by cost over the last 30 days
        </p>
      </div>
      <form
        class="users-filters"
        role="search"
        aria-label="Users"
        onSubmit={(e) => e.preventDefault()}
      >
        <div class="field">
          <label for="users-query">Search e-mail or user id</label>
          <input
            id="users-query"
            type="search"
            autocomplete="off"
            spellcheck={false}
            maxLength={200}
            value={query}
            placeholder="ada@example.com or user_…"
            onInput={(e) => setQuery(e.currentTarget.value)}
            data-testid="users-query"
          />
        </div>
        <div class="field">
          <label for="users-status">Status</label>
          <select
            id="users-status"
            value={status}
            onChange={(e) => setStatus(e.currentTarget.value as StatusFilter)}
            data-testid="users-status"
          >
            {STATUS_OPTIONS.map(([value, label]) => (
              <option key={value} value={value}>{label}</option>
            ))}
          </select>
        </div>
      </form>
      <p role="status" class={notice ? `notice notice-${notice.kind}` : "sr-only"}>
        {notice?.text ?? ""}
      </p>
      {error && <p class="notice notice-error" role="alert">{error}</p>}
      <div class="table-wrap users-wrap" aria-busy={loading}>
        <table data-testid="users-table" class="users-table">
          <caption class="sr-only">Users, highest 30-day cost first</caption>
          <thead>
            <tr>
              <th scope="col">User</th>
              <th scope="col">Status</th>
              <th scope="col">Limits</th>
              <th scope="col">Last active</th>
              <th scope="col" class="num">Requests</th>
              <th scope="col" class="num">Tokens</th>
              <th scope="col" class="num">Cost</th>
              <th scope="col" class="num">Actions</th>
            </tr>
          </thead>
          <tbody>
            {users === null && !error && [0, 1, 2].map((i) => (
              <tr key={i}>
                <td colSpan={COLUMNS}>
                  <span class="skeleton" style={{ width: "100%" }}>loading</span>
                </td>
              </tr>
            ))}
            {users?.length === 0 && (
              <tr>
                <td colSpan={COLUMNS} class="muted" data-testid="users-empty">
                  {query.trim() || status ? "No user matches." : "No users yet."}
                </td>
              </tr>
            )}
            {users?.map((u) => {
              const overrides = overridesText(u.limits);
              const name = u.email ?? u.userId;
              return (
                <Fragment key={u.userId}>
                  <tr data-user-id={u.userId} class="user-row">
                    <td data-label="User" class="cell-user">
                      <div
                        class="user-line"
                        title={`${u.email ? `${u.email} · ` : ""}${u.userId} · created ${
                          formatDate(u.createdAt)
                        }`}
                      >
                        <a href={`/admin/users/${encodeURIComponent(u.userId)}`}>{name}</a>
                        {u.email && <code class="muted small">{u.userId}</code>}
                      </div>
                    </td>
                    <td data-label="Status">
                      <StatusBadge user={u} />
                    </td>
                    <td
                      data-label="Limits"
                      data-testid="user-limits"
                      class="small"
                      title={overrides ?? undefined}
                    >
                      {overrides ?? <span class="muted">Defaults</span>}
                    </td>
                    <td data-label="Last active" data-testid="user-last-active">
                      {u.lastActiveAt ? formatDay(u.lastActiveAt) : <span class="muted">None</span>}
                    </td>
                    <td data-label="Requests" class="num">{formatInt(u.usage30d.requests)}</td>
                    <td data-label="Tokens" class="num">{formatTokens(u.usage30d.totalTokens)}</td>
                    <td data-label="Cost" class="num" data-testid="user-cost">
                      {formatUsd(u.usage30d.costUsd)}
                    </td>
                    <td data-label="Actions">
                      <div class="row-actions">
                        <StatusControl
                          user={u}
                          selfId={props.selfId}
                          mode={props.mode}
                          onChange={replace}
                          onNotice={setNotice}
                        />
                        {u.status !== "deleted" && (
                          <button
                            type="button"
                            class="btn btn-sm"
                            aria-expanded={editing === u.userId}
                            aria-label={`Limits of ${name}`}
                            onClick={() => setEditing(editing === u.userId ? null : u.userId)}
                          >
                            Limits
                          </button>
                        )}
                      </div>
                    </td>
                  </tr>
                  {editing === u.userId && (
                    <tr class="edit-row">
                      <td colSpan={COLUMNS}>
                        <LimitsForm
                          user={u}
                          defaults={props.defaults}
                          mode={props.mode}
                          onSaved={(saved) => {
                            replace(saved);
                            setEditing(null);
                          }}
                          onCancel={() => setEditing(null)}
                          onNotice={setNotice}
                        />
                      </td>
                    </tr>
                  )}
                </Fragment>
              );
            })}
          </tbody>
        </table>
      </div>
      {page && (index > 0 || page.next) && (
        <nav class="pager" aria-label="Users pages">
          <button
            type="button"
            class="btn btn-sm"
            disabled={index === 0 || loading}
            onClick={() => go(cursors.slice(0, -1))}
            data-testid="users-prev"
          >
            ← Previous
          </button>
          <span class="small muted">Page {formatInt(index + 1)}</span>
          <button
            type="button"
            class="btn btn-sm"
            disabled={!page.next || loading}
            onClick={() => page.next && go([...cursors, page.next])}
            data-testid="users-next"
          >
            Next →
          </button>
        </nav>
      )}
    </section>
  );
}
