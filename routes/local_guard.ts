/**
 * Local mode (CONTRACT §3) lets whoever reaches the server sign in as anyone, so it answers only
 * requests addressed to this machine by a loopback name. Listening on 127.0.0.1 is not enough:
 * a web page can point its own host name at 127.0.0.1 (DNS rebinding), and a reverse proxy in
 * front forwards other hosts' requests; both arrive with a Host that is not a loopback name.
 */
import type { MiddlewareHandler } from "hono";
import { errorBody, isAnthropicPath, isApiPath } from "../lib/core/errors.ts";
import type { AppEnv } from "./context.ts";
import { isLoopbackHost } from "./loopback.ts";

/** 403 `forbidden` for any request whose Host is not localhost, 127.0.0.1 or [::1]. */
export function localHostGuard(
  /** The app's request ids: the refusal carries one like every other answer. */
  nextId: (incoming: string | undefined) => string,
): MiddlewareHandler<AppEnv> {
  const message =
    "This Keyway server runs in local mode: it answers only at localhost, 127.0.0.1 or [::1].";
  return async (c, next) => {
    // In-process requests (app.request in tests) carry no Host header: their URL's host stands in.
    const host = c.req.header("host") ?? new URL(c.req.url).host;
    if (isLoopbackHost(host)) return await next();
    c.header("x-content-type-options", "nosniff");
    c.header("x-request-id", nextId(undefined));
    const path = c.req.path;
    if (isApiPath(path)) {
      const anthropic = isAnthropicPath(path) ? 403 : undefined;
      return c.json(errorBody("forbidden", message, anthropic), 403);
    }
    return c.text(message, 403);
  };
}
