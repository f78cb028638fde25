/**
 * In a real browser: every page and every account state, at desktop 1280×800 and phone
 * 390×844, light and dark — each audited with axe-core (no serious or critical violations) and
 * photographed. States come about the way they do for real: quotas spent by gateway requests
 * against the fake GLM, a user disabled through the operator API.
 */
import assert from "node:assert/strict";
import type { Page } from "playwright-core";
import { localUserId } from "../../../lib/identity/sessions.ts";
import { recordUsage } from "../../../lib/usage/usage.ts";
import {
  assertAccessible,
  DESKTOP,
  inspect,
  launchBrowser,
  PHONE,
  shotsFolder,
  signedIn,
  startServer,
  type TestServer,
  type Watched,
  watchedContext,
} from "../../support/browser.ts";
import { FakeGlm } from "../../../testing/fakes/glm.ts";

const DAY = 86_400_000;
const OPERATOR = "op@example.com";

/** Provisions `email`'s key through the API, as the dashboard does; returns the key. */
async function keyOf(server: TestServer, token: string): Promise<string> {
  const res = await fetch(`${server.url}/api/key`, {
    method: "POST",
    headers: { authorization: `Bearer ${token}` },
  });
  assert.equal(res.status, 201);
  return (await res.json()).apiKey;
}

/** Sends chat requests with `apiKey` until the gateway refuses one; returns that status. */
async function spendUntilRefused(server: TestServer, apiKey: string): Promise<number> {
  for (let i = 0; i < 50; i++) {
    const res = await fetch(`${server.url}/v1/chat/completions`, {
      method: "POST",
      headers: { authorization: `Bearer ${apiKey}`, "content-type": "application/json" },
      body: JSON.stringify({
        model: "glm-4.6",
        messages: [{ role: "user", content: "hi" }],
        max_tokens: 7,
      }),
    });
    await res.body?.cancel();
    if (res.status !== 200) return res.status;
  }
  throw new Error("never refused");
}

/** 30 days of history so charts and tables have something to show. */
async function seedUsage(server: TestServer, userId: string) {
  const { kv, config } = server.services;
  const now = Date.now();
  for (let d = 1; d < 30; d++) {
    const n = Math.round(3 + 6 * Math.abs(Math.sin(d * 1.7)) + (d % 7 === 0 ? 8 : 0));
    await recordUsage(kv, config.pricing, {
      userId,
      model: d % 3 === 0 ? "glm-4.5-air" : "glm-4.6",
      promptTokens: 800 * n,
      completionTokens: 300 * n,
      at: now - d * DAY,
      requests: n,
    });
  }
}

async function openDashboard(w: Watched, server: TestServer) {
  const page = await w.newPage();
  await page.goto(`${server.url}/dashboard`);
  // The island is live once the key (or the refusal) has arrived.
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

/** The chart's y-axis labels, top to bottom, as numbers; checks that the middle is exact. */
async function axisOf(page: Page, testId: string): Promise<string[]> {
  const labels = await page.getByTestId(testId).locator(".dc-axis span").allInnerTexts();
  assert.equal(labels.length, 3);
  return labels;
}
const count = (s: string) => Number(s.replace(/[,$]/g, ""));

const stateOf = async (page: Page) => {
  const box = page.getByTestId("account-state");
  return { status: await box.getAttribute("data-status"), text: await box.innerText() };
};

Deno.test("pages: states, 404, sign-in errors, operator pages — axe, phone, dark", async (t) => {
  const folder = await shotsFolder();
  const shots: string[] = [];
  const browser = await launchBrowser();
  const fake = new FakeGlm();
  const server = await startServer({
    GLM_BASE_URL: fake.baseUrl,
    ADMIN_USER_IDS: await localUserId(OPERATOR),
    UPSTREAM_CONCURRENCY: '{"glm-4.6": 2}',
  });
  const dir = folder.dir;
  try {
    await t.step("landing", async () => {
      const w = await watchedContext(browser, { viewport: DESKTOP });
      const page = await w.newPage();
      await page.goto(`${server.url}/`);
      await inspect(page, dir, "landing", shots);
      assert.deepEqual(w.errors, []);
      await w.context.close();
    });

    await t.step(
      "sign-in: me@localhost is stopped in the form, and inline by the server",
      async () => {
        const w = await watchedContext(browser, { viewport: DESKTOP });
        const page = await w.newPage();
        await page.goto(`${server.url}/sign-in`);
        await inspect(page, dir, "sign-in", shots);
        const email = page.getByLabel("E-mail address");
        await email.fill("me@localhost");
        await page.getByRole("button", { name: "Sign in" }).click();
        assert.equal(new URL(page.url()).pathname, "/sign-in", "the browser kept the form");
        assert.equal(await email.evaluate((e) => (e as HTMLInputElement).validity.valid), false);
        // Past the browser's check (an old browser, a script): the server answers with the form.
        await page.locator("form[action='/auth/local/sign-in']").evaluate((f) =>
          (f as HTMLFormElement).noValidate = true
        );
        const [res] = await Promise.all([
          page.waitForResponse((r) => r.url().endsWith("/auth/local/sign-in")),
          page.getByRole("button", { name: "Sign in" }).click(),
        ]);
        assert.equal(res.status(), 400);
        assert.match(res.headers()["content-type"] ?? "", /text\/html/);
        await page.waitForLoadState();
        const error = page.locator("#email-error");
        assert.match(await error.innerText(), /valid e-mail address/);
        assert.equal(await email.inputValue(), "me@localhost", "what was typed stays");
        assert.equal(await email.getAttribute("aria-invalid"), "true");
        assert.equal(await email.getAttribute("aria-describedby"), "email-error");
        assert.ok(!(await page.content()).includes('"error":{'), "no JSON page");
        await inspect(page, dir, "sign-in-error", shots);
        // The 400 document is expected; nothing else may fail.
        assert.deepEqual(w.errors.filter((e) => !e.includes("400")), []);
        await w.context.close();
      },
    );

    await t.step(
      "404: a page in the layout, dark mode, a way home; JSON under /api, /v1",
      async () => {
        const w = await watchedContext(browser, { viewport: DESKTOP });
        const page = await w.newPage();
        const res = await page.goto(`${server.url}/no/such/page`);
        assert.equal(res?.status(), 404);
        assert.match(res?.headers()["content-type"] ?? "", /text\/html/);
        await page.getByRole("heading", { name: "This page does not exist" }).waitFor();
        assert.ok(await page.locator("header.site-header").isVisible(), "in the layout");
        assert.match(
          await page.locator(".error-page").innerText(),
          /Check the address for a typo, or start again from the home page\./,
        );
        assert.equal(
          await page.getByRole("link", { name: "Go to the home page" }).getAttribute("href"),
          "/",
        );
        const bg = async (scheme: "light" | "dark") => {
          await page.emulateMedia({ colorScheme: scheme });
          return await page.evaluate(() => getComputedStyle(document.body).backgroundColor);
        };
        assert.notEqual(await bg("light"), await bg("dark"), "dark mode applies");
        await page.emulateMedia({ colorScheme: "light" });
        await inspect(page, dir, "not-found", shots);
        for (const path of ["/api/nope", "/v1/nope"]) {
          const api = await fetch(`${server.url}${path}`);
          assert.equal(api.status, 404);
          assert.match(api.headers.get("content-type") ?? "", /application\/json/);
          assert.equal((await api.json()).error.code, "not_found");
        }
        assert.deepEqual(w.errors.filter((e) => !e.includes("404")), []);
        await w.context.close();
      },
    );

    await t.step(
      "new user: active, key and every set-up snippet parsed, unlimited in words",
      async () => {
        const { w } = await signedIn(browser, server, "new@example.com");
        await w.context.grantPermissions(["clipboard-read", "clipboard-write"], {
          origin: server.url,
        });
        const page = await openDashboard(w, server);
        const state = await stateOf(page);
        assert.equal(state.status, "active");
        assert.match(state.text, /Active/);
        assert.match(state.text, /1,000 requests left today/);
        assert.notEqual(await page.getByTestId("setup").getAttribute("open"), null, "open");
        // The default quotas are unlimited: words, not an empty bar.
        const tokens = page.getByTestId("meter-tokens");
        assert.match(await tokens.innerText(), /Unlimited/);
        assert.equal(await tokens.getByRole("progressbar").count(), 0);
        assert.match(await page.getByTestId("meter-budget").innerText(), /Unlimited/);

        await page.getByRole("button", { name: "Reveal" }).click();
        const key = (await page.getByTestId("api-key").innerText()).trim();
        // Every tab's snippets are checked against lib/recipes/ in first_request_test.ts.
        await page.getByRole("tab", { name: "curl" }).click();
        assert.ok((await page.getByTestId("snippet-curl-0").innerText()).includes(key));
        assert.equal(
          await page.getByRole("link", { name: "/connect/device" }).getAttribute("href"),
          "/connect/device",
        );
        // Copying is announced to screen readers.
        await page.getByRole("button", { name: "Copy curl: Terminal" }).click();
        await page.getByTestId("announce").filter({ hasText: "copied to the clipboard" }).waitFor();
        assert.ok((await page.evaluate(() => navigator.clipboard.readText())).includes(key));
        // Keyboard focus is visible.
        await page.getByRole("tab", { name: "curl" }).focus();
        await page.keyboard.press("ArrowLeft");
        const focused = await page.evaluate(() => {
          const el = document.activeElement!;
          return { text: el.textContent, outline: getComputedStyle(el).outlineStyle };
        });
        assert.equal(focused.text, "LangChain", "arrow keys move between tabs");
        assert.equal(focused.outline, "solid", "focus ring");
        // Code is readable and the copy button sits above it, not over it.
        await page.setViewportSize(PHONE);
        const pre = page.locator("#snippet-panel pre").first();
        assert.ok(parseFloat(await pre.evaluate((e) => getComputedStyle(e).fontSize)) >= 13);
        const button = await page.getByRole("button", { name: /^Copy LangChain/ })
          .boundingBox();
        const preBox = await pre.boundingBox();
        assert.ok(
          button && preBox && button.y + button.height <= preBox.y + 1,
          "button above code",
        );
        await page.setViewportSize(DESKTOP);
        await page.getByRole("button", { name: "Hide" }).click();
        await inspect(page, dir, "dashboard-new", shots);
        assert.deepEqual(w.errors, []);
        await w.context.close();
      },
    );

    await t.step(
      "returning user: usage first, set-up folded, chart readable on a phone",
      async () => {
        const { w, userId, token } = await signedIn(browser, server, "back@example.com");
        await keyOf(server, token);
        await seedUsage(server, userId);
        const page = await openDashboard(w, server);
        assert.equal((await stateOf(page)).status, "active");
        assert.equal(await page.getByTestId("setup").getAttribute("open"), null, "folded");
        const order = await page.evaluate(() => {
          const y = (sel: string) => document.querySelector(sel)!.getBoundingClientRect().top;
          return {
            state: y("[data-testid=account-state]"),
            usage: y("#usage-title"),
            setup: y("[data-testid=setup]"),
          };
        });
        assert.ok(order.state < order.usage && order.usage < order.setup, JSON.stringify(order));
        const requests = Number(
          (await page.getByTestId("usage-requests").innerText()).replace(/,/g, ""),
        );
        assert.ok(requests > 100, `${requests}`);
        // Tokens are full numbers, like requests (no "16.3K" beside "3,977").
        assert.match(await page.getByTestId("usage-tokens").innerText(), /^\d{1,3}(,\d{3})+$/);
        assert.match(await page.getByTestId("usage-cost").innerText(), /^\$\d+\.\d{2}$/);
        await page.setViewportSize(PHONE);
        const sizes = await page.locator(".dc-axis span, .dc-x span, .dc-readout").evaluateAll((
          els,
        ) => els.map((e) => parseFloat(getComputedStyle(e).fontSize)));
        assert.ok(sizes.length >= 7 && sizes.every((s) => s >= 11), `label sizes ${sizes}`);
        // Tapping a bar says that day's values.
        const bars = page.getByTestId("usage-chart").locator(".dc-bar");
        assert.equal(await bars.count(), 30);
        await bars.nth(28).tap().catch(async () => await bars.nth(28).click());
        const yesterday = new Date(Date.now() - DAY);
        const day = yesterday.toLocaleDateString("en-US", {
          month: "short",
          day: "numeric",
          timeZone: "UTC",
        });
        await page.locator(".dc-readout").filter({ hasText: `${day}:` }).waitFor();
        assert.match(
          await page.locator(".dc-readout").innerText(),
          /requests · [\d,]+ tokens · \$/,
        );
        await page.setViewportSize(DESKTOP);
        // Counts get whole-number ticks, and the middle gridline (at 50%) reads exactly half.
        const ticks = await axisOf(page, "usage-chart");
        assert.ok(ticks.every((t) => /^\d[\d,]*$/.test(t)), `integer ticks ${ticks}`);
        assert.equal(count(ticks[1]) * 2, count(ticks[0]), `${ticks}`);
        assert.equal(ticks[2], "0");
        const tallest = Math.max(
          ...(await page.getByTestId("usage-chart").locator(".dc-bar").evaluateAll((els) =>
            els.map((e) =>
              Number(/: ([\d,]+) requests/.exec(e.ariaLabel ?? "")?.[1]?.replace(/,/g, ""))
            )
          )),
        );
        assert.ok(count(ticks[0]) >= tallest, `${ticks} vs ${tallest}`);
        // The chart switches between requests, tokens and cost.
        const readout = page.locator(".dc-readout");
        await page.getByRole("button", { name: "Tokens", exact: true }).click();
        await readout.filter({
          hasText: /^[A-Z][a-z]{2} \d+: [\d,]+ tokens · [\d,]+ requests · \$/,
        })
          .waitFor();
        const tokenTicks = await axisOf(page, "usage-chart");
        assert.ok(tokenTicks.every((t) => /^\d[\d,.]*K?$/.test(t)), `${tokenTicks}`);
        await page.getByRole("button", { name: "Cost", exact: true }).click();
        await readout.filter({ hasText: /: \$[\d.]+ · [\d,]+ requests · [\d,]+ tokens/ }).waitFor();
        const costTicks = await axisOf(page, "usage-chart");
        assert.ok(costTicks.every((t) => /^\$\d/.test(t)), `${costTicks}`);
        assert.ok(Math.abs(count(costTicks[1]) * 2 - count(costTicks[0])) < 1e-9, `${costTicks}`);
        assert.equal(
          await page.getByRole("button", { name: "Cost", exact: true }).getAttribute(
            "aria-pressed",
          ),
          "true",
        );
        await inspect(page, dir, "dashboard-returning-cost", shots);
        await page.getByRole("button", { name: "Requests", exact: true }).click();
        await inspect(page, dir, "dashboard-returning", shots);
        await page.getByText("Your API key and set-up").click();
        await page.getByRole("button", { name: "Reveal" }).waitFor();
        assert.deepEqual(w.errors, []);
        await w.context.close();
      },
    );

    const pausedBy = [
      ["requests_per_day", { rpd: 2 }, /today's requests are used up/],
      ["tokens_per_day", { tokensPerDay: 36 }, /today's token quota is used up/],
      ["budget_monthly", { budgetUsdMonthly: 0.000044 }, /this month's budget is spent/],
    ] as const;
    for (const [reason, limits, words] of pausedBy) {
      await t.step(`paused by ${reason}: says so at the top, with when it resets`, async () => {
        const { w, userId, token } = await signedIn(browser, server, `${reason}@example.com`);
        const apiKey = await keyOf(server, token);
        await server.services.users.setLimits(userId, limits);
        const page = await openDashboard(w, server);
        assert.equal((await stateOf(page)).status, "active");
        assert.equal(await spendUntilRefused(server, apiKey), 403);
        // Coming back to the tab (from the editor) refreshes the state.
        await page.evaluate(() => document.dispatchEvent(new Event("visibilitychange")));
        await page.locator("[data-testid=account-state][data-status=paused]").waitFor();
        const state = await stateOf(page);
        assert.equal(state.status, "paused");
        assert.match(state.text, /Paused until/);
        assert.match(state.text, words);
        const until = reason === "budget_monthly"
          ? /00:00 UTC.*1st of the month/s
          : /00:00 UTC.*Daily limits reset at 00:00 UTC/s;
        assert.match(state.text, until);
        // A handful of requests: 0/1/2, never a "3" gridline standing at 2.5.
        const small = await axisOf(page, "usage-chart");
        assert.ok(small.every((t) => /^\d+$/.test(t)), `integer ticks ${small}`);
        assert.equal(count(small[1]) * 2, count(small[0]), `${small}`);
        // It is the first thing on a phone, not three screens down.
        await page.setViewportSize(PHONE);
        const box = await page.getByTestId("account-state").boundingBox();
        assert.ok(box && box.y + box.height < PHONE.height, "state within the first screen");
        await page.setViewportSize(DESKTOP);
        await inspect(page, dir, `dashboard-paused-${reason}`, shots);
        assert.deepEqual(w.errors, []);
        await w.context.close();
      });
    }

    await t.step("disabled by the operator: the page says the key will not work", async () => {
      const { w, userId, token } = await signedIn(browser, server, "off@example.com");
      const apiKey = await keyOf(server, token);
      const op = await server.services.sessions.issueLocal(OPERATOR);
      const res = await fetch(`${server.url}/api/admin/users/${userId}/disable`, {
        method: "POST",
        headers: { authorization: `Bearer ${op.token}` },
      });
      assert.equal(res.status, 200);
      await res.body?.cancel();
      assert.equal(await spendUntilRefused(server, apiKey), 403);
      const page = await openDashboard(w, server);
      const state = await stateOf(page);
      assert.equal(state.status, "disabled");
      assert.match(state.text, /Your key does not work/);
      // The meters are off: grey, no bars, nothing "left" beside a banner that refuses everything.
      const today = page.locator("section[aria-labelledby=today-title]");
      assert.equal(await today.locator(".meter-off").count(), 3);
      assert.equal(await today.getByRole("progressbar").count(), 0);
      assert.doesNotMatch(await today.innerText(), /\bleft\b|Unlimited|per minute|a minute/);
      assert.match(await page.getByTestId("limits-off").innerText(), /No requests are served/);
      // The set-up is folded away and offers no snippets with a key that would not work.
      assert.equal(await page.getByTestId("setup").getAttribute("open"), null);
      assert.equal(await page.getByRole("tab").count(), 0);
      assert.ok(!(await page.content()).includes(apiKey), "no working-looking key");
      await inspect(page, dir, "dashboard-disabled", shots);
      // Opened, it says why and shows no key field and no controls that cannot work.
      await page.getByText("Your API key and set-up").click();
      const setup = page.getByTestId("setup");
      assert.match(await setup.getByTestId("key-error").innerText(), /Your key is not shown/);
      assert.equal(await page.getByTestId("api-key").count(), 0);
      for (const name of [/Reveal/, /Copy/, /Rotate/, /Hide/]) {
        assert.equal(await setup.getByRole("button", { name }).count(), 0, `${name}`);
      }
      assert.equal(await setup.locator("button:disabled").count(), 0, "no faded controls");
      await inspect(page, dir, "dashboard-disabled-open", shots);
      // The island's POST /api/key was refused with 403 on purpose.
      assert.deepEqual(w.errors.filter((e) => !/status of 403/.test(e)), []);
      await w.context.close();
    });

    await t.step(
      "operator: cards on a phone, overrides, confirmation, never yourself",
      async () => {
        const { w, userId: selfId, token } = await signedIn(browser, server, OPERATOR);
        const operatorKey = await keyOf(server, token);
        // The Upstream card: one answer streaming (1 of 2 slots), and an alert on record.
        fake.mode = "sse";
        fake.holdAfterFirstChunk = true;
        const streaming = await fetch(`${server.url}/v1/chat/completions`, {
          method: "POST",
          headers: { authorization: `Bearer ${operatorKey}`, "content-type": "application/json" },
          body: JSON.stringify({
            model: "glm-4.6",
            stream: true,
            messages: [{ role: "user", content: "hi" }],
          }),
        });
        assert.equal(streaming.status, 200);
        await server.services.events.alert("upstream.balance_exhausted", {
          model: "glm-4.6",
          status: 429,
          upstreamCode: "1113",
          upstreamMessage: "您的账户已欠费,请充值后重试",
        });
        const page = await w.newPage();
        assert.equal((await page.goto(`${server.url}/admin`))?.status(), 200);
        const upstream = page.getByTestId("upstream-health");
        assert.match(await upstream.innerText(), /glm-4\.6\s+1 of 2\s+0/);
        // The waits (a few ms at most here: nothing queued) and how many requests they cover.
        assert.match(
          await upstream.getByTestId("queue-wait").innerText(),
          /p50 ≤ \d+ ms, p99 ≤ \d+ m?s \([1-9]\d* requests?\)/,
        );
        assert.match(
          await upstream.getByTestId("recent-alerts").innerText(),
          /upstream\.balance_exhausted/,
        );
        const backId = await localUserId("back@example.com");
        const row = page.locator(`tr[data-user-id="${backId}"]`);
        await row.waitFor({ timeout: 10_000 });
        // Overrides set earlier are visible in the list.
        const rpdRow = page.locator(
          `tr[data-user-id="${await localUserId("requests_per_day@example.com")}"]`,
        );
        assert.match(await rpdRow.getByTestId("user-limits").innerText(), /Requests \/ day: 2/);
        assert.match(await row.getByTestId("user-limits").innerText(), /Defaults/);
        assert.notEqual(await row.getByTestId("user-last-active").innerText(), "None");
        for (const column of ["Created", "Last active"]) {
          await page.getByRole("columnheader", { name: column }).waitFor();
        }
        // Your own row: Disable is not offered, and the server refuses it too.
        const mine = page.locator(`tr[data-user-id="${selfId}"]`);
        assert.ok(await mine.getByRole("button", { name: /Disable/ }).isDisabled());
        const self = await fetch(`${server.url}/api/admin/users/${selfId}/disable`, {
          method: "POST",
          headers: { authorization: `Bearer ${token}` },
        });
        assert.equal(self.status, 403);
        assert.match((await self.json()).error.message, /your own account/);
        // Disable asks first; Cancel leaves the user alone.
        await row.getByRole("button", { name: /^Disable/ }).click();
        await row.getByRole("button", { name: "Cancel" }).click();
        assert.equal((await server.services.users.get(backId))?.status, "active");
        await inspect(page, dir, "admin", shots);
        fake.release();
        await streaming.text();
        fake.holdAfterFirstChunk = false;
        fake.mode = "json";
        // Phone: one card per user, no sideways scrolling.
        await page.setViewportSize(PHONE);
        assert.equal(await page.locator(".users-table thead").isVisible(), false);
        const overflow = await page.evaluate(() =>
          document.documentElement.scrollWidth - document.documentElement.clientWidth
        );
        assert.ok(overflow <= 0, `page scrolls sideways by ${overflow}px`);
        await row.getByRole("button", { name: /^Limits/ }).click();
        const form = page.locator(".limits-form");
        const formBox = await form.boundingBox();
        assert.ok(
          formBox && formBox.x >= 0 && formBox.x + formBox.width <= PHONE.width,
          "form fits",
        );
        await page.setViewportSize(DESKTOP);
        await row.getByRole("button", { name: /^Limits/ }).click();
        await row.getByRole("button", { name: /^Disable/ }).click();
        await row.getByRole("button", { name: "Yes, disable" }).click();
        await row.getByTestId("user-status").filter({ hasText: "disabled" }).waitFor();
        assert.equal((await server.services.users.get(backId))?.status, "disabled");
        await row.getByRole("button", { name: /^Enable/ }).click();
        await row.getByTestId("user-status").filter({ hasText: "active" }).waitFor();
        assert.deepEqual(w.errors, []);
        await w.context.close();
      },
    );

    await t.step("operator: a per-user page with chart, models, key prefix, limits", async () => {
      const { w } = await signedIn(browser, server, OPERATOR);
      const page = await w.newPage();
      const backId = await localUserId("back@example.com");
      await server.services.users.setLimits(backId, { tokensPerDay: 500_000 });
      await page.goto(`${server.url}/admin`);
      await page.getByRole("link", { name: "back@example.com" }).click();
      await page.waitForURL(`${server.url}/admin/users/${backId}`);
      await page.getByRole("heading", { name: "back@example.com" }).waitFor();
      const profile = await page.getByTestId("user-profile").innerText();
      assert.match(profile, /kw_[A-Za-z0-9_-]{4}…/);
      assert.match(await page.getByTestId("user-state").innerText(), /active/);
      assert.equal(await page.getByTestId("user-chart").locator(".dc-bar").count(), 30);
      const models = await page.getByTestId("user-models").innerText();
      assert.match(models, /glm-4\.6/);
      assert.match(models, /glm-4\.5-air/);
      const limits = await page.getByTestId("effective-limits").innerText();
      assert.match(limits, /500,000 \/ day/);
      assert.match(limits, /Unlimited \/ month/);
      assert.match(await page.getByTestId("overrides").innerText(), /Tokens \/ day: 500,000/);
      await inspect(page, dir, "admin-user", shots);
      // Saving an override updates what the page shows.
      await page.getByLabel("Requests / day").fill("42");
      await page.getByRole("button", { name: "Save" }).click();
      await page.getByText("Limits saved for back@example.com.").waitFor();
      assert.match(await page.getByTestId("overrides").innerText(), /Requests \/ day: 42/);
      assert.equal((await server.services.users.get(backId))?.limits.rpd, 42);
      const missing = await page.goto(`${server.url}/admin/users/user_nobody`);
      assert.equal(missing?.status(), 404);
      await page.getByRole("heading", { name: "No such user" }).waitFor();
      assert.deepEqual(w.errors.filter((e) => !e.includes("404")), []);
      await w.context.close();
    });

    await t.step("phone: big figures are never cut, ids never broken", async () => {
      const { w, userId, token } = await signedIn(browser, server, "big@example.com");
      await keyOf(server, token);
      const { kv, config } = server.services;
      for (
        const [model, requests] of [["glm-4.6", 5_817_924], ["glm-4.5-air", 1_204_311]] as const
      ) {
        await recordUsage(kv, config.pricing, {
          userId,
          model,
          promptTokens: 900 * requests,
          completionTokens: 400 * requests,
          at: Date.now() - DAY,
          requests,
        });
      }
      /** Fails when a figure in `selector` is wider than its box, or sticks out of `within`. */
      const assertUncut = async (page: Page, selector: string, within: string) => {
        const cut = await page.evaluate(([selector, within]) => {
          const box = document.querySelector(within)!.getBoundingClientRect();
          return [...document.querySelectorAll(selector)].flatMap((e) => {
            const r = e.getBoundingClientRect();
            const out = e.scrollWidth > e.clientWidth || r.left < box.left - 0.5 ||
              r.right > box.right + 0.5;
            return out ? [`${e.textContent} (${e.scrollWidth} > ${e.clientWidth})`] : [];
          });
        }, [selector, within]);
        assert.deepEqual(cut, [], `${selector} cut at 390 px`);
      };
      const page = await openDashboard(w, server);
      await page.setViewportSize(PHONE);
      const table = page.getByTestId("by-model");
      await assertUncut(
        page,
        "[data-testid=by-model] td, [data-testid=by-model] td *",
        ".model-wrap",
      );
      await assertUncut(page, ".stats .stat, .stats .value", "[aria-labelledby=usage-title]");
      // The model id sits on one line, the money in full.
      for (const code of await table.locator("code").all()) {
        const box = await code.boundingBox();
        assert.ok(box && box.height < 30, `${await code.innerText()} on one line`);
      }
      for (const cost of await table.getByTestId("model-cost").allInnerTexts()) {
        assert.match(cost, /^\$\d{1,3}(,\d{3})*\.\d{2}$/);
      }
      assert.match(await table.innerText(), /5,817,924/);
      await page.setViewportSize(DESKTOP);
      await inspect(page, dir, "dashboard-big", shots);
      await w.context.close();

      const op = await signedIn(browser, server, OPERATOR);
      const admin = await op.w.newPage();
      await admin.goto(`${server.url}/admin`);
      await admin.setViewportSize(PHONE);
      await assertUncut(admin, ".stat-cards .stat, .stat-cards .value", ".stat-cards");
      assert.match(await admin.locator(".stat-cards").innerText(), /7,0\d\d,\d{3}/);
      await admin.setViewportSize(DESKTOP);
      await inspect(admin, dir, "admin-big", shots);
      await admin.goto(`${server.url}/admin/users/${userId}`);
      await admin.setViewportSize(PHONE);
      await assertUncut(
        admin,
        "[data-testid=user-models] td, [data-testid=user-models] td *",
        ".model-wrap",
      );
      await admin.setViewportSize(DESKTOP);
      await inspect(admin, dir, "admin-user-big", shots);
      assert.deepEqual([...w.errors, ...op.w.errors], []);
      await op.w.context.close();
    });
  } finally {
    await browser.close();
    await server.close();
    await fake.close();
    await folder.done(shots);
  }
});

Deno.test("pages: no GLM_API_KEY → a notice for operators on /admin", async () => {
  const browser = await launchBrowser();
  const server = await startServer({
    GLM_API_KEY: "",
    ADMIN_USER_IDS: await localUserId(OPERATOR),
  });
  try {
    const { w } = await signedIn(browser, server, OPERATOR);
    const page = await w.newPage();
    await page.goto(`${server.url}/admin`);
    assert.match(
      await page.getByTestId("notice-no-glm-key").innerText(),
      /GLM_API_KEY is not set.*503 not_configured/s,
    );
    await assertAccessible(page, "admin without GLM_API_KEY");
    assert.deepEqual(w.errors, []);
    await w.context.close();
  } finally {
    await browser.close();
    await server.close();
  }
});
