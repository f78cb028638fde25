/** Pages (CONTRACT §6): landing, sign-in/up, dashboard, admin. Server-rendered Preact. */
import { type Context, Hono } from "hono";
import type { VNode } from "preact";
import { renderToString } from "preact-render-to-string";
import { operatorOverview } from "../lib/reports/overview.ts";
import type { Config } from "../lib/core/config.ts";
import { island, IslandCollector } from "../build/islands.ts";
import type { Services } from "../lib/core/services.ts";
import { Layout, type LayoutProps } from "../components/Layout.tsx";
import { lastDays, UsageChart } from "../components/UsageChart.tsx";
import AdminUsersComponent from "../islands/AdminUsers.tsx";
import AutoProvisionComponent from "../islands/AutoProvision.tsx";
import { type AppEnv, readSession } from "./context.ts";
import { safeRedirectPath } from "./auth.ts";

const AutoProvision = island("AutoProvision", AutoProvisionComponent);
const AdminUsers = island("AdminUsers", AdminUsersComponent);

const icon = (d: string) => (
  <svg
    viewBox="0 0 24 24"
    fill="none"
    stroke="currentColor"
    stroke-width="2"
    stroke-linecap="round"
    stroke-linejoin="round"
  >
    <path d={d} />
  </svg>
);
const ICONS = {
  key: icon("M15 7a4 4 0 1 0-3.9 5H11l-1 1v2H8v2H6v2H3v-3l6.1-6.1A4 4 0 0 0 15 7zm2 0h.01"),
  editor: icon("M8 9l-3 3 3 3M16 9l3 3-3 3M13 6l-2 12"),
  check: icon("M20 6L9 17l-5-5"),
};

/** The Clerk Frontend API host encoded in a publishable key (`pk_test_` + base64 `host$`). */
export function clerkFrontendApi(publishableKey: string | undefined): string | null {
  const m = publishableKey?.match(/^pk_(?:test|live)_([A-Za-z0-9+/=_-]+)$/);
  if (!m) return null;
  try {
    const decoded = atob(m[1].replace(/-/g, "+").replace(/_/g, "/"));
    const host = decoded.replace(/\$$/, "");
    return /^[a-z0-9.-]+(:\d+)?$/i.test(host) && decoded.endsWith("$") ? host : null;
  } catch {
    return null;
  }
}

/** ClerkJS from the instance's Frontend API, as Clerk documents for apps without React. */
export function clerkScript(config: Config): { publishableKey: string; scriptUrl: string } | null {
  const host = clerkFrontendApi(config.clerk.publishableKey);
  if (config.localMode || !host) return null;
  return {
    publishableKey: config.clerk.publishableKey!,
    scriptUrl: `https://${host}/npm/@clerk/clerk-js@5/dist/clerk.browser.js`,
  };
}

/**
 * Content-Security-Policy for hono's secureHeaders: only our own scripts, plus (Clerk mode) what
 * Clerk documents for its components — the Frontend API host, its image CDN, Cloudflare's bot
 * check, its abuse-protection hosts (on any port) and dev-instance telemetry.
 * Inline styles are allowed: islands set widths through style attributes and Clerk injects CSS.
 */
export function contentSecurityPolicy(config: Config) {
  const host = config.localMode ? null : clerkFrontendApi(config.clerk.publishableKey);
  const clerk = host ? [`https://${host}`] : [];
  const turnstile = host ? ["https://challenges.cloudflare.com"] : [];
  const protect = host ? ["https://*.protect.clerk.com:*"] : [];
  const telemetry = host ? ["https://clerk-telemetry.com"] : [];
  return {
    defaultSrc: ["'self'"],
    baseUri: ["'self'"],
    objectSrc: ["'none'"],
    frameAncestors: ["'none'"],
    formAction: ["'self'"],
    scriptSrc: ["'self'", ...clerk, ...turnstile, ...protect],
    connectSrc: ["'self'", ...clerk, ...protect, ...telemetry],
    imgSrc: ["'self'", "data:", ...(host ? ["https://img.clerk.com"] : [])],
    styleSrc: ["'self'", "'unsafe-inline'"],
    frameSrc: ["'self'", ...turnstile, ...protect],
    workerSrc: ["'self'", "blob:"],
  };
}

function render(c: Context<AppEnv>, page: VNode, status: 200 | 403 | 404 = 200) {
  const html = renderToString(
    <IslandCollector.Provider value={new Set()}>{page}</IslandCollector.Provider>,
  );
  c.header("cache-control", "no-store");
  return c.html("<!doctype html>" + html, status);
}

export function pageRoutes(services: Services) {
  const { config, users } = services;
  const app = new Hono<AppEnv>();
  const clerk = clerkScript(config);
  const authMode = config.localMode ? "local" as const : "clerk" as const;

  /** Layout props for the current visitor. */
  const shell = async (c: Context<AppEnv>, path: string) => {
    const found = await readSession(c, services);
    let label: string | null = null;
    if (found) {
      label = found.session.email ??
        (await users.get(found.session.userId).catch(() => null))?.email ??
        found.session.userId;
    }
    const layout: Omit<LayoutProps, "children" | "title"> = {
      localMode: config.localMode,
      signedInAs: label,
      isAdmin: found ? config.adminUserIds.has(found.session.userId) : false,
      path,
    };
    return { session: found?.session ?? null, layout };
  };

  app.get("/favicon.ico", (c) => c.redirect("/static/favicon.svg", 301));

  app.get("/", async (c) => {
    const { session, layout } = await shell(c, "/");
    return render(
      c,
      <Layout title="Keyway" {...layout}>
        <section class="hero">
          <span class="eyebrow">GLM models, ready in your editor</span>
          <h1>Your own AI key, working in minutes</h1>
          <p class="lede">
            Sign up and get a personal API key for GLM models at once. Paste it into your editor and
            start coding — no provider account, no billing set-up, nothing to install.
          </p>
          <div class="actions">
            {session ? <a class="btn btn-primary btn-lg" href="/dashboard">Go to dashboard</a> : (
              <>
                <a class="btn btn-primary btn-lg" href="/sign-up">Create your key</a>
                <a class="btn btn-lg" href="/sign-in">Sign in</a>
              </>
            )}
          </div>
        </section>
        <div class="grid grid-3">
          <div class="card feature">
            <h3>
              <span class="icon" aria-hidden="true">{ICONS.key}</span>Your own key
            </h3>
            <p>
              A personal <code>kw_…</code>{" "}
              key that only you use. Rotate it any time; the old one stops working at once.
            </p>
          </div>
          <div class="card feature">
            <h3>
              <span class="icon" aria-hidden="true">{ICONS.editor}</span>Works in your editor
            </h3>
            <p>
              An OpenAI-compatible endpoint: VS Code extensions, CLIs and SDKs take the base URL and
              key as they are.
            </p>
          </div>
          <div class="card feature">
            <h3>
              <span class="icon" aria-hidden="true">{ICONS.check}</span>No set-up
            </h3>
            <p>
              No provider account, no card, no config files. Your limits and usage are on your
              dashboard.
            </p>
          </div>
        </div>
        <h2 class="section-title">How it works</h2>
        <div class="card">
          <ol class="steps">
            <li>
              <strong>Sign up</strong> with your e-mail or a social account.
            </li>
            <li>
              <strong>Copy your key</strong>{" "}
              from the dashboard — it is created for you on your first visit.
            </li>
            <li>
              <strong>Paste it into your editor</strong>{" "}
              with the base URL shown next to it, and start asking.
            </li>
          </ol>
        </div>
      </Layout>,
    );
  });

  const authPage = (mode: "sign-in" | "sign-up") => async (c: Context<AppEnv>) => {
    const { session, layout } = await shell(c, `/${mode}`);
    // Back where sign-in was asked for (the connect pages), else the dashboard.
    const next = safeRedirectPath(c.req.query("redirect")) ?? "/dashboard";
    if (session) return c.redirect(next, 303);
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
                  <input type="hidden" name="redirect" value={next} />
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
    );
  };
  app.get("/sign-in", authPage("sign-in"));
  app.get("/sign-up", authPage("sign-up"));

  app.get("/dashboard", async (c) => {
    const { session, layout } = await shell(c, "/dashboard");
    if (!session) return c.redirect("/sign-in", 303);
    const shared = config.keyMode === "shared";
    return render(
      c,
      <Layout title="Dashboard" {...layout} clerk={clerk}>
        <div class="page-head">
          <div>
            <h1>Dashboard</h1>
            <p class="muted">Your key, how to use it, and what you have used.</p>
          </div>
        </div>
        <AutoProvision
          mode={authMode}
          baseUrl={shared ? config.glm.baseUrl : `${config.publicUrl}/v1`}
          origin={config.publicUrl}
          model={config.allowedModels[0] ?? "glm-4.6"}
        />
      </Layout>,
    );
  });

  app.get("/admin", async (c) => {
    const { session, layout } = await shell(c, "/admin");
    if (!session) return c.redirect("/sign-in", 303);
    if (!config.adminUserIds.has(session.userId)) {
      return render(
        c,
        <Layout title="Forbidden" {...layout}>
          <div class="error-page">
            <div class="code-big">403</div>
            <h1>Operators only</h1>
            <p class="muted">
              Your account ({session.userId}) is not an operator of this Keyway instance.
            </p>
            <a class="btn btn-primary" href="/dashboard">Back to your dashboard</a>
          </div>
        </Layout>,
        403,
      );
    }
    const now = Date.now();
    const { days, totals } = await operatorOverview(services.kv, config.pricing, now);
    const usd = (n: number) => (n > 0 && n < 0.01 ? `$${n.toFixed(4)}` : `$${n.toFixed(2)}`);
    const points = lastDays(30, new Map(days.map((d) => [d.day, d.costUsd])), now);
    return render(
      c,
      <Layout title="Admin" {...layout} clerk={clerk}>
        <div class="page-head">
          <div>
            <h1>Operator</h1>
            <p class="muted">Users, usage and cost of the last 30 days.</p>
          </div>
        </div>
        <div class="grid stat-cards" style={{ marginBottom: "1.25rem" }}>
          <div class="card stat">
            <span class="value">{totals.requests.toLocaleString("en-US")}</span>
            <span class="label">requests, 30 days</span>
          </div>
          <div class="card stat">
            <span class="value" title={totals.totalTokens.toLocaleString("en-US")}>
              {totals.totalTokens.toLocaleString("en-US", {
                notation: totals.totalTokens >= 100_000 ? "compact" : "standard",
                maximumFractionDigits: 1,
              })}
            </span>
            <span class="label">tokens, 30 days</span>
          </div>
          <div class="card stat">
            <span class="value" data-testid="total-cost">{usd(totals.costUsd)}</span>
            <span class="label">cost, 30 days</span>
          </div>
        </div>
        <section class="card" aria-labelledby="cost-title" style={{ marginBottom: "1.25rem" }}>
          <div class="card-head">
            <h2 id="cost-title">Cost per day</h2>
            <p class="muted small">USD, UTC days</p>
          </div>
          <div class="only-wide">
            <UsageChart points={points} label="USD" format={usd} width={1000} height={200} />
          </div>
          <div class="only-narrow">
            <UsageChart points={points} label="USD" format={usd} width={380} height={160} />
          </div>
        </section>
        <AdminUsers mode={authMode} defaults={config.limits} />
      </Layout>,
    );
  });

  return app;
}
