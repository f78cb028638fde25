/** Typed errors with the contract's codes (CONTRACT §4), mapped to JSON in one place. */

export type ErrorCode =
  | "invalid_request"
  | "invalid_signature"
  | "model_not_allowed"
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
  | "not_configured"
  | "internal_error";

const STATUS: Record<ErrorCode, number> = {
  invalid_request: 400,
  invalid_signature: 400,
  model_not_allowed: 400,
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
  ) {
    super(message);
    this.name = "AppError";
    this.status = STATUS[code];
  }
}

export function errorBody(code: ErrorCode, message: string) {
  return { error: { code, message } };
}

/** Turns a zod error into an invalid_request naming the first bad field. */
export function invalidRequest(
  issues: ReadonlyArray<{ path: PropertyKey[]; message: string }>,
  what = "body",
): AppError {
  const first = issues[0];
  const field = first?.path.map(String).join(".") || what;
  return new AppError("invalid_request", `${field}: ${first?.message ?? "invalid"}`);
}

/** JSON.parse for request bodies: 400 invalid_request instead of a SyntaxError. */
export function parseJsonBody(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch {
    throw new AppError("invalid_request", "body: not valid JSON");
  }
}
