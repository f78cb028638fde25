/** Pages (CONTRACT §6): one module per page, mounted here. Server-rendered Preact. */
import { Hono } from "hono";
import type { Services } from "../../lib/core/services.ts";
import type { AppEnv } from "../context.ts";
import { adminRoutes } from "./admin.tsx";
import { adminRequestsRoutes } from "./admin_requests.tsx";
import { authPageRoutes } from "./auth.tsx";
import { dashboardRoutes } from "./dashboard.tsx";
import { indexRoutes } from "./index.tsx";

export { clerkFrontendApi, clerkScript, contentSecurityPolicy } from "./render.tsx";

export function pageRoutes(services: Services) {
  const app = new Hono<AppEnv>();
  app.get("/favicon.ico", (c) => c.redirect("/static/favicon.svg", 301));
  for (
    const routes of [indexRoutes, authPageRoutes, dashboardRoutes, adminRoutes, adminRequestsRoutes]
  ) {
    app.route("/", routes(services));
  }
  return app;
}
