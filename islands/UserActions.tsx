/**
 * An operator's actions on one user — disable/enable with a confirmation step, and the limit
 * overrides — shared by the users list (AdminUsers) and, as an island, the per-user page.
 */
import { useState } from "preact/hooks";
import { formatLimit, formatUsd } from "../lib/core/format.ts";
import type { AdminUserBody, AdminUserChangedBody, LimitOverridesBody } from "../lib/api_types.ts";
import { api, type AuthMode } from "./client.ts";

export type Overrides = LimitOverridesBody;
/** A user as GET /api/admin/users lists it. */
export type AdminUser = AdminUserBody;

export type Defaults = { rpm: number; rpd: number; tokensPerDay: number; budgetUsdMonthly: number };

export type Notice = { kind: "ok" | "error"; text: string } | null;

export const LIMIT_FIELDS = [
  ["rpm", "Requests / min"],
  ["rpd", "Requests / day"],
  ["tokensPerDay", "Tokens / day"],
  ["budgetUsdMonthly", "Budget USD / month"],
] as const;

const nameOf = (u: AdminUser) => u.email ?? u.userId;

/** "rpm 5 · budget $10.00": the overrides in words, or null when there are none. */
export function overridesText(limits: Overrides | undefined): string | null {
  if (!limits) return null;
  const parts: string[] = [];
  for (const [field, label] of LIMIT_FIELDS) {
    const v = limits[field];
    if (v === undefined) continue;
    const value = field === "budgetUsdMonthly"
      ? formatLimit(v || null, formatUsd)
      : formatLimit(field === "tokensPerDay" ? v || null : v);
    parts.push(`${label.replace(" USD", "")}: ${value}`);
  }
  return parts.length ? parts.join(" · ") : null;
}

/** Disable (after a confirmation step) or enable; never your own account. */
export function StatusControl(
  { user, selfId, mode, onChange, onNotice }: {
    user: AdminUser;
    selfId: string;
    mode: AuthMode;
    onChange: (u: AdminUser) => void;
    onNotice: (n: Notice) => void;
  },
) {
  const [confirming, setConfirming] = useState(false);
  const [busy, setBusy] = useState(false);
  if (user.status === "deleted") return null;
  const self = user.userId === selfId;
  const act = async (action: "disable" | "enable") => {
    setBusy(true);
    onNotice(null);
    try {
      const res = await api<AdminUserChangedBody>(
        mode,
        `/api/admin/users/${encodeURIComponent(user.userId)}/${action}`,
        { method: "POST" },
      );
      onChange(res.user);
      onNotice({ kind: "ok", text: `${nameOf(user)} ${action}d.` });
    } catch (err) {
      onNotice({ kind: "error", text: `Could not ${action}: ${(err as Error).message}` });
    } finally {
      setBusy(false);
      setConfirming(false);
    }
  };
  if (user.status === "disabled") {
    return (
      <button
        type="button"
        class="btn btn-sm"
        disabled={busy}
        aria-label={`Enable ${nameOf(user)}`}
        onClick={() => act("enable")}
      >
        Enable
      </button>
    );
  }
  if (confirming) {
    return (
      <div class="inline-confirm" role="group" aria-label={`Confirm disabling ${nameOf(user)}`}>
        <span class="small">Their key stops working at once.</span>
        <button
          type="button"
          class="btn btn-sm"
          onClick={() =>
            setConfirming(false)}
        >
          Cancel
        </button>
        <button
          type="button"
          class="btn btn-sm btn-danger-solid"
          disabled={busy}
          onClick={() =>
            act("disable")}
        >
          Yes, disable
        </button>
      </div>
    );
  }
  return (
    <button
      type="button"
      class="btn btn-sm btn-danger"
      disabled={self}
      title={self ? "You cannot disable your own account" : undefined}
      aria-label={self ? "Disable (not your own account)" : `Disable ${nameOf(user)}…`}
      onClick={() => setConfirming(true)}
    >
      {self ? "Disable (you)" : "Disable…"}
    </button>
  );
}

/** The four overrides; an emptied field clears one (the default applies again). */
export function LimitsForm(
  { user, defaults, mode, onSaved, onCancel, onNotice }: {
    user: AdminUser;
    defaults: Defaults;
    mode: AuthMode;
    onSaved: (u: AdminUser) => void;
    onCancel?: () => void;
    onNotice: (n: Notice) => void;
  },
) {
  const [busy, setBusy] = useState(false);
  const save = async (form: HTMLFormElement) => {
    const body: Record<string, number | null> = {};
    for (const [field] of LIMIT_FIELDS) {
      const raw = (form.elements.namedItem(field) as HTMLInputElement).value.trim();
      body[field] = raw === "" ? null : Number(raw);
    }
    setBusy(true);
    onNotice(null);
    try {
      const res = await api<AdminUserChangedBody>(
        mode,
        `/api/admin/users/${encodeURIComponent(user.userId)}/limits`,
        { method: "PUT", body },
      );
      onSaved(res.user);
      onNotice({ kind: "ok", text: `Limits saved for ${nameOf(user)}.` });
    } catch (err) {
      onNotice({ kind: "error", text: `Limits not saved: ${(err as Error).message}` });
    } finally {
      setBusy(false);
    }
  };
  const placeholder = (field: keyof Defaults) =>
    `default: ${
      field === "budgetUsdMonthly"
        ? formatLimit(defaults[field] || null, formatUsd)
        : formatLimit(field === "tokensPerDay" ? defaults[field] || null : defaults[field])
    }`;
  return (
    <form
      class="limits-form"
      onSubmit={(e) => {
        e.preventDefault();
        save(e.currentTarget);
      }}
    >
      {LIMIT_FIELDS.map(([field, label]) => (
        <div class="field" key={field}>
          <label for={`${user.userId}-${field}`}>{label}</label>
          <input
            id={`${user.userId}-${field}`}
            name={field}
            type="number"
            inputMode={field === "budgetUsdMonthly" ? "decimal" : "numeric"}
            min={field === "rpm" || field === "rpd" ? 1 : 0}
            step={field === "budgetUsdMonthly" ? "0.01" : "1"}
            value={user.limits?.[field] ?? ""}
            placeholder={placeholder(field)}
          />
        </div>
      ))}
      <div class="row-actions">
        <button class="btn btn-primary btn-sm" type="submit" disabled={busy}>Save</button>
        {onCancel && <button class="btn btn-sm" type="button" onClick={onCancel}>Cancel</button>}
      </div>
      <p class="muted small form-note">Empty = the default. 0 tokens or budget = unlimited.</p>
    </form>
  );
}

export interface UserActionsProps {
  [key: string]: unknown;
  mode: AuthMode;
  user: AdminUser;
  selfId: string;
  defaults: Defaults;
}

/** The per-user page's actions: status, and the limits in force with their overrides. */
export default function UserActions(props: UserActionsProps) {
  const [user, setUser] = useState(props.user);
  const [notice, setNotice] = useState<Notice>(null);
  const eff = user.effectiveLimits;
  return (
    <section class="card" aria-labelledby="actions-title">
      <div class="card-head">
        <h2 id="actions-title">Limits and actions</h2>
        <StatusControl
          user={user}
          selfId={props.selfId}
          mode={props.mode}
          onChange={(u) =>
            setUser({ ...user, ...u, usage30d: user.usage30d, lastActiveAt: user.lastActiveAt })}
          onNotice={setNotice}
        />
      </div>
      <p role="status" class={notice ? `notice notice-${notice.kind}` : "sr-only"}>
        {notice?.text ?? ""}
      </p>
      {eff && (
        <dl class="kv" data-testid="effective-limits">
          <dt>Requests</dt>
          <dd>{formatLimit(eff.rpm)} / minute · {formatLimit(eff.rpd)} / day</dd>
          <dt>Tokens</dt>
          <dd>{formatLimit(eff.tokensPerDay)} / day</dd>
          <dt>Budget</dt>
          <dd>{formatLimit(eff.budgetUsdMonthly, formatUsd)} / month</dd>
          <dt>Overrides</dt>
          <dd data-testid="overrides">
            {overridesText(user.limits) ?? "None: the defaults apply"}
          </dd>
        </dl>
      )}
      {user.status !== "deleted" && (
        <LimitsForm
          user={user}
          defaults={props.defaults}
          mode={props.mode}
          onSaved={(u) =>
            setUser({ ...user, ...u, usage30d: user.usage30d, lastActiveAt: user.lastActiveAt })}
          onNotice={setNotice}
        />
      )}
    </section>
  );
}
