/**
 * The dashboard island: provisions the caller's key on first visit (POST /api/key, idempotent,
 * retried with backoff) and shows the key, set-up snippets, limits and usage.
 */
import { useEffect, useState } from "preact/hooks";
import { Meter } from "../components/Meter.tsx";
import { lastDays, UsageChart } from "../components/UsageChart.tsx";
import {
  api,
  ApiError,
  type AuthMode,
  copyText,
  fmtCompact,
  fmtInt,
  fmtUsd,
  sleep,
} from "./client.ts";

export interface AutoProvisionProps {
  [key: string]: unknown;
  mode: AuthMode;
  /** The gateway base URL the server expects (`PUBLIC_URL/v1`, or GLM's in shared mode). */
  baseUrl: string;
  /** The site origin, for the extension's fetch('/api/key') snippet. */
  origin: string;
  /** A model to put in the examples. */
  model: string;
}

interface Limits {
  rpm: number;
  rpd: number;
  tokensPerDay: number | null;
  budgetUsdMonthly: number | null;
}

interface KeyInfo {
  apiKey: string;
  baseUrl: string;
  mode: "proxy" | "shared";
  keyPrefix: string;
  userId: string;
  createdAt: string;
  limits: Limits;
}

interface Totals {
  requests: number;
  promptTokens: number;
  completionTokens: number;
  totalTokens: number;
  costUsd: number;
}

interface Usage {
  limits: Limits;
  remaining: {
    minute: number;
    day: number;
    tokensToday: number | null;
    budgetUsd: number | null;
  };
  today: Totals;
  days: (Totals & { date: string })[];
  byModel: (Totals & { model: string })[];
}

type KeyState =
  | { status: "loading"; attempt: number; note?: string }
  | { status: "ready"; key: KeyInfo }
  | { status: "error"; message: string; fatal: boolean };

type UsageState =
  | { status: "loading" }
  | { status: "ready"; usage: Usage }
  | { status: "unavailable"; message: string };

const RETRY_DELAYS_MS = [1000, 2000, 4000, 8000];

const MASK = "•".repeat(20);

const TABS = [["editor", "VS Code"], ["curl", "curl"], ["fetch", "Extension API"]] as const;

function masked(key: string) {
  return key.slice(0, 7) + MASK;
}

function friendly(err: unknown): { message: string; fatal: boolean } {
  if (!(err instanceof ApiError)) return { message: "Something went wrong.", fatal: false };
  if (err.status === 401) {
    return { message: "Your session has expired. Sign in again to see your key.", fatal: true };
  }
  if (err.code === "user_disabled") {
    return { message: "Your account is disabled. Contact the operator.", fatal: true };
  }
  if (err.code === "user_deleted") {
    return { message: "This account has been deleted.", fatal: true };
  }
  if (err.status === 0) {
    return { message: "We could not reach the server. Check your connection.", fatal: false };
  }
  return { message: err.message, fatal: !err.retryable };
}

export default function AutoProvision(props: AutoProvisionProps) {
  const [keyState, setKeyState] = useState<KeyState>({ status: "loading", attempt: 0 });
  const [usage, setUsage] = useState<UsageState>({ status: "loading" });
  const [revealed, setRevealed] = useState(false);
  const [copied, setCopied] = useState<string | null>(null);
  const [confirming, setConfirming] = useState(false);
  const [rotating, setRotating] = useState(false);
  const [notice, setNotice] = useState<{ kind: "ok" | "error"; text: string } | null>(null);
  const [tab, setTab] = useState<"editor" | "curl" | "fetch">("editor");
  const [run, setRun] = useState(0);

  useEffect(() => {
    let cancelled = false;
    (async () => {
      for (let attempt = 0;; attempt++) {
        try {
          const key = await api<KeyInfo>(props.mode, "/api/key", { method: "POST" });
          if (!cancelled) setKeyState({ status: "ready", key });
          return;
        } catch (err) {
          const f = friendly(err);
          if (cancelled) return;
          if (f.fatal || attempt >= RETRY_DELAYS_MS.length) {
            setKeyState({ status: "error", ...f });
            return;
          }
          const wait = err instanceof ApiError && err.retryAfter
            ? Math.min(err.retryAfter * 1000, 30_000)
            : RETRY_DELAYS_MS[attempt];
          setKeyState({
            status: "loading",
            attempt: attempt + 1,
            note: `${f.message} Retrying in ${Math.round(wait / 1000)} s…`,
          });
          await sleep(wait);
        }
      }
    })();
    return () => {
      cancelled = true;
    };
  }, [run]);

  const loadUsage = async () => {
    try {
      setUsage({ status: "ready", usage: await api<Usage>(props.mode, "/api/usage?days=30") });
    } catch (err) {
      const message = err instanceof ApiError && err.status === 404
        ? "Usage statistics are not available on this server yet."
        : `Usage could not be loaded: ${friendly(err).message}`;
      setUsage({ status: "unavailable", message });
    }
  };

  useEffect(() => {
    if (keyState.status === "ready") loadUsage();
  }, [keyState.status]);

  const copy = async (what: string, text: string) => {
    const ok = await copyText(text);
    setCopied(ok ? what : null);
    if (!ok) setNotice({ kind: "error", text: "Copying failed: select the text and copy it." });
    setTimeout(() => setCopied((c) => (c === what ? null : c)), 2000);
  };

  const rotate = async () => {
    setRotating(true);
    try {
      const key = await api<KeyInfo>(props.mode, "/api/key/rotate", { method: "POST" });
      setKeyState({ status: "ready", key });
      setRevealed(false);
      setNotice({
        kind: "ok",
        text: "New key created. The old key stopped working: update your editor's settings.",
      });
    } catch (err) {
      setNotice({ kind: "error", text: `Rotation failed: ${friendly(err).message}` });
    } finally {
      setRotating(false);
      setConfirming(false);
    }
  };

  const ready = keyState.status === "ready" ? keyState.key : null;
  const baseUrl = ready?.baseUrl ?? props.baseUrl;
  const shownKey = ready ? (revealed ? ready.apiKey : masked(ready.apiKey)) : "kw_••••" + MASK;
  const keyFor = (real: boolean) => (real && ready ? ready.apiKey : shownKey);

  const snippets = {
    editor: (k: string) =>
      JSON.stringify(
        {
          models: [{
            title: `${props.model} (Keyway)`,
            provider: "openai",
            model: props.model,
            apiBase: baseUrl,
            apiKey: k,
          }],
        },
        null,
        2,
      ),
    curl: (k: string) =>
      [
        `curl ${baseUrl}/chat/completions \\`,
        `  -H "Authorization: Bearer ${k}" \\`,
        `  -H "Content-Type: application/json" \\`,
        `  -d '{"model": "${props.model}", "messages": [{"role": "user", "content": "Hello!"}]}'`,
      ].join("\n"),
    fetch: (_k: string) =>
      [
        `// In the extension: exchange the signed-in user's Clerk session for their key.`,
        `const res = await fetch("${props.origin}/api/key", {`,
        `  headers: { Authorization: \`Bearer \${clerkSessionToken}\` },`,
        `});`,
        `const { apiKey, baseUrl } = await res.json();`,
        `// then call \`\${baseUrl}/chat/completions\` with Authorization: Bearer \${apiKey}`,
      ].join("\n"),
  };

  return (
    <div class="stack">
      <p class="sr-only" role="status" aria-live="polite">
        {copied ? "Copied to the clipboard." : ""}
      </p>
      <section class="card" aria-labelledby="key-title">
        <div class="card-head">
          <h2 id="key-title">Your API key</h2>
          {ready
            ? <span class="status status-ok">Active</span>
            : keyState.status === "error"
            ? <span class="status status-danger">Unavailable</span>
            : <span class="status">Preparing…</span>}
        </div>
        <p class="muted small">
          Personal to you. It works in any OpenAI-compatible tool; your usage counts against your
          limits below.
        </p>
        <div class="key-row">
          <code class="key-value" data-testid="api-key" aria-live="polite">
            {keyState.status === "error" ? "—" : shownKey}
          </code>
          <button
            class="btn"
            type="button"
            disabled={!ready}
            aria-pressed={revealed}
            onClick={() => setRevealed(!revealed)}
          >
            {revealed ? "Hide" : "Reveal"}
          </button>
          <button
            class="btn btn-primary"
            type="button"
            disabled={!ready}
            onClick={() => ready && copy("key", ready.apiKey)}
          >
            {copied === "key" ? "Copied ✓" : "Copy key"}
          </button>
        </div>
        {keyState.status === "loading" && keyState.note && (
          <p class="notice notice-warn" role="status" style={{ marginTop: "1rem" }}>
            {keyState.note}
          </p>
        )}
        {keyState.status === "error" && (
          <div class="notice notice-error" role="alert" style={{ marginTop: "1rem" }}>
            <p style={{ margin: 0 }}>
              We could not set up your key. {keyState.message}
            </p>
            {keyState.fatal && keyState.message.includes("Sign in")
              ? <a href="/sign-in">Sign in again</a>
              : (
                <button
                  class="btn btn-sm"
                  type="button"
                  style={{ marginTop: "0.5rem" }}
                  onClick={() => {
                    setKeyState({ status: "loading", attempt: 0 });
                    setRun(run + 1);
                  }}
                >
                  Try again
                </button>
              )}
          </div>
        )}
        <dl class="kv">
          <dt>Base URL</dt>
          <dd data-testid="base-url">{baseUrl}</dd>
          <dt>Key prefix</dt>
          <dd>{ready ? ready.keyPrefix : <span class="skeleton">kw_xxxx</span>}</dd>
          <dt>Created</dt>
          <dd>
            {ready
              ? new Date(ready.createdAt).toISOString().slice(0, 16).replace("T", " ") + " UTC"
              : <span class="skeleton">0000-00-00 00:00 UTC</span>}
          </dd>
        </dl>
        {notice && (
          <p
            class={`notice ${notice.kind === "ok" ? "notice-ok" : "notice-error"}`}
            role="status"
            style={{ marginTop: "1rem", marginBottom: 0 }}
          >
            {notice.text}
          </p>
        )}
        {confirming
          ? (
            <div class="confirm" role="group" aria-label="Confirm key rotation">
              <p>
                <strong>Rotate now?</strong>{" "}
                The current key stops working immediately, everywhere it is used.
              </p>
              <button class="btn" type="button" onClick={() => setConfirming(false)}>
                Cancel
              </button>
              <button
                class="btn btn-danger-solid"
                type="button"
                disabled={rotating}
                onClick={rotate}
              >
                {rotating ? "Rotating…" : "Yes, rotate key"}
              </button>
            </div>
          )
          : (
            <div class="confirm">
              <p class="muted small">Leaked it, or want a fresh one?</p>
              <button
                class="btn btn-danger"
                type="button"
                disabled={!ready || ready.mode === "shared"}
                onClick={() => {
                  setNotice(null);
                  setConfirming(true);
                }}
              >
                Rotate key…
              </button>
            </div>
          )}
      </section>

      <section class="card" aria-labelledby="setup-title">
        <div class="card-head">
          <h2 id="setup-title">Use it in your editor</h2>
          <p class="muted small">No other set-up needed.</p>
        </div>
        <div class="tabs" role="tablist" aria-label="Set-up snippets">
          {TABS
            .map(([id, label]) => (
              <button
                key={id}
                type="button"
                role="tab"
                id={`tab-${id}`}
                aria-selected={tab === id}
                aria-controls="snippet-panel"
                onClick={() => setTab(id)}
              >
                {label}
              </button>
            ))}
        </div>
        <div id="snippet-panel" role="tabpanel" aria-labelledby={`tab-${tab}`}>
          <p class="muted small">
            {tab === "editor"
              ? "Paste into your extension's config (Continue's config.json shown; any OpenAI-compatible extension takes the same base URL and key)."
              : tab === "curl"
              ? "Check that everything works from a terminal."
              : "For extension authors: fetch the key with the user's Clerk session token."}
          </p>
          <div class="code">
            <pre><code data-testid={`snippet-${tab}`}>{snippets[tab](keyFor(revealed))}</code></pre>
            <button
              class="btn btn-sm"
              type="button"
              disabled={!ready}
              onClick={() => copy(tab, snippets[tab](keyFor(true)))}
            >
              {copied === tab ? "Copied ✓" : "Copy"}
            </button>
          </div>
        </div>
      </section>

      <UsagePanel state={usage} keyLimits={ready?.limits ?? null} />
    </div>
  );
}

function UsagePanel({ state, keyLimits }: { state: UsageState; keyLimits: Limits | null }) {
  const usage = state.status === "ready" ? state.usage : null;
  const limits = usage?.limits ?? keyLimits;
  const sk = (text: string) => <span class="skeleton">{text}</span>;
  const days = usage?.days ?? [];
  const points = lastDays(30, new Map(days.map((d) => [d.date, d.requests])));
  const total = days.reduce(
    (t, d) => ({
      requests: t.requests + d.requests,
      totalTokens: t.totalTokens + d.totalTokens,
      costUsd: t.costUsd + d.costUsd,
    }),
    { requests: 0, totalTokens: 0, costUsd: 0 },
  );
  return (
    <div class="grid grid-2">
      <section class="card" aria-labelledby="limits-title">
        <div class="card-head">
          <h2 id="limits-title">Limits today</h2>
          <p class="muted small">Days reset at 00:00 UTC</p>
        </div>
        {state.status === "unavailable" && !usage && (
          <p class="notice small" role="status">{state.message}</p>
        )}
        <Meter
          label="Requests today"
          used={usage?.today.requests ?? 0}
          limit={limits?.rpd ?? null}
          pending={!usage}
        />
        <Meter
          label="Requests this minute"
          used={usage ? Math.max(0, usage.limits.rpm - usage.remaining.minute) : 0}
          limit={limits?.rpm ?? null}
          pending={!usage}
        />
        <Meter
          label="Tokens today"
          used={usage?.today.totalTokens ?? 0}
          limit={limits?.tokensPerDay ?? null}
          format={fmtCompact}
          pending={!usage}
        />
        {usage && usage.limits.budgetUsdMonthly !== null && (
          <Meter
            label="Spend this month"
            used={Math.max(0, usage.limits.budgetUsdMonthly - (usage.remaining.budgetUsd ?? 0))}
            limit={usage.limits.budgetUsdMonthly}
            format={fmtUsd}
          />
        )}
        <h3 style={{ marginTop: "1.25rem" }}>Your limits</h3>
        <dl class="kv" style={{ marginTop: 0 }}>
          <dt>Requests</dt>
          <dd>
            {limits
              ? `${fmtInt(limits.rpm)} / minute · ${fmtInt(limits.rpd)} / day`
              : sk("60 / minute")}
          </dd>
          <dt>Tokens</dt>
          <dd>
            {limits
              ? (limits.tokensPerDay ? `${fmtInt(limits.tokensPerDay)} / day` : "unlimited")
              : sk("unlimited")}
          </dd>
          <dt>Budget</dt>
          <dd>
            {limits
              ? (limits.budgetUsdMonthly
                ? `${fmtUsd(limits.budgetUsdMonthly)} / month`
                : "unlimited")
              : sk("unlimited")}
          </dd>
        </dl>
      </section>
      <section class="card" aria-labelledby="usage-title">
        <div class="card-head">
          <h2 id="usage-title">Last 30 days</h2>
          <p class="muted small">Requests per day</p>
        </div>
        <div class="stats">
          <div class="stat">
            <span class="value" data-testid="usage-requests">
              {usage ? fmtCompact(total.requests) : sk("0")}
            </span>
            <span class="label">requests</span>
          </div>
          <div class="stat">
            <span class="value">{usage ? fmtCompact(total.totalTokens) : sk("0")}</span>
            <span class="label">tokens</span>
          </div>
          <div class="stat">
            <span class="value">{usage ? fmtUsd(total.costUsd) : sk("$0.00")}</span>
            <span class="label">cost</span>
          </div>
        </div>
        <UsageChart
          points={points}
          label="requests"
          format={fmtCompact}
          width={420}
          height={150}
        />
        <h3 style={{ marginTop: "1rem" }}>By model</h3>
        {usage && usage.byModel.length > 0
          ? (
            <div class="table-wrap">
              <table>
                <thead>
                  <tr>
                    <th scope="col">Model</th>
                    <th scope="col" class="num">Requests</th>
                    <th scope="col" class="num">Tokens</th>
                    <th scope="col" class="num">Cost</th>
                  </tr>
                </thead>
                <tbody>
                  {usage.byModel.map((m) => (
                    <tr key={m.model}>
                      <td>
                        <code>{m.model}</code>
                      </td>
                      <td class="num">{fmtInt(m.requests)}</td>
                      <td class="num">{fmtCompact(m.totalTokens)}</td>
                      <td class="num">{fmtUsd(m.costUsd)}</td>
                    </tr>
                  ))}
                </tbody>
              </table>
            </div>
          )
          : (
            <p class="muted small" style={{ margin: 0 }}>
              {usage ? "No requests yet — try the curl example above." : sk("Loading usage…")}
            </p>
          )}
      </section>
    </div>
  );
}
