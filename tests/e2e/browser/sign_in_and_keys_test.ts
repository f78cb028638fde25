/**
 * The pages in a real browser (Debian Chromium via playwright-core): local sign-in → dashboard
 * key provisioning, Clerk mode with a fake ClerkJS, the admin page, and screenshots.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import type { Browser, BrowserContext, Page } from "playwright-core";
import { localUserId } from "../../../lib/identity/sessions.ts";
import { recordUsage } from "../../../lib/usage/usage.ts";
import {
  launchBrowser,
  shotsFolder,
  startServer,
  type TestServer,
  watchedContext,
} from "../../support/browser.ts";
import { clerkEnv, ClerkIssuer, MASTER_KEY } from "../../support/helpers.ts";

const DAY = 86_400_000;
const DESKTOP = { width: 1280, height: 860 };
const PHONE = { width: 390, height: 844 };
const KEY = /^kw_[A-Za-z0-9_-]{40,}$/;

interface FakeClerkGlobal {
  __clerkCalls: {
    getToken: number;
    mounted: { kind: string; options: Record<string, string> } | null;
  };
}

/** A stand-in for ClerkJS: load(), a signed-in session handing out `token`, mount recorders. */
function fakeClerkScript(token: string | null) {
  return `
window.__clerkCalls = { getToken: 0, mounted: null };
window.Clerk = {
  loaded: false,
  user: ${token ? '{ id: "signed-in" }' : "null"},
  session: ${
    token
      ? `{ getToken: async () => { window.__clerkCalls.getToken++; return ${
        JSON.stringify(token)
      }; } }`
      : "null"
  },
  load: async function () { await new Promise((r) => setTimeout(r, 20)); this.loaded = true; },
  mountSignIn: function (el, options) {
    window.__clerkCalls.mounted = { kind: "sign-in", options: options };
    el.innerHTML = '<div class="card" id="fake-clerk" style="width:360px"><h2>Sign in</h2><p class="muted">Clerk sign-in component</p></div>';
  },
  mountSignUp: function (el, options) {
    window.__clerkCalls.mounted = { kind: "sign-up", options: options };
    el.innerHTML = '<div class="card" id="fake-clerk"><h2>Create account</h2></div>';
  },
  signOut: async function () { document.cookie = "__session=; Max-Age=0; path=/"; location.assign("/"); },
};`;
}

async function fakeClerk(context: BrowserContext, token: string | null) {
  await context.route("https://clerk.keyway.test/**", (route) =>
    route.fulfill({
      status: 200,
      contentType: "application/javascript",
      headers: { "access-control-allow-origin": "*" },
      body: fakeClerkScript(token),
    }));
}

async function shoot(page: Page, dir: string, name: string, shots: string[]) {
  for (const [size, viewport] of [["desktop", DESKTOP], ["phone", PHONE]] as const) {
    await page.setViewportSize(viewport);
    for (const scheme of ["light", "dark"] as const) {
      await page.emulateMedia({ colorScheme: scheme });
      const path = join(dir, `${name}-${size}-${scheme}.png`);
      await page.screenshot({ path, fullPage: true });
      shots.push(path);
    }
  }
  await page.setViewportSize(DESKTOP);
  await page.emulateMedia({ colorScheme: "light" });
}

/** Some history so charts and tables have something to show. */
async function seedUsage(server: TestServer, userId: string) {
  const { kv, config } = server.services;
  const now = Date.now();
  for (let d = 0; d < 30; d++) {
    const n = Math.round(3 + 6 * Math.abs(Math.sin(d * 1.7)) + (d % 7 === 0 ? 8 : 0));
    for (let i = 0; i < Math.min(n, 4); i++) {
      await recordUsage(kv, config.pricing, {
        userId,
        model: i % 3 === 0 ? "glm-4.5-air" : "glm-4.6",
        promptTokens: 800 * n,
        completionTokens: 300 * n,
        at: now - d * DAY,
        requests: i === 0 ? n - Math.min(n, 4) + 1 : 1,
      });
    }
  }
}

Deno.test("browser: pages, islands and the key flow", async (t) => {
  const folder = await shotsFolder();
  const shotsDir = folder.dir;
  const shots: string[] = [];
  const browser: Browser = await launchBrowser();
  const issuer = await ClerkIssuer.create();
  const local = await startServer();
  const clerk = await startServer(clerkEnv(issuer, { ADMIN_USER_IDS: "user_admin" }));
  try {
    await t.step(
      "local mode: sign in, key provisioned without reload, copy, reveal, rotate",
      async () => {
        const w = await watchedContext(browser, { viewport: DESKTOP });
        await w.context.grantPermissions(["clipboard-read", "clipboard-write"], {
          origin: local.url,
        });
        const page = await w.newPage();
        await page.goto(`${local.url}/`);
        assert.match(await page.locator(".banner").innerText(), /Local mode/);
        assert.equal(await page.locator("script").count(), 0, "the landing page ships no JS");
        await shoot(page, shotsDir, "landing", shots);

        await page.goto(`${local.url}/dashboard`);
        assert.equal(new URL(page.url()).pathname, "/sign-in");
        assert.equal(await page.locator("script").count(), 0, "the local sign-in page ships no JS");
        assert.match(await page.locator(".banner").innerText(), /Local mode/);
        await shoot(page, shotsDir, "sign-in-local", shots);

        // Cumulative layout shift of the dashboard: hydration and data arriving must not jump.
        await page.addInitScript(() => {
          const g = globalThis as unknown as { __cls: number };
          g.__cls = 0;
          new PerformanceObserver((list) => {
            for (
              const e of list.getEntries() as unknown as {
                value: number;
                hadRecentInput: boolean;
              }[]
            ) {
              if (!e.hadRecentInput) g.__cls += e.value;
            }
          }).observe({ type: "layout-shift", buffered: true });
        });
        const email = "ada@example.com";
        await seedUsage(local, await localUserId(email));
        await page.getByLabel("E-mail address").fill(email);
        await Promise.all([
          page.waitForURL(`${local.url}/dashboard`),
          page.getByRole("button", { name: "Sign in" }).click(),
        ]);
        let navigations = 0;
        page.on("framenavigated", (f) => f === page.mainFrame() && navigations++);
        const keyBox = page.getByTestId("api-key");
        await page.waitForFunction(
          () =>
            /^kw_[A-Za-z0-9_-]{4}•+$/.test(
              document.querySelector("[data-testid=api-key]")!.textContent!,
            ),
          undefined,
          { timeout: 10_000 },
        );
        assert.match(await page.locator(".banner").innerText(), /Local mode/);
        // A returning user (usage seeded): the set-up is folded away below the usage.
        assert.equal(await page.getByTestId("setup").getAttribute("open"), null);
        await page.getByText("Your API key and set-up").click();
        assert.equal(await page.getByTestId("base-url").innerText(), "http://localhost:8000/v1");

        await page.getByRole("button", { name: "Reveal" }).click();
        const revealed = (await keyBox.innerText()).trim();
        assert.match(revealed, KEY);
        const fromApi = await page.evaluate(async () =>
          (await (await fetch("/api/key")).json()).apiKey
        );
        assert.equal(revealed, fromApi);
        assert.equal(
          (await local.services.users.resolveKey(revealed))?.id,
          await localUserId(email),
        );

        await page.getByRole("button", { name: "Copy key" }).click();
        await page.getByRole("button", { name: "Copied ✓" }).waitFor();
        assert.equal(await page.evaluate(() => navigator.clipboard.readText()), revealed);

        // The curl snippet carries the real key once revealed.
        await page.getByRole("tab", { name: "curl" }).click();
        assert.ok((await page.getByTestId("snippet-curl-0").innerText()).includes(revealed));

        // Usage from GET /api/usage (seeded above).
        await page.getByTestId("usage-requests").filter({ hasNotText: "0" }).waitFor();
        assert.ok(await page.getByRole("progressbar", { name: "Requests today" }).isVisible());
        const cls = await page.evaluate(() => (globalThis as unknown as { __cls: number }).__cls);
        console.log(`dashboard cumulative layout shift: ${cls.toFixed(4)}`);
        assert.ok(cls < 0.02, `layout shift ${cls} while the island loaded`);
        await page.getByRole("tab", { name: "Continue" }).click();
        await page.getByRole("button", { name: "Hide" }).click();
        await shoot(page, shotsDir, "dashboard-local", shots);

        await page.getByRole("button", { name: "Rotate key…" }).click();
        await page.getByRole("button", { name: "Yes, rotate key" }).click();
        await page.getByText("New key created").waitFor();
        await page.getByRole("button", { name: "Reveal" }).click();
        const rotated = (await keyBox.innerText()).trim();
        assert.match(rotated, KEY);
        assert.notEqual(rotated, revealed);
        assert.equal(await local.services.users.resolveKey(revealed), null, "old key is dead");
        assert.equal(navigations, 0, "no reload while provisioning, revealing or rotating");
        assert.deepEqual(w.errors, []);
        await w.context.close();
      },
    );

    await t.step(
      "Clerk mode: ClerkJS token as Bearer, key, base URL, usage; no master key",
      async () => {
        const w = await watchedContext(browser, { viewport: DESKTOP });
        const cookieToken = await issuer.token("user_clerk", { ttlSeconds: 600 });
        const freshToken = await issuer.token("user_clerk", { ttlSeconds: 600 });
        await fakeClerk(w.context, freshToken);
        await w.context.addCookies([{ name: "__session", value: cookieToken, url: clerk.url }]);
        const page = await w.newPage();
        const keyAuth: string[] = [];
        page.on("request", (r) => {
          if (new URL(r.url()).pathname === "/api/key") keyAuth.push(r.headers()["authorization"]);
        });
        await page.goto(`${clerk.url}/dashboard`);
        assert.equal(new URL(page.url()).pathname, "/dashboard");
        assert.equal(await page.locator(".banner").count(), 0, "no local-mode banner with Clerk");
        await page.waitForFunction(
          () =>
            /^kw_[A-Za-z0-9_-]{4}•/.test(
              document.querySelector("[data-testid=api-key]")!.textContent!,
            ),
          undefined,
          { timeout: 10_000 },
        );
        assert.deepEqual(keyAuth, [`Bearer ${freshToken}`], "fresh ClerkJS token, sent as Bearer");
        assert.ok(
          await page.evaluate(() =>
            (globalThis as unknown as FakeClerkGlobal).__clerkCalls.getToken
          ) >= 1,
        );
        assert.equal(await page.getByTestId("base-url").innerText(), "http://localhost:8000/v1");
        // A new user: words where the chart will be, not a zero summary.
        await page.getByTestId("usage-empty").filter({ hasText: "first request will show" })
          .waitFor();
        assert.equal(await page.getByTestId("usage-requests").count(), 0);
        await page.getByRole("button", { name: "Reveal" }).click();
        assert.match((await page.getByTestId("api-key").innerText()).trim(), KEY);
        const html = await page.content();
        assert.ok(!html.includes(MASTER_KEY), "master key in the page");
        const served = await (await fetch(`${clerk.url}/dashboard`, {
          headers: { cookie: `__session=${cookieToken}` },
        })).text();
        assert.ok(!served.includes(MASTER_KEY), "master key in the served HTML");
        assert.deepEqual(w.errors, []);
        await w.context.close();
      },
    );

    await t.step("the island retries a failing key API", async () => {
      const token = await issuer.token("user_retry", { ttlSeconds: 600 });
      // What the server sends before any script runs: the skeleton the island hydrates.
      const still = await watchedContext(browser, { viewport: DESKTOP, javaScriptEnabled: false });
      await still.context.addCookies([{ name: "__session", value: token, url: clerk.url }]);
      const stillPage = await still.newPage();
      await stillPage.goto(`${clerk.url}/dashboard`);
      assert.equal(
        await stillPage.locator('[data-island="AutoProvision"] [data-testid=api-key]').innerText(),
        "kw_••••" + "•".repeat(20),
      );
      await shoot(stillPage, shotsDir, "dashboard-skeleton", shots);
      await still.context.close();

      const w = await watchedContext(browser, { viewport: DESKTOP });
      await fakeClerk(w.context, token);
      await w.context.addCookies([{ name: "__session", value: token, url: clerk.url }]);
      let keyCalls = 0;
      await w.context.route("**/api/key", async (route) => {
        if (++keyCalls === 1) {
          return await route.fulfill({
            status: 503,
            contentType: "application/json",
            body: JSON.stringify({ error: { code: "not_configured", message: "Try later." } }),
          });
        }
        await route.continue();
      });
      const page = await w.newPage();
      await page.goto(`${clerk.url}/dashboard`);
      await page.getByText("Retrying in 1 s").waitFor();
      await page.waitForFunction(
        () =>
          /^kw_[A-Za-z0-9_-]{4}•/.test(
            document.querySelector("[data-testid=api-key]")!.textContent!,
          ),
        undefined,
        { timeout: 10_000 },
      );
      assert.equal(keyCalls, 2);
      // The usage came with the page: the island did not need GET /api/usage.
      await page.getByTestId("usage-empty").waitFor();
      // The failure was answered on purpose; nothing else may log an error.
      assert.deepEqual(w.errors.filter((e) => !/status of 503/.test(e)), []);
      assert.equal(w.errors.length, 1);
      await w.context.close();
    });

    await t.step(
      "Clerk mode: sign-in mounts Clerk's component, redirecting to /dashboard",
      async () => {
        const w = await watchedContext(browser, { viewport: DESKTOP });
        await fakeClerk(w.context, null);
        const page = await w.newPage();
        const res = await page.goto(`${clerk.url}/sign-in`);
        const csp = res?.headers()["content-security-policy"] ?? "";
        assert.match(csp, /script-src 'self' https:\/\/clerk\.keyway\.test /);
        assert.match(csp, /connect-src 'self' https:\/\/clerk\.keyway\.test /);
        await page.locator("#fake-clerk").waitFor();
        const mounted = await page.evaluate(() =>
          (globalThis as unknown as FakeClerkGlobal).__clerkCalls.mounted
        );
        assert.ok(mounted, "Clerk's sign-in was mounted");
        assert.equal(mounted.kind, "sign-in");
        assert.equal(mounted.options.signUpUrl, "/sign-up");
        assert.equal(mounted.options.forceRedirectUrl, "/dashboard");
        const scripts = await page.locator("script[src]").evaluateAll((els) =>
          els.map((e) => e.getAttribute("src")!)
        );
        assert.ok(
          scripts.includes("https://clerk.keyway.test/npm/@clerk/clerk-js@5/dist/clerk.browser.js"),
        );
        assert.equal(
          await page.locator("script[data-clerk-publishable-key]").getAttribute(
            "data-clerk-publishable-key",
          ),
          clerk.services.config.clerk.publishableKey,
        );
        await shoot(page, shotsDir, "sign-in-clerk", shots);
        assert.deepEqual(w.errors, []);
        await w.context.close();
      },
    );

    await t.step("admin: 403 for others; the operator sees users and disables one", async () => {
      await seedUsage(clerk, "user_clerk");
      await clerk.services.users.provision("user_bob", {
        email: "bob@example.com",
        firstName: null,
        lastName: null,
      });
      const other = await watchedContext(browser, { viewport: DESKTOP });
      const otherToken = await issuer.token("user_clerk", { ttlSeconds: 600 });
      await fakeClerk(other.context, otherToken);
      await other.context.addCookies([{ name: "__session", value: otherToken, url: clerk.url }]);
      const otherPage = await other.newPage();
      const res = await otherPage.goto(`${clerk.url}/admin`);
      assert.equal(res?.status(), 403);
      await otherPage.getByRole("heading", { name: "Operators only" }).waitFor();
      assert.equal(await otherPage.locator("script").count(), 0, "no island, no JS");
      await otherPage.goto(`${clerk.url}/`);
      await otherPage.getByRole("link", { name: "Go to dashboard" }).waitFor();
      assert.equal(await otherPage.locator("script").count(), 0, "Clerk-mode landing: no JS");
      await otherPage.goto(`${clerk.url}/admin`);
      await shoot(otherPage, shotsDir, "admin-403", shots);
      // 403 is expected for the document itself; nothing else may fail.
      assert.deepEqual(other.errors.filter((e) => !e.includes("403")), []);
      await other.context.close();

      const w = await watchedContext(browser, { viewport: DESKTOP });
      const adminToken = await issuer.token("user_admin", { ttlSeconds: 600 });
      await fakeClerk(w.context, adminToken);
      await w.context.addCookies([{ name: "__session", value: adminToken, url: clerk.url }]);
      const page = await w.newPage();
      assert.equal((await page.goto(`${clerk.url}/admin`))?.status(), 200);
      const row = page.locator('tr[data-user-id="user_clerk"]');
      await row.waitFor({ timeout: 10_000 });
      assert.equal(await row.getByTestId("user-status").innerText(), "active");
      assert.ok(await page.locator('tr[data-user-id="user_bob"]').isVisible());
      await page.getByRole("button", { name: "Cost" }).click(); // sort toggles without errors
      await shoot(page, shotsDir, "admin", shots);
      await row.getByRole("button", { name: /^Disable/ }).click();
      await row.getByRole("button", { name: "Yes, disable" }).click();
      await row.getByTestId("user-status").filter({ hasText: "disabled" }).waitFor();
      assert.equal((await clerk.services.users.get("user_clerk"))?.status, "disabled");
      await row.getByRole("button", { name: /^Enable/ }).click();
      await row.getByTestId("user-status").filter({ hasText: "active" }).waitFor();
      assert.equal((await clerk.services.users.get("user_clerk"))?.status, "active");
      // A limit override through the form; an emptied field clears it again.
      await row.getByRole("button", { name: "Limits" }).click();
      await page.getByLabel("Requests / min").fill("5");
      await page.getByRole("button", { name: "Save" }).click();
      await page.getByText("Limits saved for user_clerk.").waitFor();
      assert.equal((await clerk.services.users.get("user_clerk"))?.limits.rpm, 5);
      await row.getByRole("button", { name: "Limits" }).click();
      assert.equal(await page.getByLabel("Requests / min").inputValue(), "5");
      await page.getByLabel("Requests / min").fill("");
      await page.getByRole("button", { name: "Save" }).click();
      await page.getByText("Limits saved for user_clerk.").waitFor();
      await page.waitForFunction(() => !document.querySelector(".limits-form"));
      assert.equal((await clerk.services.users.get("user_clerk"))?.limits.rpm, undefined);
      assert.deepEqual(w.errors, []);
      await w.context.close();
    });
  } finally {
    await browser.close();
    await local.close();
    await clerk.close();
    await folder.done(shots);
  }
});
