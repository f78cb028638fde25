/** The 404 page (CONTRACT §6: any other path, in the site's layout). `/api` and `/v1` answer JSON. */
import type { Context } from "hono";
import { Layout } from "../../components/Layout.tsx";
import type { Services } from "../../lib/core/services.ts";
import type { AppEnv } from "../context.ts";
import { pageShell, render } from "./render.tsx";

/** A renderer for app.notFound and for pages whose record does not exist (/admin/users/:id). */
export function notFoundPage(services: Services) {
  const shell = pageShell(services);
  return async (c: Context<AppEnv>, what = "This page does not exist") => {
    const { session, layout } = await shell(c, c.req.path);
    return render(
      c,
      <Layout title="Not found" {...layout}>
        <div class="error-page">
          <p class="code-big" aria-hidden="true">404</p>
          <h1>{what}</h1>
          <p class="muted">
            Nothing is at{" "}
            <code>{c.req.path.slice(0, 200)}</code>. Check the address for a typo, or start again
            from {session ? "your dashboard" : "the home page"}.
          </p>
          <div class="actions">
            <a class="btn btn-primary" href={session ? "/dashboard" : "/"}>
              {session ? "Go to your dashboard" : "Go to the home page"}
            </a>
            {session && <a class="btn" href="/">Home page</a>}
          </div>
        </div>
      </Layout>,
      404,
    );
  };
}
