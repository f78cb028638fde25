/** Sign-in and sign-up (CONTRACT §6): Clerk's components, or the local e-mail form. */
import { type Context, Hono } from "hono";
import { Layout } from "../../components/Layout.tsx";
import { clerkScript, pageShell, render } from "./render.tsx";
import type { Services } from "../../lib/core/services.ts";
import type { AppEnv } from "../context.ts";
import { safeRedirectPath } from "../redirect.ts";

export type AuthMode = "sign-in" | "sign-up";

/** What a failed local sign-in shows again: the message (inline, by the field) and the input. */
export interface SignInFailure {
  error: string;
  email: string;
  /** Where a successful sign-in goes (kept through the failed attempt). */
  redirect?: string;
}

/** Renders /sign-in or /sign-up; with a failure, the form again with the error (status 400). */
export function authPageRenderer(services: Services) {
  const { config } = services;
  const shell = pageShell(services);
  const clerk = clerkScript(config);
  return async (c: Context<AppEnv>, mode: AuthMode, failure?: SignInFailure) => {
    const { session, layout } = await shell(c, `/${mode}`);
    // Back where sign-in was asked for (the connect pages), else the dashboard.
    const next = failure?.redirect ?? safeRedirectPath(c.req.query("redirect")) ?? "/dashboard";
    if (session) return c.redirect(next, 303);
    const title = mode === "sign-in" ? "Sign in" : "Sign up";
    const error = failure?.error;
    // Sign-in and sign-up from a connect page keep the way back, and say what is being connected.
    const query = next === "/dashboard" ? "" : `?redirect=${encodeURIComponent(next)}`;
    const connecting = connectingFrom(next);
    return render(
      c,
      <Layout title={title} {...layout} clerk={clerk} authQuery={query}>
        {connecting && (
          <div class="auth auth-connecting">
            <p class="notice" role="note" data-testid="auth-connecting">
              {mode === "sign-in" ? "Sign in" : "Create an account"} to connect{" "}
              <strong>{connecting}</strong>{" "}
              to Keyway. You come straight back to approve it; nothing is connected until you do.
            </p>
          </div>
        )}
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
                <form method="post" action="/auth/local/sign-in" style={{ marginTop: "1rem" }}>
                  <div class="field">
                    <label for="email">E-mail address</label>
                    <input
                      id="email"
                      name="email"
                      type="email"
                      autocomplete="email"
                      required
                      maxLength={254}
                      // The server wants a domain with a dot (me@localhost is refused there).
                      pattern="[^@\s]+@[^@\s]+\.[^@\s]+"
                      title="An e-mail address such as you@example.com"
                      placeholder="you@example.com"
                      value={failure?.email}
                      aria-invalid={error ? "true" : undefined}
                      aria-describedby={error ? "email-error" : "email-hint"}
                    />
                    {error
                      ? (
                        <p class="field-error" id="email-error" role="alert">
                          {error}
                        </p>
                      )
                      : <p class="hint" id="email-hint">For example you@example.com.</p>}
                  </div>
                  <input type="hidden" name="redirect" value={next} />
                  <input type="hidden" name="from" value={mode} />
                  <button class="btn btn-primary btn-lg" type="submit" style={{ width: "100%" }}>
                    {mode === "sign-in" ? "Sign in" : "Sign up"}
                  </button>
                </form>
                <p class="muted small" style={{ marginTop: "1rem", marginBottom: 0 }}>
                  {mode === "sign-in"
                    ? (
                      <>
                        New here? <a href={`/sign-up${query}`}>Create an account</a>
                      </>
                    )
                    : (
                      <>
                        Already have an account? <a href={`/sign-in${query}`}>Sign in</a>
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
              data-sign-in-url={`/sign-in${query}`}
              data-sign-up-url={`/sign-up${query}`}
              data-redirect={next}
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
      failure ? 400 : 200,
    );
  };
}

/** What a connect page being returned to connects: "VS Code", "a device (BCDF-GHJK)", or null. */
function connectingFrom(next: string): string | null {
  const url = URL.parse(next, "http://x");
  if (!url) return null;
  if (url.pathname === "/connect") {
    const client = url.searchParams.get("client")?.trim();
    return client ? client.slice(0, 64) : "an app";
  }
  if (url.pathname === "/connect/device") {
    const code = url.searchParams.get("code")?.trim().slice(0, 12);
    return code ? `a device (code ${code})` : "a device";
  }
  return null;
}

export function authPageRoutes(services: Services) {
  const app = new Hono<AppEnv>();
  const page = authPageRenderer(services);
  app.get("/sign-in", (c) => page(c, "sign-in"));
  app.get("/sign-up", (c) => page(c, "sign-up"));

  return app;
}
