/** The dashboard (CONTRACT §6): the AutoProvision island does the work. */
import { Hono } from "hono";
import { island } from "../../build/islands.ts";
import { Layout } from "../../components/Layout.tsx";
import AutoProvisionComponent from "../../islands/AutoProvision.tsx";
import { authModeOf, clerkScript, pageShell, render } from "./render.tsx";
import type { Services } from "../../lib/core/services.ts";
import type { AppEnv } from "../context.ts";

const AutoProvision = island("AutoProvision", AutoProvisionComponent);

export function dashboardRoutes(services: Services) {
  const { config } = services;
  const app = new Hono<AppEnv>();
  const shell = pageShell(services);
  const clerk = clerkScript(config);
  const authMode = authModeOf(config);

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

  return app;
}
