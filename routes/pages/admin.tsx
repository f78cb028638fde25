/** The operator page (CONTRACT §6 `/admin`). */
import { Hono } from "hono";
import { island } from "../../build/islands.ts";
import { Layout } from "../../components/Layout.tsx";
import { lastDays, UsageChart } from "../../components/UsageChart.tsx";
import AdminUsersComponent from "../../islands/AdminUsers.tsx";
import { operatorOverview } from "../../lib/reports/overview.ts";
import { authModeOf, clerkScript, pageShell, render } from "./render.tsx";
import type { Services } from "../../lib/core/services.ts";
import type { AppEnv } from "../context.ts";

const AdminUsers = island("AdminUsers", AdminUsersComponent);

export function adminRoutes(services: Services) {
  const { config } = services;
  const app = new Hono<AppEnv>();
  const shell = pageShell(services);
  const clerk = clerkScript(config);
  const authMode = authModeOf(config);

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
