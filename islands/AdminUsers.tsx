/** The operator's users table: sortable, with disable/enable and per-user limit overrides. */
import { Fragment } from "preact";
import { useEffect, useState } from "preact/hooks";
import { api, ApiError, type AuthMode, fmtCompact, fmtInt, fmtUsd } from "./client.ts";

export interface AdminUsersProps {
  [key: string]: unknown;
  mode: AuthMode;
  /** The configured defaults, shown as placeholders for the overrides. */
  defaults: { rpm: number; rpd: number; tokensPerDay: number; budgetUsdMonthly: number };
}

interface Overrides {
  rpm?: number;
  rpd?: number;
  tokensPerDay?: number;
  budgetUsdMonthly?: number;
}

interface AdminUser {
  userId: string;
  email: string | null;
  status: "active" | "disabled" | "deleted";
  createdAt: string;
  keyPrefix: string | null;
  limits?: Overrides;
  usage30d: { requests: number; totalTokens: number; costUsd: number };
}

type SortKey = "user" | "status" | "keyPrefix" | "requests" | "tokens" | "cost" | "createdAt";

const LIMIT_FIELDS = [
  ["rpm", "Requests / min"],
  ["rpd", "Requests / day"],
  ["tokensPerDay", "Tokens / day"],
  ["budgetUsdMonthly", "Budget USD / month"],
] as const;

function sortValue(u: AdminUser, key: SortKey): string | number {
  switch (key) {
    case "user":
      return (u.email ?? u.userId).toLowerCase();
    case "status":
      return u.status;
    case "keyPrefix":
      return u.keyPrefix ?? "";
    case "requests":
      return u.usage30d.requests;
    case "tokens":
      return u.usage30d.totalTokens;
    case "cost":
      return u.usage30d.costUsd;
    case "createdAt":
      return u.createdAt;
  }
}

export default function AdminUsers(props: AdminUsersProps) {
  const [users, setUsers] = useState<AdminUser[] | null>(null);
  const [error, setError] = useState<string | null>(null);
  const [sort, setSort] = useState<{ key: SortKey; desc: boolean }>({ key: "cost", desc: true });
  const [busy, setBusy] = useState<string | null>(null);
  const [editing, setEditing] = useState<string | null>(null);
  const [notice, setNotice] = useState<{ kind: "ok" | "error"; text: string } | null>(null);

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

  const replace = (user: AdminUser) =>
    setUsers((list) =>
      list?.map((u) => (u.userId === user.userId ? { ...u, ...user, usage30d: u.usage30d } : u)) ??
        null
    );

  const setStatus = async (u: AdminUser, action: "disable" | "enable") => {
    setBusy(u.userId);
    setNotice(null);
    try {
      const res = await api<{ user: AdminUser }>(
        props.mode,
        `/api/admin/users/${encodeURIComponent(u.userId)}/${action}`,
        { method: "POST" },
      );
      replace(res.user);
      setNotice({ kind: "ok", text: `${u.email ?? u.userId} ${action}d.` });
    } catch (err) {
      setNotice({ kind: "error", text: `Could not ${action}: ${(err as Error).message}` });
    } finally {
      setBusy(null);
    }
  };

  const saveLimits = async (u: AdminUser, form: HTMLFormElement) => {
    const body: Record<string, number | null> = {};
    for (const [field] of LIMIT_FIELDS) {
      const raw = (form.elements.namedItem(field) as HTMLInputElement).value.trim();
      body[field] = raw === "" ? null : Number(raw);
    }
    setBusy(u.userId);
    setNotice(null);
    try {
      const res = await api<{ user: AdminUser }>(
        props.mode,
        `/api/admin/users/${encodeURIComponent(u.userId)}/limits`,
        { method: "PUT", body },
      );
      replace(res.user);
      setEditing(null);
      setNotice({ kind: "ok", text: `Limits saved for ${u.email ?? u.userId}.` });
    } catch (err) {
      setNotice({ kind: "error", text: `Limits not saved: ${(err as Error).message}` });
    } finally {
      setBusy(null);
    }
  };

  const sorted = users
    ? [...users].sort((a, b) => {
      const x = sortValue(a, sort.key), y = sortValue(b, sort.key);
      const c = x < y ? -1 : x > y ? 1 : 0;
      return sort.desc ? -c : c;
    })
    : null;

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
          onClick={() => setSort({ key, desc: active ? !sort.desc : num })}
        >
          {label} {active ? (sort.desc ? "↓" : "↑") : ""}
        </button>
      </th>
    );
  };

  return (
    <section class="card" aria-labelledby="users-title">
      <div class="card-head">
        <h2 id="users-title">Users</h2>
        <p class="muted small">
          {users ? `${users.length} ${users.length === 1 ? "user" : "users"}` : "Loading…"}
          {" · "}usage over the last 30 days
        </p>
      </div>
      {notice && (
        <p class={`notice ${notice.kind === "ok" ? "notice-ok" : "notice-error"}`} role="status">
          {notice.text}
        </p>
      )}
      {error && <p class="notice notice-error" role="alert">{error}</p>}
      <div class="table-wrap">
        <table data-testid="users-table">
          <thead>
            <tr>
              {header("user", "User")}
              {header("status", "Status")}
              {header("keyPrefix", "Key")}
              {header("requests", "Requests", true)}
              {header("tokens", "Tokens", true)}
              {header("cost", "Cost", true)}
              <th scope="col" class="num">Actions</th>
            </tr>
          </thead>
          <tbody>
            {sorted === null && !error && [0, 1, 2].map((i) => (
              <tr key={i}>
                <td colSpan={7}>
                  <span class="skeleton" style={{ width: "100%" }}>loading</span>
                </td>
              </tr>
            ))}
            {sorted?.length === 0 && (
              <tr>
                <td colSpan={7} class="muted">No users yet.</td>
              </tr>
            )}
            {sorted?.map((u) => (
              <Fragment key={u.userId}>
                <tr data-user-id={u.userId}>
                  <td>
                    <div>{u.email ?? <span class="muted">no e-mail</span>}</div>
                    <div class="muted small">
                      <code>{u.userId}</code>
                    </div>
                  </td>
                  <td>
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
                  <td>
                    <code>{u.keyPrefix ?? "—"}</code>
                  </td>
                  <td class="num">{fmtInt(u.usage30d.requests)}</td>
                  <td class="num">{fmtCompact(u.usage30d.totalTokens)}</td>
                  <td class="num">{fmtUsd(u.usage30d.costUsd)}</td>
                  <td>
                    <div class="row-actions">
                      {u.status !== "deleted" && (
                        <button
                          type="button"
                          class={`btn btn-sm ${u.status === "active" ? "btn-danger" : ""}`}
                          disabled={busy === u.userId}
                          onClick={() => setStatus(u, u.status === "active" ? "disable" : "enable")}
                          aria-label={`${u.status === "active" ? "Disable" : "Enable"} ${
                            u.email ?? u.userId
                          }`}
                        >
                          {u.status === "active" ? "Disable" : "Enable"}
                        </button>
                      )}
                      <button
                        type="button"
                        class="btn btn-sm"
                        aria-expanded={editing === u.userId}
                        onClick={() => setEditing(editing === u.userId ? null : u.userId)}
                      >
                        Limits
                      </button>
                    </div>
                  </td>
                </tr>
                {editing === u.userId && (
                  <tr>
                    <td colSpan={7}>
                      <form
                        class="limits-form"
                        onSubmit={(e) => {
                          e.preventDefault();
                          saveLimits(u, e.currentTarget);
                        }}
                      >
                        {LIMIT_FIELDS.map(([field, label]) => (
                          <div class="field" key={field}>
                            <label for={`${u.userId}-${field}`}>{label}</label>
                            <input
                              id={`${u.userId}-${field}`}
                              name={field}
                              type="number"
                              min={field === "rpm" || field === "rpd" ? 1 : 0}
                              step={field === "budgetUsdMonthly" ? "0.01" : "1"}
                              value={u.limits?.[field] ?? ""}
                              placeholder={`default ${props.defaults[field] || "unlimited"}`}
                            />
                          </div>
                        ))}
                        <div class="row-actions" style={{ justifyContent: "flex-start" }}>
                          <button
                            class="btn btn-primary btn-sm"
                            type="submit"
                            disabled={busy === u.userId}
                          >
                            Save
                          </button>
                          <button class="btn btn-sm" type="button" onClick={() => setEditing(null)}>
                            Cancel
                          </button>
                        </div>
                        <p class="muted small" style={{ gridColumn: "1 / -1", margin: 0 }}>
                          Empty = the default. 0 tokens or budget = unlimited.
                        </p>
                      </form>
                    </td>
                  </tr>
                )}
              </Fragment>
            ))}
          </tbody>
        </table>
      </div>
    </section>
  );
}
