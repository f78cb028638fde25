/** Local-mode sign-in (CONTRACT §3): an e-mail form issuing a locally signed session cookie. */
import { Hono } from "hono";
import { deleteCookie, setCookie } from "hono/cookie";
import { z } from "zod";
import { AppError, parseJsonBody } from "../lib/core/errors.ts";
import type { Services } from "../lib/core/services.ts";
import { type AppEnv, assertSameOrigin, parseWith, SESSION_COOKIE } from "./context.ts";

const signInSchema = z.object({
  email: z.string().trim().toLowerCase().pipe(z.email({ message: "enter a valid e-mail address" })),
  redirect: z.string().regex(/^\/[^/\\]/).optional().catch(undefined),
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

  app.post("/auth/sign-out", (c) => {
    assertSameOrigin(c, services);
    deleteCookie(c, SESSION_COOKIE, { path: "/" });
    return c.redirect("/", 303);
  });
  return app;
}
