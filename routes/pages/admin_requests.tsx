/**
 * `/admin/requests` (CONTRACT §6): the request log of every user, newest first, with the
 * operators' filters (user, model, status, key, date range) as a plain GET form and pages linked
 * by `next` — it works without JavaScript, and every view has its own URL to share. The filters
 * are checked exactly as GET /api/admin/requests checks them; a wrong one is said above the form.
 */
import { type Context, Hono } from "hono";
import { Layout } from "../../components/Layout.tsx";
import { RequestTable } from "../../components/RequestTable.tsx";
import { AppError } from "../../lib/core/errors.ts";
import type { Services } from "../../lib/core/services.ts";
import type { RequestPage } from "../../lib/observe/log_store.ts";
import { adminRequestQuery } from "../api/requests.ts";
import type { AppEnv } from "../context.ts";
import { clerkScript, render } from "./render.tsx";
import { operatorGate } from "./admin.tsx";

/** The filters of the form, in its order (`cursor` and `limit` ride along in links). */
const FILTERS = [
  { name: "user", label: "User id", type: "text", hint: "user_…" },
  { name: "model", label: "Model", type: "text", hint: "glm-4.6" },
  { name: "status", label: "Status", type: "text", hint: "429" },
  { name: "keyId", label: "Key", type: "text", hint: "default" },
  { name: "from", label: "From (UTC)", type: "date", hint: "" },
  { name: "to", label: "To (UTC, included)", type: "date", hint: "" },
] as const;

export function adminRequestsRoutes(services: Services) {
  const { config, users, requestLog } = services;
  const app = new Hono<AppEnv>();
  const operator = operatorGate(services);
  const clerk = clerkScript(config);

  app.get("/admin/requests", async (c: Context<AppEnv>) => {
    const gate = await operator(c, "/admin/requests");
    if (gate.page) return gate.page;
    const { layout } = gate;
    // A form leaves empty fields empty: an empty filter is no filter.
    const raw = Object.fromEntries(
      Object.entries(c.req.query()).filter(([, v]) => v.trim() !== ""),
    );
    let page: RequestPage | null = null;
    let problem: string | null = null;
    try {
      page = await requestLog.list(adminRequestQuery(raw, "/admin/requests"));
    } catch (err) {
      if (!(err instanceof AppError) || err.code !== "invalid_request") throw err;
      problem = err.message;
    }
    // Operators know their users by e-mail: the page's users are looked up (ids only in the log).
    const ids = [...new Set(page?.requests.map((r) => r.userId) ?? [])];
    const emails = new Map<string, string>();
    const keyNames = new Map<string, string>();
    for (const user of await Promise.all(ids.map((id) => users.get(id)))) {
      if (user?.email) emails.set(user.id, user.email);
      for (const app of user?.apps ?? []) keyNames.set(app.id, app.name);
    }
    const { cursor: _cursor, ...filters } = raw;
    const link = (extra: Record<string, string>) =>
      `/admin/requests?${new URLSearchParams({ ...filters, ...extra })}`;
    const filtered = Object.keys(filters).some((k) => k !== "limit");
    return render(
      c,
      <Layout title="Request log · Admin" {...layout} clerk={clerk}>
        <nav aria-label="Breadcrumb" class="crumbs small">
          <a href="/admin">Operator</a> <span aria-hidden="true">›</span> Request log
        </nav>
        <div class="page-head">
          <div>
            <h1>Request log</h1>
            <p class="muted">
              Every gateway request and refusal, newest first, kept {config.requestLogDays}{" "}
              days (REQUEST_LOG_DAYS). Refusals are one line per user, code and minute.
            </p>
          </div>
        </div>
        <form class="card request-filters" method="get" action="/admin/requests">
          <h2 class="sr-only">Filters</h2>
          {problem && (
            <p class="notice notice-error" role="alert" data-testid="filter-problem">
              {problem}
            </p>
          )}
          <div class="filter-grid">
            {FILTERS.map((f) => (
              <div class="field" key={f.name}>
                <label for={`filter-${f.name}`}>{f.label}</label>
                {f.type === "date"
                  ? (
                    <input
                      id={`filter-${f.name}`}
                      name={f.name}
                      type="date"
                      value={filters[f.name] ?? ""}
                      aria-invalid={problem?.startsWith(`${f.name}:`) ? "true" : undefined}
                    />
                  )
                  : (
                    <input
                      id={`filter-${f.name}`}
                      name={f.name}
                      type="text"
                      value={filters[f.name] ?? ""}
                      placeholder={f.hint}
                      aria-invalid={problem?.startsWith(`${f.name}:`) ? "true" : undefined}
                    />
                  )}
              </div>
            ))}
          </div>
          <div class="filter-actions">
            <button class="btn btn-primary" type="submit">Show</button>
            {filtered && <a class="btn" href="/admin/requests">Clear filters</a>}
          </div>
        </form>
        {page && (
          <section class="card" aria-labelledby="log-title" style={{ marginTop: "1.25rem" }}>
            <h2 id="log-title" class="sr-only">Requests</h2>
            {page.requests.length > 0 && (
              <RequestTable
                entries={page.requests}
                showUser
                emails={emails}
                keyNames={keyNames}
                testId="request-log"
              />
            )}
            {page.requests.length === 0 && (
              <p class="muted" data-testid="request-log-empty">
                {filtered || raw.cursor ? "No requests match these filters." : "No requests yet."}
              </p>
            )}
            <nav class="pager" aria-label="Pages">
              {raw.cursor && <a class="btn btn-sm" href={link({})}>First page</a>}
              {page.next && (
                <a class="btn btn-sm" href={link({ cursor: page.next })} rel="next">
                  Next page →
                </a>
              )}
            </nav>
          </section>
        )}
      </Layout>,
      problem ? 400 : 200,
    );
  });
  return app;
}
