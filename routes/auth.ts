/** Local-mode sign-in (CONTRACT §3): an e-mail form issuing a locally signed session cookie. */
import { Hono } from "hono";
import { deleteCookie, getCookie, setCookie } from "hono/cookie";
import { z } from "zod";
import { AppError, parseJsonBody } from "../lib/core/errors.ts";
import type { Services } from "../lib/core/services.ts";
import { type AppEnv, assertSameOrigin, parseWith, SESSION_COOKIE } from "./context.ts";

/**
 * Where to go after signing in: a path on this site. Printable ASCII only, so no byte a browser
 * strips (tab, CR, LF: "/\t/evil.com" is followed as "//evil.com") and none that breaks the
 * Location header; no backslash (read as "/") and no leading "//" (another host).
 */
const SAME_ORIGIN_PATH = /^\/(?![/\\])[\x21-\x5b\x5d-\x7e]*$/;

/** The path to return to after signing in, when it is a safe same-origin one. */
export function safeRedirectPath(value: string | undefined): string | undefined {
  return value !== undefined && value.length <= 2048 && SAME_ORIGIN_PATH.test(value)
    ? value
    : undefined;
}

const signInSchema = z.object({
  email: z.string().trim().toLowerCase().pipe(z.email({ message: "enter a valid e-mail address" })),
  // Anything else falls back to the dashboard rather than failing a sign-in that worked.
  redirect: z.string().max(2048).regex(SAME_ORIGIN_PATH).optional().catch(undefined),
});

export function authRoutes(services: Services) {
  const { config, sessions } = services;
  const app = new Hono<AppEnv>();

  app.post("/auth/local/sign-in", async (c) => {
    if (!config.localMode) {
      throw new AppError("not_found", "Local sign-in is off: Clerk is configured.");
    }
    assertSameOrigin(c, services);
    const type = c.req.header("content-type") ?? "";
    const raw = type.includes("application/json")
      ? parseJsonBody(await c.req.text())
      : Object.fromEntries(Object.entries(await c.req.parseBody()).map(([k, v]) => [k, String(v)]));
    const { email, redirect } = parseWith(signInSchema, raw, "body");
    const { token, maxAge } = await sessions.issueLocal(email);
    setCookie(c, SESSION_COOKIE, token, {
      httpOnly: true,
      sameSite: "Lax",
      path: "/",
      maxAge,
      secure: new URL(config.publicUrl).protocol === "https:",
    });
    if (type.includes("application/json")) return c.json({ ok: true });
    return c.redirect(redirect ?? "/dashboard", 303);
  });

  app.post("/auth/sign-out", async (c) => {
    assertSameOrigin(c, services);
    // A copy of the cookie (another browser, a log, malware) must stop working too.
    const token = getCookie(c, SESSION_COOKIE);
    if (token) await sessions.revoke(token);
    deleteCookie(c, SESSION_COOKIE, { path: "/" });
    return c.redirect("/", 303);
  });
  return app;
}
