/**
 * Operator pages (CONTRACT §6 `/admin`): totals and cost per day over all users, the users list,
 * and one page per user (`/admin/users/:id`) with their chart, models, key prefix, limits and
 * actions. Operators only (ADMIN_USER_IDS); others get a 403 page.
 */
import { KeyTable, ModelTable } from "../../components/ModelTable.tsx";
import { type Context, Hono } from "hono";
import { z } from "zod";
import { island } from "../../build/islands.ts";
import { Layout, type LayoutProps } from "../../components/Layout.tsx";
import { type AlertLine, UpstreamHealth } from "../../components/UpstreamHealth.tsx";
import { OutageBanner } from "../../components/OutageBanner.tsx";
import { currentOutage } from "../../lib/limits/upstream/outage.ts";
import AdminUsersComponent from "../../islands/AdminUsers.tsx";
import DailyChartComponent, { lastDays } from "../../islands/DailyChart.tsx";
import UserActionsComponent from "../../islands/UserActions.tsx";
import {
  formatCount,
  formatDate,
  formatDateTime,
  formatDay,
  formatInt,
  formatTokens,
  formatUsd,
} from "../../lib/core/format.ts";
import type { Session } from "../../lib/identity/sessions.ts";
import { operatorCheck, operatorRefusal } from "../../lib/identity/operators.ts";
import { operatorOverview } from "../../lib/reports/overview.ts";
import type { Services } from "../../lib/core/services.ts";
import type { AppEnv } from "../context.ts";
import { adminUserRead } from "../api/admin.ts";
import { RecentRequests } from "../../components/RequestTable.tsx";
import { notFoundPage } from "./not_found.tsx";
import { authModeOf, clerkScript, pageShell, render } from "./render.tsx";

const AdminUsers = island("AdminUsers", AdminUsersComponent);
const DailyChart = island("DailyChart", DailyChartComponent);
const UserActions = island("UserActions", UserActionsComponent);

/** Users per page of /admin's list (the API's default is 50; a page should fit a screen or two). */
const USERS_PER_PAGE = 25;

const userIdParam = z.object({ id: z.string().min(1).max(200).regex(/^[A-Za-z0-9_.:-]+$/) });

/**
 * The operator's session and layout, or the page to answer instead: sign-in (and back), or a 403
 * page that says why (not listed in ADMIN_USER_IDS, or the operator's own account disabled or
 * deleted). Every /admin page starts with it.
 */
export function operatorGate(services: Services) {
  const { config, users } = services;
  const shell = pageShell(services);
  return async (
    c: Context<AppEnv>,
    path: string,
  ): Promise<
    | { session: Session; layout: Omit<LayoutProps, "children" | "title">; page?: undefined }
    | { page: Response }
  > => {
    const { session, layout } = await shell(c, path);
    // Back here after signing in (an operator's bookmark outlives a 60 s Clerk session token).
    if (!session) {
      return { page: c.redirect(`/sign-in?redirect=${encodeURIComponent(path)}`, 303) };
    }
    const check = await operatorCheck(config, users, session.userId);
    if (check.operator) return { session, layout };
    return {
      page: await render(
        c,
        <Layout title="Forbidden" {...layout}>
          <div class="error-page">
            <div class="code-big">403</div>
            <h1>Operators only</h1>
            <p class="muted" data-testid="forbidden-reason">
              {check.why === "not_listed"
                ? `Your account (${session.userId}) is not an operator of this Keyway instance.`
                : operatorRefusal(check.why)}
            </p>
            <a class="btn btn-primary" href="/dashboard">Back to your dashboard</a>
          </div>
        </Layout>,
        403,
      ),
    };
  };
}

export function adminRoutes(services: Services) {
  const { config, users } = services;
  const app = new Hono<AppEnv>();
  const clerk = clerkScript(config);
  const authMode = authModeOf(config);
  const notFound = notFoundPage(services);
  const defaults = config.limits;
  const operator = operatorGate(services);

  const eventsOn = services.events.enabled;
  const recentAlerts = async (): Promise<AlertLine[]> =>
    (await services.events.recentAlerts(10)).map((a) => ({
      id: a.id,
      type: a.type,
      at: a.at,
      message: a.message,
    }));

  /** Start-up problems an operator can fix, shown on every operator page. */
  const notices = () =>
    config.keyMode === "proxy" && !config.glm.apiKey
      ? (
        <p class="notice notice-error" role="alert" data-testid="notice-no-glm-key">
          <strong>GLM_API_KEY is not set.</strong>{" "}
          Every gateway request is refused with 503 not_configured until you set it and restart
          Keyway.
        </p>
      )
      : null;

  app.get("/admin", async (c) => {
    const who = await operator(c, "/admin");
    if (who.page) return who.page;
    const now = Date.now();
    const [{ days, totals }, health, alerts, outage] = await Promise.all([
      operatorOverview(services.kv, config.pricing, now),
      services.slots.health(now),
      recentAlerts(),
      currentOutage(config, services.slots.pool),
    ]);
    const refused = outage?.since != null
      ? await services.slots.pool.refusedSince(outage.since)
      : 0;
    const points = lastDays(
      30,
      new Map(days.map((d) => [d.day, {
        value: d.costUsd,
        detail: `${formatCount(d.requests, "request")} · ${formatCount(d.users, "user")}`,
      }])),
      now,
    );
    return render(
      c,
      <Layout title="Admin" {...who.layout} clerk={clerk} wide>
        {outage && <OutageBanner outage={outage} refused={refused} now={now} />}
        <div class="page-head">
          <div>
            <h1>Operator</h1>
            <p class="muted">Users, usage and cost of the last 30 days.</p>
            <p class="small">
              <a href="/admin/requests">Request log →</a>
            </p>
          </div>
        </div>
        {notices()}
        <UpstreamHealth
          health={health}
          capped={Object.values(config.glm.concurrency).some((n) => n > 0)}
          alerts={alerts}
          eventsOn={eventsOn}
        />
        <div class="grid stat-cards" style={{ marginBottom: "1.25rem" }}>
          <div class="card stat">
            <span class="value">{formatInt(totals.requests)}</span>
            <span class="label">requests, 30 days</span>
          </div>
          <div class="card stat">
            <span class="value">{formatTokens(totals.totalTokens)}</span>
            <span class="label">tokens, 30 days</span>
          </div>
          <div class="card stat">
            <span class="value" data-testid="total-cost">{formatUsd(totals.costUsd)}</span>
            <span class="label">cost, 30 days</span>
          </div>
        </div>
        <section class="card" aria-labelledby="cost-title" style={{ marginBottom: "1.25rem" }}>
          <div class="card-head">
            <h2 id="cost-title">Cost per day</h2>
            <p class="muted small">USD, UTC days</p>
          </div>
          <DailyChart points={points} kind="usd" title="Cost per day, last 30 days" />
        </section>
        <AdminUsers
          mode={authMode}
          defaults={defaults}
          selfId={who.session.userId}
          pageSize={USERS_PER_PAGE}
        />
      </Layout>,
    );
  });

  app.get("/admin/users/:id", async (c) => {
    const who = await operator(c, c.req.path);
    if (who.page) return who.page;
    const parsed = userIdParam.safeParse(c.req.param());
    const user = parsed.success ? await users.get(parsed.data.id) : null;
    if (!user) return await notFound(c, "No such user");
    const now = Date.now();
    const [{ view, usage }, requests] = await Promise.all([
      adminUserRead(services.kv, config, user, now),
      services.requestLog.list({ userId: user.id, limit: 20 }),
    ]);
    const { usage30d: total, lastActiveAt: lastActive } = view;
    const points = lastDays(
      30,
      new Map(usage.days.map((d) => [d.date, {
        value: d.requests,
        detail: `${formatCount(d.totalTokens, "token")} · ${formatUsd(d.costUsd)}`,
      }])),
      now,
    );
    const name = user.email ?? user.id;
    const state = usage.state;
    return render(
      c,
      <Layout title={`${name} · Admin`} {...who.layout} clerk={clerk}>
        <nav aria-label="Breadcrumb" class="crumbs small">
          <a href="/admin">Operator</a> <span aria-hidden="true">›</span> {name}
        </nav>
        <div class="page-head">
          <div>
            <h1 class="break">{name}</h1>
            <p class="muted">
              <code>{user.id}</code>
            </p>
          </div>
        </div>
        {notices()}
        <div class="grid grid-2" style={{ marginBottom: "1.25rem" }}>
          <section class="card" aria-labelledby="profile-title">
            <h2 id="profile-title">Account</h2>
            <dl class="kv" data-testid="user-profile">
              <dt>Status</dt>
              <dd>
                <span
                  class={`status ${
                    state.status === "active"
                      ? "status-ok"
                      : state.status === "paused" || state.status === "disabled"
                      ? "status-warn"
                      : "status-danger"
                  }`}
                  data-testid="user-state"
                >
                  {state.status === "paused"
                    ? `paused until ${formatDateTime(state.until)}`
                    : state.status}
                </span>
              </dd>
              <dt>Key prefix</dt>
              <dd>{user.key ? <code>{user.key.prefix}…</code> : "No key"}</dd>
              <dt>Created</dt>
              <dd>{formatDate(user.createdAt)}</dd>
              <dt>Last active</dt>
              <dd>{lastActive ? formatDay(lastActive) : "Not in the last 30 days"}</dd>
              <dt>30 days</dt>
              <dd>
                {formatInt(total.requests)} requests · {formatTokens(total.totalTokens)} tokens ·
                {" "}
                {formatUsd(total.costUsd)}
              </dd>
              <dt>This month</dt>
              <dd>{formatUsd(usage.thisMonth.costUsd)}</dd>
            </dl>
          </section>
          <UserActions
            mode={authMode}
            selfId={who.session.userId}
            defaults={defaults}
            user={view}
          />
        </div>
        <section class="card" aria-labelledby="chart-title" style={{ marginBottom: "1.25rem" }}>
          <div class="card-head">
            <h2 id="chart-title">Requests per day</h2>
            <p class="muted small">Last 30 UTC days</p>
          </div>
          <DailyChart
            points={points}
            kind="requests"
            title="Requests per day, last 30 days"
            testId="user-chart"
          />
        </section>
        <section class="card" aria-labelledby="models-title">
          <h2 id="models-title">By model</h2>
          {usage.byModel.length
            ? <ModelTable rows={usage.byModel} testId="user-models" />
            : <p class="muted">No requests in the last 30 days.</p>}
        </section>
        <RecentRequests
          entries={requests.requests}
          days={config.requestLogDays}
          title="Their last requests"
          keyNames={new Map(usage.byKey.map((k) => [k.keyId, k.name]))}
          testId="user-requests"
          more={requests.next
            ? {
              href: `/admin/requests?user=${encodeURIComponent(user.id)}`,
              label: "All of them →",
            }
            : undefined}
        />
        <section class="card" aria-labelledby="keys-title" style={{ marginTop: "1.25rem" }}>
          <h2 id="keys-title">By key</h2>
          <KeyTable rows={usage.byKey} testId="user-keys" />
        </section>
      </Layout>,
    );
  });

  return app;
}
