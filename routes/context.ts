/** Shared route plumbing: the Hono env type, session middleware, body parsing with zod. */
import type { Context, MiddlewareHandler } from "hono";
import { getCookie } from "hono/cookie";
import type { z } from "zod";
import { type Session, sessionTokenFrom } from "../lib/identity/sessions.ts";
import { AppError, invalidRequest, parseJsonBody } from "../lib/core/errors.ts";
import type { Services } from "../lib/core/services.ts";
import type { Config } from "../lib/core/config.ts";
import { isLoopbackHostname } from "./loopback.ts";

export type AppEnv = {
  Variables: {
    requestId: string;
    session: Session;
    /** How the session arrived; cookie-authenticated writes get a same-origin check. */
    sessionVia: "bearer" | "cookie";
    /** Set by handlers whose Response already carries x-request-id and nosniff (routes/mod.ts). */
    framed: boolean;
    /**
     * A CSP source a page's form may also navigate to (the connect page's redirect target):
     * added to form-action by routes/mod.ts, since browsers check redirects after a POST too.
     */
    formAction: string;
  };
};

export const SESSION_COOKIE = "__session";

/** The verified session, or null (never throws for a bad token). */
export async function readSession(
  c: Context<AppEnv>,
  services: Services,
): Promise<{ session: Session; via: "bearer" | "cookie" } | null> {
  const authorization = c.req.header("authorization");
  // The cookie header is only parsed when there is no Authorization header (it would be ignored).
  const token = sessionTokenFrom(
    authorization,
    authorization ? undefined : getCookie(c, SESSION_COOKIE),
  );
  if (!token) return null;
  const session = await services.sessions.verify(token);
  return session ? { session, via: authorization ? "bearer" : "cookie" } : null;
}

/** Requires a valid session (401 unauthorized) and, for cookie writes, a same-origin request. */
export function requireSession(services: Services): MiddlewareHandler<AppEnv> {
  return async (c, next) => {
    const found = await readSession(c, services);
    if (!found) {
      throw new AppError(
        "unauthorized",
        services.config.localMode
          ? "Sign in first: a valid session is required (sign in at /sign-in)."
          : "Sign in first: a valid Clerk session token is required.",
      );
    }
    if (found.via === "cookie") assertSameOrigin(c, services);
    c.set("session", found.session);
    c.set("sessionVia", found.via);
    await next();
  };
}

/**
 * Rejects cross-site writes that ride on a cookie (CSRF, CONTRACT §3). Allowed origins come from
 * configuration only, never from the Host header: under DNS rebinding or behind a proxy the Host
 * is whatever the attacker's page used, so an origin derived from it would always match.
 */
export function assertSameOrigin(c: Context<AppEnv>, services: Services) {
  if (c.req.method === "GET" || c.req.method === "HEAD") return;
  const origin = c.req.header("origin");
  if (origin === undefined) {
    // Browsers label every request with Sec-Fetch-Site; a client that sends neither header
    // (curl, an SDK) is not a browser carrying a victim's cookie.
    const site = c.req.header("sec-fetch-site");
    if (site === undefined || site === "same-origin" || site === "none") return;
    throw new AppError("forbidden", "Cross-site request refused: no Origin, and not same-origin.");
  }
  if (!isAllowedOrigin(origin, c.req.url, services.config)) {
    throw new AppError("forbidden", `Cross-origin request from ${origin.slice(0, 200)} refused.`);
  }
}

/** PUBLIC_URL's origin and the authorized parties, per config (built once, not per request). */
const configuredOrigins = new WeakMap<Config, Set<string>>();

function isAllowedOrigin(origin: string, requestUrl: string, config: Config): boolean {
  let fixed = configuredOrigins.get(config);
  if (!fixed) {
    fixed = new Set([new URL(config.publicUrl).origin, ...config.clerk.authorizedParties]);
    configuredOrigins.set(config, fixed);
  }
  if (fixed.has(origin)) return true;
  if (!config.localMode) return false;
  // Local mode is also reached as localhost, 127.0.0.1 or [::1] on the port the request came in
  // on; only the port is taken from the request, and the host guard vouched for its name.
  const url = URL.parse(origin);
  return url !== null && url.protocol === "http:" && url.origin === origin &&
    isLoopbackHostname(url.hostname) && url.port === (URL.parse(requestUrl)?.port ?? "");
}

/** Parses a JSON body with a schema: 400 invalid_request naming the field when it does not fit. */
export async function jsonBody<S extends z.ZodType>(c: Context, schema: S): Promise<z.infer<S>> {
  const text = await c.req.text();
  const parsed = schema.safeParse(text.trim() === "" ? {} : parseJsonBody(text));
  if (!parsed.success) throw invalidRequest(parsed.error.issues);
  return parsed.data;
}

/** Validates route params or query strings the same way. */
export function parseWith<S extends z.ZodType>(
  schema: S,
  value: unknown,
  what: string,
): z.infer<S> {
  const parsed = schema.safeParse(value);
  if (!parsed.success) throw invalidRequest(parsed.error.issues, what);
  return parsed.data;
}
