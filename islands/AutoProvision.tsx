/**
 * The dashboard island: the account's true state first, then (for returning users) usage and
 * what is left, then the key and how to use it — collapsible once the key has been used. It
 * provisions the caller's key on first visit (POST /api/key, idempotent, retried with backoff).
 * The server renders it with the usage it read, so nothing moves when the page comes alive.
 */
import { sumUsage } from "../lib/usage/totals.ts";
import { ModelTable } from "../components/ModelTable.tsx";
import { useEffect, useState } from "preact/hooks";
import type { ComponentChildren } from "preact";
import { Meter } from "../components/Meter.tsx";
import {
  formatCount,
  formatDateTime,
  formatInt,
  formatLimit,
  formatTokens,
  formatUsd,
  formatWait,
} from "../lib/core/format.ts";
import type {
  AccountStateBody,
  KeyBody,
  LimitsBody,
  PauseReasonBody,
  UsageBody,
} from "../lib/api_types.ts";
import { api, ApiError, type AuthMode, copyText, sleep } from "./client.ts";
import DailyChart, { lastDays } from "./DailyChart.tsx";
import { recipes } from "../lib/recipes/recipes.ts";
import { SetupTabs } from "../components/SetupTabs.tsx";
import { TestRequest } from "../components/TestRequest.tsx";
import { SupportLink } from "../components/SupportLink.tsx";

type Limits = LimitsBody;
type KeyInfo = KeyBody;
type AccountStateView = AccountStateBody;
type UsageView = UsageBody;
type PauseReason = PauseReasonBody;

export interface AutoProvisionProps {
  [key: string]: unknown;
  mode: AuthMode;
  /** The gateway base URL the server expects (`PUBLIC_URL/v1`, or GLM's in shared mode). */
  baseUrl: string;
  /** Where Anthropic clients point (`PUBLIC_URL`, or GLM's Anthropic endpoint in shared mode). */
  anthropicBaseUrl: string;
  /** Models to put in the set-up snippets, the default first. */
  models: string[];
  /** SUPPORT_URL: where a disabled or paused user gets help (null: not configured). */
  supportUrl: string | null;
  /** The caller's usage as the server read it for this page (null: load it here). */
  initialUsage: UsageView | null;
}

type KeyState =
  | { status: "loading"; attempt: number; note?: string }
  | { status: "ready"; key: KeyInfo }
  | { status: "error"; message: string; fatal: boolean; code: string };

type UsageState =
  | { status: "loading" }
  | { status: "ready"; usage: UsageView }
  | { status: "unavailable"; message: string };

const RETRY_DELAYS_MS = [1000, 2000, 4000, 8000];

const MASK = "•".repeat(20);

function masked(key: string) {
  return key.slice(0, 7) + MASK;
}

function friendly(err: unknown): { message: string; fatal: boolean; code: string } {
  if (!(err instanceof ApiError)) {
    return { message: "Something went wrong.", fatal: false, code: "unknown" };
  }
  const { code } = err;
  if (err.status === 401) {
    return {
      message: "Your session has expired. Sign in again to see your key.",
      fatal: true,
      code,
    };
  }
  if (code === "user_disabled") {
    return { message: "Your account is disabled.", fatal: true, code };
  }
  if (code === "user_deleted") {
    return { message: "This account has been deleted.", fatal: true, code };
  }
  if (err.status === 0) {
    return { message: "We could not reach the server. Check your connection.", fatal: false, code };
  }
  return { message: err.message, fatal: !err.retryable, code };
}

export default function AutoProvision(props: AutoProvisionProps) {
  const [keyState, setKeyState] = useState<KeyState>({ status: "loading", attempt: 0 });
  const [usage, setUsage] = useState<UsageState>(
    props.initialUsage ? { status: "ready", usage: props.initialUsage } : { status: "loading" },
  );
  const [revealed, setRevealed] = useState(false);
  const [announce, setAnnounce] = useState("");
  const [copied, setCopied] = useState<string | null>(null);
  const [confirming, setConfirming] = useState(false);
  const [rotating, setRotating] = useState(false);
  const [notice, setNotice] = useState<{ kind: "ok" | "error"; text: string } | null>(null);
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
      setUsage({ status: "ready", usage: await api<UsageView>(props.mode, "/api/usage?days=30") });
    } catch (err) {
      const message = err instanceof ApiError && err.status === 404
        ? "Usage statistics are not available on this server yet."
        : `Usage could not be loaded: ${friendly(err).message}`;
      setUsage((u) => (u.status === "ready" ? u : { status: "unavailable", message }));
    }
  };

  // Without server-rendered usage, load it once the key settled (provisioning creates the user).
  useEffect(() => {
    if (!props.initialUsage && keyState.status !== "loading") loadUsage();
  }, [keyState.status]);

  // Back from the editor: the state and usage may have changed (a quota spent, a reset).
  useEffect(() => {
    const refresh = () => {
      if (document.visibilityState === "visible") loadUsage();
    };
    document.addEventListener("visibilitychange", refresh);
    return () => document.removeEventListener("visibilitychange", refresh);
  }, []);

  const copy = async (what: string, label: string, text: string) => {
    const ok = await copyText(text);
    setCopied(ok ? what : null);
    // Emptied first, so copying the same thing twice is announced twice.
    setAnnounce("");
    if (ok) setTimeout(() => setAnnounce(`${label} copied to the clipboard.`), 50);
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
  const data = usage.status === "ready" ? usage.usage : null;
  const refusedCode = keyState.status === "error" ? keyState.code : null;
  const state: AccountStateView | null = refusedCode === "user_disabled"
    ? { status: "disabled" }
    : refusedCode === "user_deleted"
    ? { status: "deleted" }
    : data?.state ?? (ready ? { status: "active" } : null);
  const refused = state?.status === "disabled" || state?.status === "deleted";
  // Returning users (any request in the window) see usage first and the set-up folded away; so
  // do refused users, whose key would not work anyway. A visit that began with no requests keeps
  // the newcomer's layout after its first (test) request, rather than reshuffling the page.
  const [newcomer, setNewcomer] = useState<boolean | null>(
    props.initialUsage ? !hadRequests(props.initialUsage) : null,
  );
  useEffect(() => {
    if (newcomer === null && data) setNewcomer(!hadRequests(data));
  }, [data]);
  const returning = refused || (!!data && !(newcomer ?? !hadRequests(data)));
  const tryIt = !refused && !returning && ready?.mode === "proxy"
    ? <TestRequest apiKey={ready.apiKey} model={props.models[0]} onDone={loadUsage} />
    : null;

  const keySection = (
    <KeyAndSetup
      props={props}
      keyState={keyState}
      ready={ready}
      revealed={revealed}
      setRevealed={setRevealed}
      copied={copied}
      copy={copy}
      notice={notice}
      setNotice={setNotice}
      confirming={confirming}
      setConfirming={setConfirming}
      rotating={rotating}
      rotate={rotate}
      retry={() => {
        setKeyState({ status: "loading", attempt: 0 });
        setRun(run + 1);
      }}
      open={!returning}
      refused={refused}
    />
  );
  return (
    <div class="stack">
      <p class="sr-only" role="status" aria-live="polite" data-testid="announce">{announce}</p>
      <StateBanner state={state} usage={data} supportUrl={props.supportUrl} />
      {returning ? null : keySection}
      <UsagePanel
        state={usage}
        limits={data?.limits ?? ready?.limits ?? null}
        returning={returning}
        refused={refused}
        tryIt={tryIt}
      />
      {returning ? keySection : null}
    </div>
  );
}

const REASON_TEXT: Record<PauseReason, string> = {
  requests_per_day: "today's requests are used up",
  tokens_per_day: "today's token quota is used up",
  budget_monthly: "this month's budget is spent",
};

function StateBanner(
  { state, usage, supportUrl }: {
    state: AccountStateView | null;
    usage: UsageView | null;
    supportUrl: string | null;
  },
) {
  if (!state) {
    return (
      <section class="account-state" data-testid="account-state" data-status="loading">
        <h2>
          <span class="status">Checking your account…</span>
        </h2>
        <p class="muted small">One moment.</p>
      </section>
    );
  }
  if (state.status === "disabled" || state.status === "deleted") {
    return (
      <section
        class="account-state account-state-danger"
        data-testid="account-state"
        data-status={state.status}
        aria-labelledby="state-title"
      >
        <h2 id="state-title">
          <span class="status status-danger">
            {state.status === "disabled" ? "Disabled" : "Deleted"}
          </span>
          {state.status === "disabled"
            ? "Your account is disabled"
            : "This account has been deleted"}
        </h2>
        <p>
          {state.status === "disabled"
            ? "Your key does not work: every request is refused (403 user_disabled) until your account is enabled again."
            : "Its keys were revoked. Usage stays on record for billing."}
          {state.status === "disabled" && supportUrl ? " To ask why, or to have it enabled: " : ""}
          {state.status === "disabled" ? <SupportLink href={supportUrl} /> : null}
        </p>
      </section>
    );
  }
  if (state.status === "paused") {
    const until = Date.parse(state.until);
    return (
      <section
        class="account-state account-state-warn"
        data-testid="account-state"
        data-status="paused"
        aria-labelledby="state-title"
      >
        <h2 id="state-title">
          <span class="status status-warn">Paused</span>
          Paused until {formatDateTime(until)}
        </h2>
        <p>
          Requests are refused (403) because{" "}
          {state.reasons.map((r) => REASON_TEXT[r]).join(", and ")}
          . {state.reason === "budget_monthly"
            ? "The budget resets on the 1st of the month (UTC)"
            : "Daily limits reset at 00:00 UTC"} — in{" "}
          {formatWait(until - Date.now())}. Your key stays the same.
          {supportUrl ? " Need more before then? " : ""}
          <SupportLink href={supportUrl} />
        </p>
      </section>
    );
  }
  const left = usage
    ? [
      formatCount(usage.remaining.day, "request"),
      usage.remaining.tokensToday === null
        ? null
        : formatCount(usage.remaining.tokensToday, "token"),
    ].filter(Boolean).join(" and ")
    : null;
  return (
    <section
      class="account-state account-state-ok"
      data-testid="account-state"
      data-status="active"
      aria-labelledby="state-title"
    >
      <h2 id="state-title">
        <span class="status status-ok">Active</span>
        Your key works
      </h2>
      <p>
        {left ? `${left} left today` : "Limits load below"}
        {usage && usage.limits.budgetUsdMonthly !== null && usage.remaining.budgetUsd !== null
          ? `, ${formatUsd(usage.remaining.budgetUsd)} of this month's budget`
          : ""}. Daily limits reset at 00:00 UTC.
      </p>
    </section>
  );
}

type Day = UsageBody["days"][number];
type Measure = "requests" | "tokens" | "cost";
/** What the 30-day chart can show; each bar's readout gives the other two. */
const MEASURES: Record<
  Measure,
  {
    label: string;
    unit: "requests" | "tokens" | "usd";
    pick(d: Day): number;
    others(d: Day): string;
  }
> = {
  requests: {
    label: "Requests",
    unit: "requests",
    pick: (d) => d.requests,
    others: (d) => `${formatCount(d.totalTokens, "token")} · ${formatUsd(d.costUsd)}`,
  },
  tokens: {
    label: "Tokens",
    unit: "tokens",
    pick: (d) => d.totalTokens,
    others: (d) => `${formatCount(d.requests, "request")} · ${formatUsd(d.costUsd)}`,
  },
  cost: {
    label: "Cost",
    unit: "usd",
    pick: (d) => d.costUsd,
    others: (d) => `${formatCount(d.requests, "request")} · ${formatCount(d.totalTokens, "token")}`,
  },
};

const hadRequests = (u: UsageView) => u.days.some((d) => d.requests > 0);

function UsagePanel(
  { state, limits, returning, refused, tryIt }: {
    state: UsageState;
    limits: Limits | null;
    returning: boolean;
    /** Disabled or deleted: the meters are off, nothing is left to use. */
    refused: boolean;
    /** The test request, for a newcomer (kept in place when the first request arrives). */
    tryIt: ComponentChildren;
  },
) {
  const [measure, setMeasure] = useState<Measure>("requests");
  const usage = state.status === "ready" ? state.usage : null;
  if (!usage || !limits) {
    return (
      <section class="card" aria-labelledby="usage-title">
        <h2 id="usage-title">Usage</h2>
        {state.status === "unavailable"
          ? <p class="notice small" role="status">{state.message}</p>
          : <p class="muted small">Loading usage…</p>}
      </section>
    );
  }
  const { pick, unit, others } = MEASURES[measure];
  const points = lastDays(
    30,
    new Map(usage.days.map((d) => [d.date, { value: pick(d), detail: others(d) }])),
    Date.parse(`${usage.days[usage.days.length - 1]?.date ?? ""}T12:00:00Z`) || Date.now(),
  );
  const total = sumUsage(usage.days);
  const empty = total.requests === 0;
  const spent = usage.thisMonth?.costUsd ??
    Math.max(0, (limits.budgetUsdMonthly ?? 0) - (usage.remaining.budgetUsd ?? 0));
  return (
    <div class="grid grid-2 usage-grid">
      <section class="card" aria-labelledby="today-title">
        <div class="card-head">
          <h2 id="today-title">Today</h2>
          <p class="muted small">UTC day</p>
        </div>
        <div class="meters">
          <Meter
            label="Requests today"
            used={usage.today.requests}
            limit={limits.rpd}
            note="resets at 00:00 UTC"
            testId="meter-requests"
            off={refused}
          />
          <Meter
            label="Tokens today"
            used={usage.today.totalTokens}
            limit={limits.tokensPerDay}
            note="resets at 00:00 UTC"
            testId="meter-tokens"
            off={refused}
          />
          <Meter
            label="Spend this month"
            used={spent}
            limit={limits.budgetUsdMonthly}
            format={formatUsd}
            note="resets on the 1st (UTC)"
            testId="meter-budget"
            off={refused}
          />
        </div>
        {refused
          ? (
            <p class="muted small" style={{ margin: 0 }} data-testid="limits-off">
              No requests are served while your account is disabled; these limits apply again once
              it is enabled.
            </p>
          )
          : (
            <p class="muted small" style={{ margin: 0 }}>
              Also at most {formatLimit(limits.rpm)} requests a minute; today so far:{" "}
              {formatUsd(usage.today.costUsd)}.
            </p>
          )}
      </section>
      <section class="card" aria-labelledby="usage-title">
        <div class="card-head">
          <h2 id="usage-title">Last 30 days</h2>
          {empty ? null : (
            <div class="segmented" role="group" aria-label="Chart per UTC day">
              {(Object.keys(MEASURES) as Measure[]).map((m) => (
                <button
                  key={m}
                  type="button"
                  aria-pressed={m === measure}
                  onClick={() => setMeasure(m)}
                >
                  {MEASURES[m].label}
                </button>
              ))}
            </div>
          )}
        </div>
        {empty
          ? (
            <div class="empty-state" data-testid="usage-empty">
              {refused ? <p class="muted">No requests in the last 30 days.</p> : (
                <>
                  <p class="empty-title">Your first request will show here.</p>
                  <p class="muted small">
                    Set up a tool with your key{tryIt ? ", or try Keyway now:" : "."}
                  </p>
                </>
              )}
            </div>
          )
          : null}
        {tryIt}
        {empty ? null : (
          <>
            <div class="stats">
              <div class="stat">
                <span class="value" data-testid="usage-requests">{formatInt(total.requests)}</span>
                <span class="label">requests</span>
              </div>
              <div class="stat">
                <span class="value" data-testid="usage-tokens">
                  {formatTokens(total.totalTokens)}
                </span>
                <span class="label">tokens</span>
              </div>
              <div class="stat">
                <span class="value" data-testid="usage-cost">{formatUsd(total.costUsd)}</span>
                <span class="label">cost</span>
              </div>
            </div>
            <DailyChart
              points={points}
              kind={unit}
              title={`${MEASURES[measure].label} per day, last 30 days`}
              testId="usage-chart"
            />
            <h3 style={{ marginTop: "1rem" }}>By model</h3>
            {usage.byModel.length > 0
              ? <ModelTable rows={usage.byModel} testId="by-model" />
              : (
                <p class="muted small" style={{ margin: 0 }}>
                  {returning
                    ? "No requests in this window."
                    : "No requests yet: set up a tool above."}
                </p>
              )}
          </>
        )}
      </section>
    </div>
  );
}

function KeyAndSetup(
  p: {
    props: AutoProvisionProps;
    keyState: KeyState;
    ready: KeyInfo | null;
    revealed: boolean;
    setRevealed: (v: boolean) => void;
    copied: string | null;
    copy: (what: string, label: string, text: string) => void;
    notice: { kind: "ok" | "error"; text: string } | null;
    setNotice: (n: { kind: "ok" | "error"; text: string } | null) => void;
    confirming: boolean;
    setConfirming: (v: boolean) => void;
    rotating: boolean;
    rotate: () => void;
    retry: () => void;
    open: boolean;
    /** Disabled or deleted: no set-up snippets with a key that would not work. */
    refused: boolean;
  },
) {
  const { props, keyState, ready, revealed, copied, copy, notice } = p;
  const baseUrl = ready?.baseUrl ?? props.baseUrl;
  const anthropicBaseUrl = ready?.anthropicBaseUrl ?? props.anthropicBaseUrl;
  const shownKey = ready ? (revealed ? ready.apiKey : masked(ready.apiKey)) : "kw_••••" + MASK;
  const list = (apiKey: string) =>
    recipes({ baseUrl, anthropicBaseUrl, apiKey, models: props.models });
  const disabled = keyState.status === "error" &&
    (keyState.code === "user_disabled" || keyState.code === "user_deleted");
  return (
    <details class="card setup" open={p.open} data-testid="setup">
      <summary>
        <h2 id="key-title">Your API key and set-up</h2>
        <span class="muted small">
          {ready ? `${ready.keyPrefix}… · created ${formatDateTime(ready.createdAt)}` : ""}
        </span>
      </summary>
      <section aria-labelledby="key-title" class="setup-body">
        {p.refused ? null : (
          <p class="muted small">
            Personal to you. It works in any OpenAI- or Anthropic-compatible tool; your usage counts
            against your limits.
          </p>
        )}
        {p.refused ? null : (
          <div class="key-row">
            <code class="key-value" data-testid="api-key">
              {keyState.status === "error" ? "—" : shownKey}
            </code>
            <button
              class="btn"
              type="button"
              disabled={!ready}
              aria-pressed={revealed}
              onClick={() => p.setRevealed(!revealed)}
            >
              {revealed ? "Hide" : "Reveal"}
            </button>
            <button
              class="btn btn-primary"
              type="button"
              disabled={!ready}
              onClick={() => ready && copy("key", "Key", ready.apiKey)}
            >
              {copied === "key" ? "Copied ✓" : "Copy key"}
            </button>
          </div>
        )}
        {keyState.status === "loading" && keyState.note && (
          <p class="notice notice-warn" role="status" style={{ marginTop: "1rem" }}>
            {keyState.note}
          </p>
        )}
        {keyState.status === "error" && (
          <div
            class="notice notice-error"
            role="alert"
            style={{ marginTop: p.refused ? 0 : "1rem" }}
            data-testid="key-error"
          >
            <p style={{ margin: 0 }}>
              {disabled ? "Your key is not shown: " : "We could not set up your key. "}
              {keyState.message}
            </p>
            {disabled
              ? null
              : keyState.fatal && keyState.message.includes("Sign in")
              ? <a href="/sign-in">Sign in again</a>
              : (
                <button
                  class="btn btn-sm"
                  type="button"
                  style={{ marginTop: "0.5rem" }}
                  onClick={p.retry}
                >
                  Try again
                </button>
              )}
          </div>
        )}
        {p.refused ? null : (
          <dl class="kv">
            <dt>Base URL</dt>
            <dd data-testid="base-url">{baseUrl}</dd>
            <dt>Anthropic base URL</dt>
            <dd data-testid="anthropic-base-url">{anthropicBaseUrl}</dd>
            <dt>Key prefix</dt>
            <dd>
              {ready
                ? ready.keyPrefix
                : keyState.status === "error"
                ? "—"
                : <span class="skeleton">kw_xxxx</span>}
            </dd>
            <dt>Created</dt>
            <dd>
              {ready
                ? formatDateTime(ready.createdAt)
                : keyState.status === "error"
                ? "—"
                : <span class="skeleton">Jan 1, 2026, 00:00 UTC</span>}
            </dd>
          </dl>
        )}
        {notice && (
          <p
            class={`notice ${notice.kind === "ok" ? "notice-ok" : "notice-error"}`}
            role="status"
            style={{ marginTop: "1rem", marginBottom: 0 }}
          >
            {notice.text}
          </p>
        )}
        {p.refused
          ? null
          : p.confirming
          ? (
            <div class="confirm" role="group" aria-label="Confirm key rotation">
              <p>
                <strong>Rotate now?</strong>{" "}
                The current key stops working immediately, everywhere it is used.
              </p>
              <button class="btn" type="button" onClick={() => p.setConfirming(false)}>
                Cancel
              </button>
              <button
                class="btn btn-danger-solid"
                type="button"
                disabled={p.rotating}
                onClick={p.rotate}
              >
                {p.rotating ? "Rotating…" : "Yes, rotate key"}
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
                  p.setNotice(null);
                  p.setConfirming(true);
                }}
              >
                Rotate key…
              </button>
            </div>
          )}

        {p.refused ? null : (
          <SetupTabs
            shown={list(shownKey)}
            real={list(ready?.apiKey ?? shownKey)}
            ready={!!ready}
            copied={copied}
            copy={copy}
          />
        )}
      </section>
    </details>
  );
}
