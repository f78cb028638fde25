/**
 * The JSON shapes of CONTRACT §5, written once. Routes build them (`satisfies`), islands read them
 * (`import type`), so a field renamed on one side fails the type check on the other. The editor
 * module (clients/vscode/keyway.ts) is a drop-in file that cannot import this one: a type test in
 * tests/e2e/browser/vscode_client_test.ts keeps its copy of these shapes in step.
 */
import type { UsageTotals } from "./usage/totals.ts";
import type { RequestLogEntry } from "./observe/log_store.ts";
import type { KeyListing, KeyUsageRow } from "./usage/key_usage.ts";

/** The limits in force for a user (null: unlimited). */
export interface LimitsBody {
  rpm: number;
  rpd: number;
  tokensPerDay: number | null;
  budgetUsdMonthly: number | null;
}

/** An operator's overrides of the defaults: only the fields that are set. */
export type LimitOverridesBody = Partial<
  { rpm: number; rpd: number; tokensPerDay: number; budgetUsdMonthly: number }
>;

/** `/api/key*`, `/api/auth/provision-user` and the connect flows' token answers. */
export interface KeyBody {
  apiKey: string;
  baseUrl: string;
  anthropicBaseUrl: string;
  mode: "proxy" | "shared";
  keyPrefix: string;
  /** Which of the user's keys this is: "default", or a connected app's `k_…` id. */
  keyId: string;
  userId: string;
  createdAt: string;
  limits: LimitsBody;
}

/** Usage over some span (lib/usage/totals.ts, the one totals shape). */
export type UsageTotalsBody = UsageTotals;

export type PauseReasonBody = "requests_per_day" | "tokens_per_day" | "budget_monthly";

/** Whether the key works now, and when a paused account works again (`until`, ISO). */
export type AccountStateBody =
  | { status: "active" | "disabled" | "deleted" }
  | {
    status: "paused";
    reason: PauseReasonBody;
    reasons: PauseReasonBody[];
    until: string;
  };

/**
 * Whether the service can serve anyone (not the caller's own state): `not_configured` (no
 * GLM_API_KEY) or `no_key_in_service` (GLM refuses every pool key: rejected, or the balance spent).
 */
export type ServiceStateBody =
  | { status: "ok" }
  | {
    status: "unavailable";
    reason: "not_configured" | "no_key_in_service";
    /** Since when (ISO), when known. */
    since: string | null;
  };

/** GET /api/usage. */
export interface UsageBody {
  userId: string;
  limits: LimitsBody;
  remaining: {
    minute: number;
    day: number;
    tokensToday: number | null;
    budgetUsd: number | null;
  };
  today: UsageTotalsBody;
  days: (UsageTotalsBody & { date: string })[];
  byModel: (UsageTotalsBody & { model: string })[];
  /** Usage per key: the default key, each connected app's, and revoked keys used in the span. */
  byKey: KeyUsageRowBody[];
  /** Spend this UTC month (metered; reservations of requests in flight not included). */
  thisMonth: { costUsd: number };
  state: AccountStateBody;
  /** Whether the service can serve at all (GET /api/usage and the dashboard). */
  service?: ServiceStateBody;
}

/** One key's usage in GET /api/usage. */
export type KeyUsageRowBody = KeyUsageRow;

/** One key in GET /api/keys (never its secret). */
export type KeyListingBody = KeyListing;

/** GET /api/keys. */
export interface KeysBody {
  keys: KeyListingBody[];
}

/** POST /api/connect/device. */
export interface DeviceStartBody {
  deviceCode: string;
  userCode: string;
  verificationUri: string;
  verificationUriComplete: string;
  expiresIn: number;
  interval: number;
}

/** One user as the operator sees it (GET /api/admin/users, and the user after an action). */
export interface AdminUserBody {
  userId: string;
  email: string | null;
  /** `paused`: active, but a spent limit refuses every request until it resets. */
  status: "active" | "paused" | "disabled" | "deleted";
  /** What a paused user has used up (the limit that keeps them paused longest); else null. */
  pausedBy: "requests" | "tokens" | "budget" | null;
  /** When a paused user's requests work again (ISO); else null. */
  pausedUntil: string | null;
  createdAt: string;
  /** The latest UTC day (YYYY-MM-DD) with usage in the last 30 days. */
  lastActiveAt: string | null;
  keyPrefix: string | null;
  /** Keys the user holds. */
  keys: number;
  /** The overrides; the defaults apply to the fields not set. */
  limits: LimitOverridesBody;
  /** The limits in force. */
  effectiveLimits: LimitsBody;
  usage30d: { requests: number; totalTokens: number; costUsd: number };
}

/** GET /api/admin/users: one page, ordered by 30-day cost (highest first). */
export interface AdminUsersBody {
  users: AdminUserBody[];
  /** The cursor of the next page, or null on the last. */
  next: string | null;
  /** Users matching the query and status, over all pages. */
  total: number;
}

/** POST /api/admin/users/:id/{disable,enable}, PUT /api/admin/users/:id/limits. */
export interface AdminUserChangedBody {
  user: AdminUserBody;
}

/** Every error (CONTRACT §4); the Anthropic endpoints add `type: "error"` and an error type. */
export interface ErrorBody {
  error: { code: string; message: string; type?: string };
}

/** One entry of the request log (lib/observe/request_log.ts). */
export type RequestEntryBody = RequestLogEntry;

/** GET /api/requests, GET /api/admin/requests. */
export interface RequestsBody {
  requests: RequestEntryBody[];
  next: string | null;
}
