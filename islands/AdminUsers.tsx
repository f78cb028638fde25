/**
 * The operator's users list: a sortable table on wide screens, one card per user on narrow ones
 * (the same markup, restyled), with overrides shown, disable behind a confirmation step, limits
 * editing, and a link to each user's page.
 */
import { Fragment } from "preact";
import { useEffect, useState } from "preact/hooks";
import {
  formatCount,
  formatDate,
  formatDay,
  formatInt,
  formatTokens,
  formatUsd,
} from "../lib/core/format.ts";
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
}

type SortKey = "user" | "status" | "createdAt" | "lastActive" | "requests" | "tokens" | "cost";

const SORTS: [SortKey, string][] = [
  ["cost", "Cost"],
  ["requests", "Requests"],
  ["tokens", "Tokens"],
  ["lastActive", "Last active"],
  ["createdAt", "Created"],
  ["user", "User"],
  ["status", "Status"],
];

function sortValue(u: AdminUser, key: SortKey): string | number {
  switch (key) {
    case "user":
      return (u.email ?? u.userId).toLowerCase();
    case "status":
      return u.status;
    case "createdAt":
      return u.createdAt;
    case "lastActive":
      return u.lastActive ?? "";
    case "requests":
      return u.usage30d.requests;
    case "tokens":
      return u.usage30d.totalTokens;
    case "cost":
      return u.usage30d.costUsd;
  }
}

const COLUMNS = 9;

export default function AdminUsers(props: AdminUsersProps) {
  const [users, setUsers] = useState<AdminUser[] | null>(null);
  const [error, setError] = useState<string | null>(null);
  const [sort, setSort] = useState<{ key: SortKey; desc: boolean }>({ key: "cost", desc: true });
  const [editing, setEditing] = useState<string | null>(null);
  const [notice, setNotice] = useState<Notice>(null);

  const load = async () => {
    try {
      const data = await api<{ users: AdminUser[] }>(props.mode, "/api/admin/users");
      setUsers(data.users);
      setError(null);
    } catch (err) {
      setError(
        err instanceof ApiError && err.status === 404
          ? "The operator API is not available on this server yet."
          : `Users could not be loaded: ${err instanceof Error ? err.message : String(err)}`,
      );
    }
  };
  useEffect(() => {
    load();
  }, []);

  // Answers of the write endpoints carry no usage window: keep what the list had.
  const replace = (user: AdminUser) =>
    setUsers((list) =>
      list?.map((u) =>
        u.userId === user.userId
          ? { ...u, ...user, usage30d: u.usage30d, lastActive: u.lastActive }
          : u
      ) ?? null
    );

  const sorted = users
    ? [...users].sort((a, b) => {
      const x = sortValue(a, sort.key), y = sortValue(b, sort.key);
      const c = x < y ? -1 : x > y ? 1 : 0;
      return sort.desc ? -c : c;
    })
    : null;

  const numeric = (key: SortKey) => key !== "user" && key !== "status";
  const header = (key: SortKey, label: string, num = false) => {
    const active = sort.key === key;
    return (
      <th
        scope="col"
        class={num ? "num" : undefined}
        aria-sort={active ? (sort.desc ? "descending" : "ascending") : undefined}
      >
        <button
          type="button"
          onClick={() => setSort({ key, desc: active ? !sort.desc : numeric(key) })}
        >
          {label} <span aria-hidden="true">{active ? (sort.desc ? "↓" : "↑") : ""}</span>
        </button>
      </th>
    );
  };

  return (
    <section class="card" aria-labelledby="users-title">
      <div class="card-head">
        <h2 id="users-title">Users</h2>
        <p class="muted small">
          {users ? formatCount(users.length, "user") : "Loading…"}
          {" · "}usage over the last 30 days
        </p>
      </div>
      <div class="sort-narrow">
        <label for="users-sort">Sort by</label>
        <select
          id="users-sort"
          value={`${sort.key}:${sort.desc ? "desc" : "asc"}`}
          onChange={(e) => {
            const [key, dir] = e.currentTarget.value.split(":");
            setSort({ key: key as SortKey, desc: dir === "desc" });
          }}
        >
          {SORTS.map(([key, label]) => (
            <option key={key} value={`${key}:${numeric(key) ? "desc" : "asc"}`}>
              {label}
              {numeric(key) ? " (highest first)" : " (A–Z)"}
            </option>
          ))}
        </select>
      </div>
      <p role="status" class={notice ? `notice notice-${notice.kind}` : "sr-only"}>
        {notice?.text ?? ""}
      </p>
      {error && <p class="notice notice-error" role="alert">{error}</p>}
      <div class="table-wrap users-wrap">
        <table data-testid="users-table" class="users-table">
          <thead>
            <tr>
              {header("user", "User")}
              {header("status", "Status")}
              <th scope="col">Limits</th>
              {header("createdAt", "Created")}
              {header("lastActive", "Last active")}
              {header("requests", "Requests", true)}
              {header("tokens", "Tokens", true)}
              {header("cost", "Cost", true)}
              <th scope="col" class="num">Actions</th>
            </tr>
          </thead>
          <tbody>
            {sorted === null && !error && [0, 1, 2].map((i) => (
              <tr key={i}>
                <td colSpan={COLUMNS}>
                  <span class="skeleton" style={{ width: "100%" }}>loading</span>
                </td>
              </tr>
            ))}
            {sorted?.length === 0 && (
              <tr>
                <td colSpan={COLUMNS} class="muted">No users yet.</td>
              </tr>
            )}
            {sorted?.map((u) => {
              const overrides = overridesText(u.limits);
              return (
                <Fragment key={u.userId}>
                  <tr data-user-id={u.userId} class="user-row">
                    <td data-label="User" class="cell-user">
                      <a href={`/admin/users/${encodeURIComponent(u.userId)}`}>
                        {u.email ?? u.userId}
                      </a>
                      <div class="muted small">
                        <code>{u.userId}</code>
                        {u.keyPrefix && (
                          <>
                            {" · "}key <code>{u.keyPrefix}…</code>
                          </>
                        )}
                      </div>
                    </td>
                    <td data-label="Status">
                      <span
                        class={`status ${
                          u.status === "active"
                            ? "status-ok"
                            : u.status === "disabled"
                            ? "status-warn"
                            : "status-danger"
                        }`}
                        data-testid="user-status"
                      >
                        {u.status}
                      </span>
                    </td>
                    <td data-label="Limits" data-testid="user-limits" class="small">
                      {overrides ?? <span class="muted">Defaults</span>}
                    </td>
                    <td data-label="Created" class="nowrap">{formatDate(u.createdAt)}</td>
                    <td data-label="Last active" class="nowrap" data-testid="user-last-active">
                      {u.lastActive ? formatDay(u.lastActive) : <span class="muted">None</span>}
                    </td>
                    <td data-label="Requests" class="num">{formatInt(u.usage30d.requests)}</td>
                    <td data-label="Tokens" class="num">{formatTokens(u.usage30d.totalTokens)}</td>
                    <td data-label="Cost" class="num">{formatUsd(u.usage30d.costUsd)}</td>
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
                            aria-label={`Limits of ${u.email ?? u.userId}`}
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
    </section>
  );
}
