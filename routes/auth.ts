/** Local-mode sign-in (CONTRACT §3): an e-mail form issuing a locally signed session cookie. */
import { Hono } from "hono";
import { deleteCookie, getCookie, setCookie } from "hono/cookie";
import { z } from "zod";
import { AppError, parseJsonBody } from "../lib/core/errors.ts";
import type { Services } from "../lib/core/services.ts";
import { type AppEnv, assertSameOrigin, parseWith, SESSION_COOKIE } from "./context.ts";
import { authPageRenderer } from "./pages/auth.tsx";
import { safeRedirectPath, SAME_ORIGIN_PATH } from "./redirect.ts";

const signInSchema = z.object({
  email: z.string({ message: "enter your e-mail address" }).trim().toLowerCase().max(254, {
    message: "an e-mail address has at most 254 characters",
  }).pipe(z.email({ message: "enter a valid e-mail address, such as you@example.com" })),
  // Anything else falls back to the dashboard rather than failing a sign-in that worked.
  redirect: z.string().max(2048).regex(SAME_ORIGIN_PATH).optional().catch(undefined),
});

/** A JSON body that is not an object fails the schema like a missing field would. */
const asRecord = (value: unknown): Record<string, unknown> =>
  typeof value === "object" && value !== null && !Array.isArray(value)
    ? value as Record<string, unknown>
    : {};

export function authRoutes(services: Services) {
  const { config, sessions } = services;
  const app = new Hono<AppEnv>();
  const authPage = authPageRenderer(services);

  app.post("/auth/local/sign-in", async (c) => {
    if (!config.localMode) {
      throw new AppError("not_found", "Local sign-in is off: Clerk is configured.");
    }
    assertSameOrigin(c, services);
    const type = c.req.header("content-type") ?? "";
    const json = type.includes("application/json");
    const raw: Record<string, unknown> = json
      ? asRecord(parseJsonBody(await c.req.text()))
      : Object.fromEntries(Object.entries(await c.req.parseBody()).map(([k, v]) => [k, String(v)]));
    if (!json) {
      // A person at the form: the error goes back into the form, never a JSON page.
      const parsed = signInSchema.safeParse(raw);
      if (!parsed.success) {
        const mode = raw.from === "sign-up" ? "sign-up" : "sign-in";
        const issue = parsed.error.issues[0];
        const message = issue?.message ?? "enter a valid e-mail address";
        return await authPage(c, mode, {
          error: `Check the e-mail address: ${message}.`,
          email: String(raw.email ?? "").slice(0, 254),
          redirect: safeRedirectPath(typeof raw.redirect === "string" ? raw.redirect : undefined),
        });
      }
    }
    const { email, redirect } = parseWith(signInSchema, raw, "body");
    const { token, maxAge } = await sessions.issueLocal(email);
    setCookie(c, SESSION_COOKIE, token, {
      httpOnly: true,
      sameSite: "Lax",
      path: "/",
      maxAge,
      secure: new URL(config.publicUrl).protocol === "https:",
    });
    if (json) return c.json({ ok: true });
    return c.redirect(redirect ?? "/dashboard", 303);
  });

  app.post("/auth/sign-out", async (c) => {
    assertSameOrigin(c, services);
    // A copy of the cookie (another browser, a log, malware) must stop working too.
    const token = getCookie(c, SESSION_COOKIE);
    if (token) await sessions.revoke(token);
    deleteCookie(c, SESSION_COOKIE, { path: "/" });
    // "Switch account" on a connect page: sign in again, then back to the approval.
    const form = await c.req.parseBody().catch(() => ({} as Record<string, unknown>));
    const back = typeof form.redirect === "string" ? safeRedirectPath(form.redirect) : undefined;
    if (back) return c.redirect(`/sign-in?redirect=${encodeURIComponent(back)}`, 303);
    return c.redirect("/", 303);
  });
  return app;
}
