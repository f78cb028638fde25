/** The landing page (CONTRACT §6 `/`). */
import { Hono } from "hono";
import { Layout } from "../../components/Layout.tsx";
import { pageShell, render } from "./render.tsx";
import type { Services } from "../../lib/core/services.ts";
import type { AppEnv } from "../context.ts";

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

export function indexRoutes(services: Services) {
  const app = new Hono<AppEnv>();
  const shell = pageShell(services);

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

  return app;
}
