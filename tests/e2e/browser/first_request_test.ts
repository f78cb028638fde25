/**
 * In a real browser: what a new user meets — "Use it" with the tool tabs first, each snippet the
 * recipes module's (lib/recipes/) with their key and this instance's URLs; a 30-day panel that
 * says "Your first request will show here" instead of an empty chart; a test request sent from
 * the page through the gateway that shows the answer and is counted — and, with SUPPORT_URL set,
 * paused and disabled users sent to it. Audited with axe and photographed at both widths, both
 * schemes.
 */
import assert from "node:assert/strict";
import type { Page } from "playwright-core";
import { parse as parseYaml } from "yaml";
import { localUserId } from "../../../lib/identity/sessions.ts";
import { recipes } from "../../../lib/recipes/recipes.ts";
import { FakeGlm } from "../../../testing/fakes/glm.ts";
import { PUBLIC_URL } from "../../support/helpers.ts";
import {
  DESKTOP,
  inspect,
  launchBrowser,
  shotsFolder,
  signedIn,
  startServer,
  type TestServer,
  type Watched,
} from "../../support/browser.ts";

const OPERATOR = "op@example.com";
const SUPPORT = "mailto:help@example.com";

async function openDashboard(w: Watched, server: TestServer): Promise<Page> {
  const page = await w.newPage();
  await page.goto(`${server.url}/dashboard`);
  await page.waitForFunction(
    () => {
      const key = document.querySelector("[data-testid=api-key]")?.textContent ?? "";
      return /^kw_[A-Za-z0-9_-]{4}•+$/.test(key) ||
        document.querySelector("[data-testid=key-error]") !== null;
    },
    undefined,
    { timeout: 10_000 },
  );
  return page;
}

const top = (page: Page, selector: string) =>
  page.locator(selector).first().evaluate((e) => e.getBoundingClientRect().top);

Deno.test("dashboard: a new user's first request, the set-up tabs, and where to get help", async (t) => {
  const folder = await shotsFolder();
  const shots: string[] = [];
  const browser = await launchBrowser();
  const fake = new FakeGlm();
  const server = await startServer({
    GLM_BASE_URL: fake.baseUrl,
    ADMIN_USER_IDS: await localUserId(OPERATOR),
    SUPPORT_URL: SUPPORT,
    RATE_LIMIT_RPD: "3",
  });
  const { config } = server.services;
  const dir = folder.dir;
  try {
    await t.step("new user: 'your first request will show here', tabs first", async () => {
      const { w } = await signedIn(browser, server, "first@example.com");
      const page = await openDashboard(w, server);
      const usage = page.locator("section[aria-labelledby=usage-title]");
      assert.match(
        await usage.getByTestId("usage-empty").innerText(),
        /Your first request will show here\./,
      );
      // No empty chart, no 0/1/2 axis, no zero summary.
      assert.equal(await usage.getByTestId("usage-chart").count(), 0);
      assert.equal(await usage.getByTestId("usage-requests").count(), 0);
      assert.doesNotMatch(await usage.innerText(), /\b0 requests\b|\$0\.00/);
      assert.equal(await usage.getByRole("button", { name: "Send a test request" }).count(), 1);
      // "Use it": the heading, then the tabs, then the connect flows' explanation.
      const [heading, tabs, panel, note] = await Promise.all([
        top(page, "#setup-title"),
        top(page, "[role=tablist]"),
        top(page, "#snippet-panel"),
        top(page, "[data-testid=connect-note]"),
      ]);
      assert.ok(heading < tabs && tabs < panel && panel < note, `${[heading, tabs, panel, note]}`);
      // On a desktop the Today card spans the width, its meters in a row: nothing blank beside it.
      const cards = await page.locator(".usage-grid > section").evaluateAll((els) =>
        els.map((e) => {
          const r = e.getBoundingClientRect();
          return { left: r.left, width: r.width, height: r.height };
        })
      );
      assert.equal(cards.length, 2);
      assert.deepEqual([cards[0].left, cards[0].width], [cards[1].left, cards[1].width]);
      assert.ok(cards[0].height < 260, `Today is ${cards[0].height}px tall`);
      const meters = await page.locator(".meters > *").evaluateAll((els) =>
        els.map((e) => Math.round(e.getBoundingClientRect().top))
      );
      assert.equal(new Set(meters).size, 1, `meters in a row: ${meters}`);
      await inspect(page, dir, "dashboard-first-visit", shots);
      assert.deepEqual(w.errors, []);
      await w.context.close();
    });

    await t.step("every tab shows the recipes module's snippets, with the real key", async () => {
      const { w } = await signedIn(browser, server, "tabs@example.com");
      const page = await openDashboard(w, server);
      await page.getByRole("button", { name: "Reveal" }).click();
      const key = (await page.getByTestId("api-key").innerText()).trim();
      const expected = recipes({
        baseUrl: `${PUBLIC_URL}/v1`,
        anthropicBaseUrl: PUBLIC_URL,
        apiKey: key,
        models: config.allowedModels,
      });
      const tabs = await page.getByRole("tab").all();
      assert.deepEqual(
        await Promise.all(tabs.map(async (tab) => (await tab.innerText()).trim())),
        expected.map((r) => r.label),
      );
      for (const [i, tab] of tabs.entries()) {
        await tab.click();
        const recipe = expected[i];
        const codes = await page.locator("#snippet-panel code").all();
        assert.equal(codes.length, recipe.files.length, recipe.label);
        for (const [j, code] of codes.entries()) {
          const text = await code.innerText();
          const file = recipe.files[j];
          assert.equal(text, file.content, `${recipe.label}: ${file.title}`);
          assert.equal(await code.getAttribute("data-lang"), file.lang);
          if (file.lang === "json") JSON.parse(text);
          if (file.lang === "yaml") assert.equal(parseYaml(text).models[0].apiKey, key);
        }
      }
      // On a phone every tab is on screen: they wrap rather than scroll out of sight.
      await page.setViewportSize({ width: 390, height: 844 });
      const offscreen = await page.getByRole("tab").evaluateAll((els) =>
        els.filter((e) => {
          const r = e.getBoundingClientRect();
          return r.left < 0 || r.right > document.documentElement.clientWidth;
        }).length
      );
      assert.equal(offscreen, 0);
      await page.setViewportSize(DESKTOP);
      await page.getByRole("button", { name: "Hide" }).click();
      await page.getByRole("tab", { name: "opencode" }).click();
      await inspect(page, dir, "dashboard-setup-opencode", shots);
      assert.deepEqual(w.errors, []);
      await w.context.close();
    });

    await t.step(
      "test request: the answer, its tokens, and the usage panel counts it",
      async () => {
        const { w } = await signedIn(browser, server, "try@example.com");
        const page = await openDashboard(w, server);
        const before = fake.requests.length;
        await page.getByRole("button", { name: "Send a test request" }).click();
        const result = page.getByTestId("test-result");
        await result.filter({ hasText: "Hello!" }).waitFor();
        assert.match(await result.innerText(), /It worked: \d+ tokens \(\d+ in, \d+ out\)/);
        // A real request through the gateway, to the upstream, with the default model.
        assert.equal(fake.requests.length, before + 1);
        assert.equal(JSON.parse(fake.requests.at(-1)!.body).model, config.allowedModels[0]);
        // Counted like any request: the 30-day panel and today's meter show it.
        await page.getByTestId("usage-requests").filter({ hasText: /^1$/ }).waitFor();
        assert.equal(await page.getByTestId("usage-empty").count(), 0);
        assert.equal(await page.getByTestId("usage-chart").count(), 1);
        assert.match(await page.getByTestId("meter-requests").innerText(), /\b1\b/);
        assert.match(await page.getByTestId("account-state").innerText(), /2 requests left today/);
        // The page keeps its place: the answer stays, the set-up stays open above.
        assert.match(await result.innerText(), /Hello!/);
        assert.notEqual(await page.getByTestId("setup").getAttribute("open"), null);
        await inspect(page, dir, "dashboard-after-test-request", shots);
        assert.deepEqual(w.errors, []);
        await w.context.close();
      },
    );

    await t.step("test request refused: said in plain words", async () => {
      const { w, token } = await signedIn(browser, server, "rotated@example.com");
      const page = await openDashboard(w, server);
      // The key changes elsewhere (another tab) after the page loaded it.
      const res = await fetch(`${server.url}/api/key/rotate`, {
        method: "POST",
        headers: { authorization: `Bearer ${token}` },
      });
      assert.equal(res.status, 200);
      await res.body?.cancel();
      await page.getByRole("button", { name: "Send a test request" }).click();
      const result = page.getByTestId("test-result");
      await result.filter({ hasText: "did not work" }).waitFor();
      assert.match(
        await result.innerText(),
        /The test request did not work\. Your key was refused: it may have just been rotated\. Reload the page and try again\./,
      );
      assert.match(await page.getByTestId("usage-empty").innerText(), /first request/);
      // The browser logs the refused request itself; nothing else may fail.
      assert.deepEqual(w.errors.filter((e) => !/status of 401/.test(e)), []);
      await w.context.close();
    });

    await t.step("paused: the banner links to SUPPORT_URL; no operator jargon", async () => {
      const { w, token } = await signedIn(browser, server, "paused@example.com");
      const key = await (await fetch(`${server.url}/api/key`, {
        method: "POST",
        headers: { authorization: `Bearer ${token}` },
      })).json();
      for (let i = 0; i < 4; i++) {
        const res = await fetch(`${server.url}/v1/chat/completions`, {
          method: "POST",
          headers: { authorization: `Bearer ${key.apiKey}`, "content-type": "application/json" },
          body: JSON.stringify({ model: "glm-4.6", messages: [{ role: "user", content: "hi" }] }),
        });
        await res.body?.cancel();
        assert.equal(res.status, i < 3 ? 200 : 403);
      }
      const page = await openDashboard(w, server);
      const state = page.getByTestId("account-state");
      assert.equal(await state.getAttribute("data-status"), "paused");
      const link = state.getByRole("link", { name: "E-mail support" });
      assert.equal(await link.getAttribute("href"), SUPPORT);
      assert.doesNotMatch(await page.locator("body").innerText(), /operator/i);
      await inspect(page, dir, "dashboard-paused-support", shots);
      assert.deepEqual(w.errors, []);
      await w.context.close();
    });

    await t.step(
      "disabled: the banner links to SUPPORT_URL instead of 'the operator'",
      async () => {
        const { w, userId, token } = await signedIn(browser, server, "off@example.com");
        const created = await fetch(`${server.url}/api/key`, {
          method: "POST",
          headers: { authorization: `Bearer ${token}` },
        });
        await created.body?.cancel();
        const op = await server.services.sessions.issueLocal(OPERATOR);
        const res = await fetch(`${server.url}/api/admin/users/${userId}/disable`, {
          method: "POST",
          headers: { authorization: `Bearer ${op.token}` },
        });
        assert.equal(res.status, 200);
        await res.body?.cancel();
        const page = await openDashboard(w, server);
        const state = page.getByTestId("account-state");
        assert.equal(await state.getAttribute("data-status"), "disabled");
        assert.match(await state.innerText(), /until your account is enabled again/);
        const link = state.getByRole("link", { name: "E-mail support" });
        assert.equal(await link.getAttribute("href"), SUPPORT);
        // The footer speaks to the user too, and offers the same help.
        const footer = page.locator("footer");
        assert.equal(await footer.getByRole("link").getAttribute("href"), SUPPORT);
        assert.doesNotMatch(await page.locator("body").innerText(), /operator/i);
        await inspect(page, dir, "dashboard-disabled-support", shots);
        assert.deepEqual(w.errors.filter((e) => !/status of 403/.test(e)), []);
        await w.context.close();
      },
    );
  } finally {
    await browser.close();
    await server.close();
    await fake.close();
    await folder.done(shots);
  }
});
