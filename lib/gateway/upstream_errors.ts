/**
 * GLM's refusals that are not the user's doing (CONTRACT §5 "Upstream refusals"): the operator's
 * master key refused, the account out of balance or locked, the account throttled. They are
 * answered with Keyway's own error — GLM's messages ("recharge your account") never reach users —
 * cost the user nothing, and tell the operator (§7 Events).
 *
 * GLM answers these with HTTP 401/403 (authentication, codes 1000–1004) or 429 (account codes
 * 1110–1121, 1309; throttling: 1302–1305, 1308, 1310, 1312, 1313 and any other 429) and a body
 * `{"error": {"code": "1113", "message": "…"}}` (docs.bigmodel.cn/cn/api/api-code). Its
 * Anthropic-compatible endpoint uses the same statuses.
 */
import { type Clock, systemClock } from "../core/clock.ts";
import { AppError } from "../core/errors.ts";
import type { Logger } from "../core/log.ts";

export type UpstreamAlert =
  | "upstream.key_rejected"
  | "upstream.balance_exhausted"
  | "upstream.throttled";

export interface UpstreamRefusal {
  /** What the user gets. */
  error: AppError;
  /** What the operator is told (alerts are de-duplicated per type and hour). */
  alert: UpstreamAlert;
  /** GLM's business code, when it sent one. */
  upstreamCode: string | null;
  /** GLM's own message, for the operator's log and alert (never the user's answer). */
  upstreamMessage: string | null;
}

/** The master key or the account is refused: codes that mean the operator must act. */
const KEY_REJECTED = new Set([
  "1000",
  "1001",
  "1002",
  "1003",
  "1004",
  "1110",
  "1111",
  "1112",
  "1121",
]);
const BALANCE = new Set(["1113", "1309"]);
/** Throttling without a Retry-After: GLM's concurrency frees up within seconds. */
const DEFAULT_RETRY_AFTER_S = 5;

/** Statuses whose body must be read to tell the user's mistakes from the operator's problems. */
export function needsClassifying(status: number): boolean {
  return status === 401 || status === 403 || status === 429;
}

/**
 * The refusal for an upstream error answer whose status needsClassifying(): every such answer is
 * the operator's account's, not the user's. `body` is the error body (bounded); `retryAfter` the
 * upstream's header.
 */
export function classifyRefusal(
  status: number,
  body: Uint8Array | null,
  retryAfter: string | null,
  now: number = systemClock(),
): UpstreamRefusal {
  const { code, message } = errorFields(body);
  const spared = "Nothing was counted against your limits.";
  // The operator must act (a new key, a top-up): an SDK retrying in seconds only repeats the
  // refusal against GLM (CONTRACT §4's x-should-retry).
  const noRetry = { "x-should-retry": "false" };
  if (status === 401 || status === 403 || (code !== null && KEY_REJECTED.has(code))) {
    return {
      error: new AppError(
        "upstream_unavailable",
        "The service's upstream account refused this request (its operator has been told). " +
          `Please try again later. ${spared}`,
        noRetry,
        503,
      ),
      alert: "upstream.key_rejected",
      upstreamCode: code,
      upstreamMessage: message,
    };
  }
  if (code !== null && BALANCE.has(code)) {
    return {
      error: new AppError(
        "upstream_unavailable",
        "The service's upstream account cannot serve requests right now (its operator has been " +
          `told). Please try again later. ${spared}`,
        noRetry,
        503,
      ),
      alert: "upstream.balance_exhausted",
      upstreamCode: code,
      upstreamMessage: message,
    };
  }
  // 429 with a throttling code, or with none we know: the account is throttled.
  const seconds = retryAfterSeconds(retryAfter, now) ?? DEFAULT_RETRY_AFTER_S;
  return {
    error: new AppError(
      "upstream_busy",
      `The upstream is busy (the service's account is at its limit); retry in ${seconds}s. ${spared}`,
      { "retry-after": String(seconds) },
    ),
    alert: "upstream.throttled",
    upstreamCode: code,
    upstreamMessage: message,
  };
}

/** `error.code` and `error.message` of a GLM (or Anthropic-format) error body. */
function errorFields(body: Uint8Array | null): { code: string | null; message: string | null } {
  if (!body?.byteLength) return { code: null, message: null };
  let json: unknown;
  try {
    json = JSON.parse(new TextDecoder().decode(body));
  } catch {
    return { code: null, message: null };
  }
  const error = (json as { error?: unknown })?.error;
  if (!error || typeof error !== "object") return { code: null, message: null };
  const e = error as { code?: unknown; message?: unknown };
  const code = typeof e.code === "string" || typeof e.code === "number" ? String(e.code) : null;
  const message = typeof e.message === "string" ? e.message.slice(0, 500) : null;
  return { code, message };
}

/** A Retry-After in whole seconds (1–300), from delta-seconds or an HTTP date. */
function retryAfterSeconds(value: string | null, now: number): number | null {
  if (!value) return null;
  const n = /^\d+$/.test(value.trim())
    ? Number(value.trim())
    : Math.ceil((Date.parse(value) - now) / 1000);
  if (!Number.isFinite(n)) return null;
  return Math.min(300, Math.max(1, n));
}

/** Tells the operator about an upstream problem (lib/alerts: de-duplicated per type and hour). */
export type UpstreamNotifier = (
  alert: UpstreamAlert | "upstream.unavailable",
  fields: {
    model: string;
    status: number;
    upstreamCode: string | null;
    message: string;
    /** The refused pool key's last 4 characters (key_rejected, balance_exhausted). */
    keyHint?: string;
    /** Every pool key's (upstream.unavailable). */
    keyHints?: string[];
  },
) => void;

/** Throttled answers within THROTTLE_WINDOW_MS that make throttling "sustained" (an alert). */
const THROTTLE_SUSTAINED = 5;
const THROTTLE_WINDOW_MS = 60_000;

/**
 * Logs an upstream refusal for the operator (GLM's own message included) and alerts: the
 * account's problems at once, throttling when it is sustained (THROTTLE_SUSTAINED answers
 * within a minute in this process).
 */
export class RefusalAlerts {
  /** When this process's recent throttled answers came. */
  private throttled: number[] = [];
  /** The clock minute of this process's last alert try of each type (and pool key). */
  private readonly alerted = new Map<string, number>();

  constructor(
    private readonly log: Logger,
    private readonly notify: UpstreamNotifier | undefined,
    private readonly clock: Clock = systemClock,
  ) {}

  refused(
    refusal: UpstreamRefusal,
    model: string,
    status: number,
    requestId: string,
    key?: { hint: string },
  ) {
    const fields = {
      model,
      status,
      upstreamCode: refusal.upstreamCode,
      message: refusal.upstreamMessage ?? `HTTP ${status}`,
      ...(key && refusal.alert !== "upstream.throttled" ? { keyHint: key.hint } : {}),
    };
    this.log.warn("upstream refused the operator's account", {
      id: requestId,
      ...fields,
      answered: refusal.error.code,
    });
    if (!this.notify) return;
    const now = this.clock();
    if (refusal.alert === "upstream.throttled") {
      this.throttled = this.throttled.filter((t) => t > now - THROTTLE_WINDOW_MS);
      this.throttled.push(now);
      if (this.throttled.length < THROTTLE_SUSTAINED) return;
      this.throttled = [];
    }
    // Alerts go out once per type and hour anyway (lib/alerts): during an outage every refused
    // request would otherwise try a KV commit to learn that. One try a minute per process still
    // gets an alert out if an earlier try failed.
    this.send(refusal.alert, fields, now);
  }

  /** No pool key is in service: every request gets 503 until one is. */
  unavailable(model: string, keyHints: string[]) {
    this.log.error("no GLM key is in service; requests get 503", { model, keyHints });
    this.send("upstream.unavailable", {
      model,
      status: 503,
      upstreamCode: null,
      message: "no pool key in service",
      keyHints,
    }, this.clock());
  }

  private send(
    alert: UpstreamAlert | "upstream.unavailable",
    fields: Parameters<UpstreamNotifier>[1],
    now: number,
  ) {
    if (!this.notify) return;
    const minute = Math.floor(now / 60_000);
    const id = `${alert} ${fields.keyHint ?? ""}`;
    if (this.alerted.get(id) === minute) return;
    this.alerted.set(id, minute);
    try {
      this.notify(alert, fields);
    } catch (err) {
      this.log.error("upstream alert failed", { error: String(err) });
    }
  }
}
