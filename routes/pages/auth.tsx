/** Sign-in and sign-up (CONTRACT §6): Clerk's components, or the local e-mail form. */
import { type Context, Hono } from "hono";
import { Layout } from "../../components/Layout.tsx";
import { clerkScript, pageShell, render } from "./render.tsx";
import type { Services } from "../../lib/core/services.ts";
import type { AppEnv } from "../context.ts";

export function authPageRoutes(services: Services) {
  const { config } = services;
  const app = new Hono<AppEnv>();
  const shell = pageShell(services);
  const clerk = clerkScript(config);

  const authPage = (mode: "sign-in" | "sign-up") => async (c: Context<AppEnv>) => {
    const { session, layout } = await shell(c, `/${mode}`);
    if (session) return c.redirect("/dashboard", 303);
    const title = mode === "sign-in" ? "Sign in" : "Sign up";
    const error = c.req.query("error");
    return render(
      c,
      <Layout title={title} {...layout} clerk={clerk}>
        {config.localMode
          ? (
            <div class="auth">
              <div class="card">
                <h1>{mode === "sign-in" ? "Sign in to Keyway" : "Create your Keyway account"}</h1>
                <p class="notice notice-warn" role="note">
                  <strong>Local mode:</strong>{" "}
                  enter any e-mail address. No password, no e-mail is sent — this server has no
                  Clerk configuration.
                </p>
                {error && <p class="notice notice-error" role="alert">{error}</p>}
                <form method="post" action="/auth/local/sign-in" style={{ marginTop: "1rem" }}>
                  <div class="field">
                    <label for="email">E-mail address</label>
                    <input
                      id="email"
                      name="email"
                      type="email"
                      autocomplete="email"
                      required
                      placeholder="you@example.com"
                    />
                  </div>
                  <input type="hidden" name="redirect" value="/dashboard" />
                  <button class="btn btn-primary btn-lg" type="submit" style={{ width: "100%" }}>
                    {mode === "sign-in" ? "Sign in" : "Sign up"}
                  </button>
                </form>
                <p class="muted small" style={{ marginTop: "1rem", marginBottom: 0 }}>
                  {mode === "sign-in"
                    ? (
                      <>
                        New here? <a href="/sign-up">Create an account</a>
                      </>
                    )
                    : (
                      <>
                        Already have an account? <a href="/sign-in">Sign in</a>
                      </>
                    )}
                </p>
              </div>
            </div>
          )
          : (
            <div
              id="clerk-auth"
              class="auth-clerk"
              data-mode={mode}
              data-sign-in-url="/sign-in"
              data-sign-up-url="/sign-up"
              data-redirect="/dashboard"
              aria-live="polite"
            >
              {clerk
                ? <p class="muted">Loading {title.toLowerCase()}…</p>
                : (
                  <p class="notice notice-error" role="alert">
                    Sign-in is not configured: set CLERK_PUBLISHABLE_KEY.
                  </p>
                )}
            </div>
          )}
      </Layout>,
    );
  };
  app.get("/sign-in", authPage("sign-in"));
  app.get("/sign-up", authPage("sign-up"));

  return app;
}
