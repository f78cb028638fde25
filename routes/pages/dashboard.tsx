/**
 * The dashboard (CONTRACT §6). The AutoProvision island does the work; the page hands it the
 * usage and account state read now, so returning users see them at once and nothing shifts.
 */
import { Hono } from "hono";
import { island } from "../../build/islands.ts";
import { Layout } from "../../components/Layout.tsx";
import AutoProvisionComponent from "../../islands/AutoProvision.tsx";
import ConnectedAppsComponent from "../../islands/ConnectedApps.tsx";
import { listKeys } from "../../lib/usage/key_usage.ts";
import { usageReport } from "../../lib/usage/usage.ts";
import { serviceState } from "../../lib/limits/upstream/outage.ts";
import { RecentRequests } from "../../components/RequestTable.tsx";
import { authModeOf, clerkScript, pageShell, render } from "./render.tsx";
import type { Services } from "../../lib/core/services.ts";
import type { AppEnv } from "../context.ts";

const AutoProvision = island("AutoProvision", AutoProvisionComponent);
const ConnectedApps = island("ConnectedApps", ConnectedAppsComponent);

export function dashboardRoutes(services: Services) {
  const { config } = services;
  const app = new Hono<AppEnv>();
  const shell = pageShell(services);
  const clerk = clerkScript(config);
  const authMode = authModeOf(config);

  /** The keys as the server reads them now (null: the island loads them itself). */
  const keysOf = async (userId: string) => {
    const user = await services.users.get(userId).catch(() => null);
    if (!user) return null;
    return await listKeys(services.kv, config.pricing, user, services.clock()).catch(() => null);
  };

  app.get("/dashboard", async (c) => {
    const { session, layout } = await shell(c, "/dashboard");
    if (!session) return c.redirect("/sign-in", 303);
    const shared = config.keyMode === "shared";
    // A failed read is not fatal: the island loads GET /api/usage itself.
    const [report, service, requests] = await Promise.all([
      usageReport(services.kv, config, session.userId, 30).catch((err) => {
        services.log.warn("dashboard usage read failed", { error: String(err) });
        return null;
      }),
      serviceState(config, services.slots.pool),
      services.requestLog.list({ userId: session.userId, limit: 10 }),
    ]);
    const initialUsage = report && { ...report, service };
    const keys = shared ? null : await keysOf(session.userId);
    return render(
      c,
      <Layout title="Dashboard" {...layout} clerk={clerk}>
        <div class="page-head">
          <div>
            <h1>Dashboard</h1>
            <p class="muted">Your account, what you have used, and your key.</p>
          </div>
        </div>
        <AutoProvision
          mode={authMode}
          baseUrl={shared ? config.glm.baseUrl : `${config.publicUrl}/v1`}
          anthropicBaseUrl={shared ? config.glm.anthropicBaseUrl : config.publicUrl}
          initialUsage={initialUsage}
          models={config.allowedModels.length ? config.allowedModels : ["glm-4.6"]}
          supportUrl={config.supportUrl}
        />
        {shared ? null : <ConnectedApps mode={authMode} initialKeys={keys} />}
        <RecentRequests
          entries={requests.requests}
          days={config.requestLogDays}
          keyNames={new Map(keys?.map((k) => [k.id, k.name]))}
        />
      </Layout>,
    );
  });

  return app;
}
