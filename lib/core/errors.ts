/** Typed errors with the contract's codes (CONTRACT §4), mapped to JSON in one place. */

import { formatCount } from "./format.ts";

export type ErrorCode =
  | "invalid_request"
  | "invalid_signature"
  | "model_not_allowed"
  | "invalid_grant"
  | "authorization_pending"
  | "slow_down"
  | "expired_token"
  | "access_denied"
  | "unauthorized"
  | "invalid_api_key"
  | "user_disabled"
  | "user_deleted"
  | "forbidden"
  | "not_found"
  | "payload_too_large"
  | "rate_limit_exceeded"
  | "quota_exceeded"
  | "concurrency_limit_exceeded"
  | "upstream_unavailable"
  | "upstream_timeout"
  | "upstream_busy"
  | "not_configured"
  | "internal_error";

const STATUS: Record<ErrorCode, number> = {
  invalid_request: 400,
  invalid_signature: 400,
  model_not_allowed: 400,
  // Connect flows (CONTRACT §5): OAuth's token-endpoint errors (RFC 6749 §5.2, RFC 8628 §3.5).
  invalid_grant: 400,
  authorization_pending: 400,
  slow_down: 400,
  expired_token: 400,
  access_denied: 400,
  unauthorized: 401,
  invalid_api_key: 401,
  user_disabled: 403,
  user_deleted: 403,
  forbidden: 403,
  not_found: 404,
  payload_too_large: 413,
  rate_limit_exceeded: 429,
  quota_exceeded: 429,
  concurrency_limit_exceeded: 429,
  upstream_unavailable: 502,
  upstream_timeout: 504,
  upstream_busy: 503,
  not_configured: 503,
  internal_error: 500,
};

export class AppError extends Error {
  readonly status: number;
  constructor(
    readonly code: ErrorCode,
    message: string,
    /** Extra response headers, e.g. Retry-After. */
    readonly headers: Record<string, string> = {},
    /** When the code's usual status is not the one (upstream_unavailable: 502, or 503). */
    status?: number,
  ) {
    super(message);
    this.name = "AppError";
    this.status = status ?? STATUS[code];
  }
}

/** Anthropic's error `type` for an HTTP status (what Anthropic clients read). */
export function anthropicErrorType(status: number): string {
  switch (status) {
    case 400:
      return "invalid_request_error";
    case 401:
      return "authentication_error";
    case 403:
      return "permission_error";
    case 404:
      return "not_found_error";
    case 413:
      return "request_too_large";
    case 429:
      return "rate_limit_error";
    case 503:
    case 529:
      return "overloaded_error";
    default:
      return "api_error";
  }
}

/**
 * The contract's error body; on Anthropic routes (`/v1/messages*`) with Anthropic's `type`
 * fields too, so Anthropic clients read Keyway's own errors natively.
 */
export function errorBody(code: ErrorCode, message: string, anthropicStatus?: number) {
  if (anthropicStatus === undefined) return { error: { code, message } };
  return {
    type: "error",
    error: { type: anthropicErrorType(anthropicStatus), code, message },
  };
}

/** Whether a path's errors take the contract's JSON shape (every `/api/*` and `/v1/*` path). */
export const isApiPath = (path: string) => path.startsWith("/api/") || path.startsWith("/v1/");

/** Whether a path is an Anthropic route, whose errors take Anthropic's shape too. */
export const isAnthropicPath = (path: string) =>
  path === "/v1/messages" || path.startsWith("/v1/messages/");

/** Turns a zod error into an invalid_request naming the first bad field. */
export function invalidRequest(
  issues: ReadonlyArray<SchemaIssue>,
  what = "body",
): AppError {
  const first = issues[0];
  const field = first?.path.map(String).join(".") || what;
  return new AppError("invalid_request", `${field}: ${first ? sayIssue(first) : "invalid"}`);
}

/** A schema problem as zod reports it (the fields read here, when present). */
export interface SchemaIssue {
  path: PropertyKey[];
  message: string;
  code?: string;
  expected?: string;
  origin?: string;
  minimum?: number | bigint;
  maximum?: number | bigint;
  values?: readonly unknown[];
}

const KIND: Record<string, string> = {
  string: "a string",
  number: "a number",
  int: "a whole number",
  boolean: "true or false",
  array: "an array",
  object: "an object",
};

/** A zod issue in words a person reads ("is required", "must be a string"), not zod's. */
export function sayIssue(issue: SchemaIssue): string {
  const { code, expected, origin } = issue;
  if (code === "invalid_type") {
    if (/received undefined$/.test(issue.message)) return "is required";
    return `must be ${KIND[expected ?? ""] ?? expected}`;
  }
  if (code === "too_small" || code === "too_big") {
    const bound = code === "too_small" ? issue.minimum : issue.maximum;
    const side = code === "too_small" ? "at least" : "at most";
    if (origin === "string") {
      return `must be ${side} ${formatCount(Number(bound), "character")} long`;
    }
    if (origin === "array") return `must have ${side} ${formatCount(Number(bound), "item")}`;
    if (origin === "number" || origin === "int") return `must be ${side} ${bound}`;
  }
  if (code === "invalid_value" && issue.values?.length) {
    return `must be one of ${issue.values.map((v) => JSON.stringify(v)).join(", ")}`;
  }
  return issue.message;
}

/** JSON.parse for request bodies: 400 invalid_request instead of a SyntaxError. */
export function parseJsonBody(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch {
    throw new AppError("invalid_request", "body: not valid JSON");
  }
}
