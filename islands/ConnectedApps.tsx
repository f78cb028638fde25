/**
 * The dashboard's "Connected apps" (CONTRACT §6): every key the user holds — the default key,
 * and one per editor connected through /connect or /connect/device — with its prefix, when it
 * was created and last used, and its 30-day usage. A connected app's key is revoked behind a
 * confirmation (DELETE /api/keys/:id); the default key is rotated in the key section as before.
 * The server renders it with the list it read, so nothing moves when the page comes alive.
 */
import { useEffect, useState } from "preact/hooks";
import { formatCount, formatDateTime, formatTokens, formatUsd } from "../lib/core/format.ts";
import type { KeyListingBody, KeysBody } from "../lib/api_types.ts";
import { api, ApiError, type AuthMode } from "./client.ts";

export interface ConnectedAppsProps {
  [key: string]: unknown;
  mode: AuthMode;
  /** The caller's keys as the server read them (null: load them here). */
  initialKeys: KeyListingBody[] | null;
}

export default function ConnectedApps(props: ConnectedAppsProps) {
  const [keys, setKeys] = useState<KeyListingBody[] | null>(props.initialKeys);
  const [confirming, setConfirming] = useState<string | null>(null);
  const [busy, setBusy] = useState(false);
  const [notice, setNotice] = useState<{ kind: "ok" | "error"; text: string } | null>(null);

  const load = async () => {
    try {
      setKeys((await api<KeysBody>(props.mode, "/api/keys")).keys);
    } catch (err) {
      if (!(err instanceof ApiError) || err.status !== 401) {
        setNotice({ kind: "error", text: "Your connected apps could not be loaded." });
      }
    }
  };

  useEffect(() => {
    if (!props.initialKeys) load();
    // Back from an editor that just connected: show it.
    const refresh = () => {
      if (document.visibilityState === "visible") load();
    };
    document.addEventListener("visibilitychange", refresh);
    return () => document.removeEventListener("visibilitychange", refresh);
  }, []);

  const revoke = async (key: KeyListingBody) => {
    setBusy(true);
    try {
      await api(props.mode, `/api/keys/${encodeURIComponent(key.id)}`, { method: "DELETE" });
      setKeys((list) => list?.filter((k) => k.id !== key.id) ?? null);
      setNotice({
        kind: "ok",
        text: `${key.name} is disconnected: its key stopped working. Your other keys still work.`,
      });
    } catch (err) {
      const why = err instanceof ApiError ? err.message : "the server could not be reached";
      setNotice({ kind: "error", text: `Revoking failed: ${why}` });
    } finally {
      setBusy(false);
      setConfirming(null);
    }
  };

  const apps = keys?.filter((k) => !k.default) ?? [];
  return (
    <section class="card" id="connected-apps" aria-labelledby="apps-title" data-testid="apps">
      <h2 id="apps-title">Connected apps</h2>
      <p class="muted small">
        Every editor you approve gets its own key, so you can see what each one used and cut one off
        without touching the others. All your keys share your one set of limits.
      </p>
      {notice && (
        <p
          class={`notice ${notice.kind === "ok" ? "notice-ok" : "notice-error"}`}
          role={notice.kind === "ok" ? "status" : "alert"}
        >
          {notice.text}
        </p>
      )}
      {keys === null ? <p class="muted">Loading your keys…</p> : (
        <ul class="apps-list">
          {keys.map((key) => (
            <li class="apps-item" key={key.id} data-testid={`app-${key.id}`}>
              <div class="apps-head">
                <strong class="apps-name">{key.name}</strong>
                <code class="apps-prefix">{key.keyPrefix}…</code>
              </div>
              <dl class="apps-facts">
                <div>
                  <dt>{key.default ? "Created" : "Connected"}</dt>
                  <dd>{formatDateTime(key.createdAt)}</dd>
                </div>
                <div>
                  <dt>Last used</dt>
                  <dd>{key.lastUsedAt ? formatDateTime(key.lastUsedAt) : "Never"}</dd>
                </div>
                <div>
                  <dt>Last 30 days</dt>
                  <dd data-testid="app-usage">
                    {formatCount(key.usage30d.requests, "request")} ·{" "}
                    {formatTokens(key.usage30d.totalTokens)} tokens ·{" "}
                    {formatUsd(key.usage30d.costUsd)}
                  </dd>
                </div>
              </dl>
              {key.default
                ? (
                  <p class="muted small apps-note">
                    Your dashboard key. Rotate it in the key section if it leaked.
                  </p>
                )
                : confirming === key.id
                ? (
                  <div class="confirm" role="group" aria-label={`Confirm revoking ${key.name}`}>
                    <p>
                      <strong>Revoke {key.name}?</strong>{" "}
                      Its key stops working at once; connect it again to get a new one.
                    </p>
                    <button class="btn" type="button" onClick={() => setConfirming(null)}>
                      Cancel
                    </button>
                    <button
                      class="btn btn-danger-solid"
                      type="button"
                      disabled={busy}
                      onClick={() => revoke(key)}
                    >
                      {busy ? "Revoking…" : "Yes, revoke"}
                    </button>
                  </div>
                )
                : (
                  <div class="confirm">
                    <button
                      class="btn btn-danger"
                      type="button"
                      aria-label={`Revoke ${key.name}`}
                      onClick={() => {
                        setNotice(null);
                        setConfirming(key.id);
                      }}
                    >
                      Revoke…
                    </button>
                  </div>
                )}
            </li>
          ))}
        </ul>
      )}
      {keys !== null && apps.length === 0 && (
        <p class="muted small" data-testid="apps-empty">
          No apps connected yet. An editor built on Keyway connects after one click here; on a
          remote machine or in a terminal, open the <a href="/connect/device">device page</a>{" "}
          and enter the code it shows.
        </p>
      )}
    </section>
  );
}
