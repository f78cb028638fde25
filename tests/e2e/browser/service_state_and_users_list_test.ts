/**
 * Pages that tell the truth: the dashboard says "not your key: the service is unavailable" when
 * nothing can work (no GLM_API_KEY; GLM refusing every pool key), /admin opens on a banner for
 * the account-wide outage (since when, requests refused), and the operator's users list shows
 * paused users as paused, searches, filters and pages — audited with axe-core and photographed at
 * desktop and phone widths, light and dark.
 */
import assert from "node:assert/strict";
import { localUserId } from "../../../lib/identity/sessions.ts";
import { recordUsage } from "../../../lib/usage/usage.ts";
import {
  DESKTOP,
  inspect,
  launchBrowser,
  shotsFolder,
  signedIn,
  startServer,
} from "../../support/browser.ts";
import { FakeGlm } from "../../../testing/fakes/glm.ts";

const OPERATOR = "op@example.com";
const USER = "ada@example.com";
const POOL_KEY = "glm-pool-SECRET-only-0123456789.cccc";

Deno.test("dashboard: no GLM_API_KEY is the service's problem, not the user's key", async () => {
  const browser = await launchBrowser();
  const server = await startServer({ GLM_API_KEY: "" });
  const { dir, done } = await shotsFolder();
  const shots: string[] = [];
  try {
    const { w } = await signedIn(browser, server, USER);
    const page = await w.newPage();
    assert.equal((await page.goto(`${server.url}/dashboard`))?.status(), 200);
    const state = page.getByTestId("account-state");
    // Server-rendered with the page, and still so once the island has loaded the key.
    assert.equal(await state.getAttribute("data-status"), "service-unavailable");
    await page.waitForLoadState("networkidle");
    assert.equal(await state.getAttribute("data-status"), "service-unavailable");
    const text = await state.innerText();
    assert.match(text, /Not your key: the service is unavailable/);
    assert.match(text, /503 not_configured/);
    assert.doesNotMatch(text, /Your key works/);
    await inspect(page, dir, "dashboard-not-configured", shots);
    assert.deepEqual(w.errors, []);
    await w.context.close();
  } finally {
    await done(shots);
    await browser.close();
    await server.close();
  }
});

Deno.test("GLM refuses the only key: the dashboard and /admin say so; the users list scales", async (t) => {
  const fake = new FakeGlm();
  const server = await startServer({
    GLM_BASE_URL: fake.baseUrl,
    GLM_API_KEY: POOL_KEY,
    ADMIN_USER_IDS: await localUserId(OPERATOR),
  });
  const browser = await launchBrowser();
  const { dir, done } = await shotsFolder();
  const shots: string[] = [];
  try {
    const user = await signedIn(browser, server, USER);
    const key = await fetch(`${server.url}/api/key`, {
      method: "POST",
      headers: { authorization: `Bearer ${user.token}` },
    }).then((r) => r.json()).then((b) => String(b.apiKey));
    const chat = async () => {
      const res = await fetch(`${server.url}/v1/chat/completions`, {
        method: "POST",
        headers: { authorization: `Bearer ${key}`, "content-type": "application/json" },
        body: JSON.stringify({ model: "glm-4.6", messages: [{ role: "user", content: "hi" }] }),
      });
      await res.body?.cancel();
      return res.status;
    };

    await t.step("before: the dashboard says Active", async () => {
      assert.equal(await chat(), 200);
      const page = await user.w.newPage();
      await page.goto(`${server.url}/dashboard`);
      assert.equal(await page.getByTestId("account-state").getAttribute("data-status"), "active");
      await page.close();
    });

    await t.step("the balance is spent: every request 503, the dashboard says why", async () => {
      fake.refusedKeys.set(POOL_KEY, "balance");
      for (let i = 0; i < 3; i++) assert.equal(await chat(), 503);
      const page = await user.w.newPage();
      await page.goto(`${server.url}/dashboard`);
      const state = page.getByTestId("account-state");
      assert.equal(await state.getAttribute("data-status"), "service-unavailable");
      const text = await state.innerText();
      assert.match(text, /Not your key: the service is unavailable/);
      assert.match(text, /GLM account is refusing requests/);
      assert.match(text, /Since \w{3} \d+, \d{4}/);
      assert.ok(!(await page.content()).includes(POOL_KEY));
      await inspect(page, dir, "dashboard-key-refused", shots);
      await page.close();
      // The answer the island reads: the service's state, and nothing of the key.
      const usage = await fetch(`${server.url}/api/usage`, {
        headers: { authorization: `Bearer ${key}` },
      }).then((r) => r.json());
      assert.equal(usage.service.status, "unavailable");
      assert.equal(usage.service.reason, "no_key_in_service");
      assert.ok(Date.parse(usage.service.since) <= Date.now());
    });

    const operator = await signedIn(browser, server, OPERATOR);
    await t.step("/admin opens on the outage: since when, and the refused count", async () => {
      const page = await operator.w.newPage();
      assert.equal((await page.goto(`${server.url}/admin`))?.status(), 200);
      const banner = page.getByTestId("outage-banner");
      const text = await banner.innerText();
      assert.match(text, /GLM balance exhausted: the service is down for every user/);
      assert.equal(await page.getByTestId("outage-refused").innerText(), "3 requests");
      assert.match(await page.getByTestId("outage-since").innerText(), /\w{3} \d+, \d{4}/);
      assert.match(text, /…cccc: balance exhausted/);
      assert.ok(!(await page.content()).includes(POOL_KEY), "the page holds the pool key");
      // The banner comes before everything else on the page.
      const first = await page.locator("main > *").first().getAttribute("data-testid");
      assert.equal(first, "outage-banner");
      await page.getByTestId("users-table").locator("tr.user-row").first().waitFor();
      await inspect(page, dir, "admin-outage", shots);
      await page.close();
    });

    await t.step("the users list: paused as paused, search, status filter, pages", async (s) => {
      const { users, config } = server.services;
      const now = Date.now();
      // 40 users with long addresses (and Ada, who spent a little): user i spent i × $0.60; two
      // of them paused, one disabled.
      for (let i = 1; i <= 40; i++) {
        const id = `user_list_${String(i).padStart(2, "0")}`;
        await users.provision(id, {
          email: `a.rather.long.name.for.person-${i}@subdomain.example-company.org`,
          firstName: null,
          lastName: null,
        });
        await recordUsage(server.services.kv, config.pricing, {
          userId: id,
          model: "glm-4.6",
          promptTokens: i * 1_000_000,
          completionTokens: 0,
          at: now,
        });
      }
      await users.setLimits("user_list_07", { tokensPerDay: 1_000 });
      await users.setLimits("user_list_33", { budgetUsdMonthly: 5 });
      await users.setStatus("user_list_20", "disabled", null);

      const page = await operator.w.newPage();
      await page.goto(`${server.url}/admin`);
      const rows = page.locator("tr.user-row");
      const range = page.getByTestId("users-range");
      await range.filter({ hasText: /^1–25 of 41 users/ }).waitFor();
      assert.equal(await rows.count(), 25);
      assert.equal(await rows.first().getAttribute("data-user-id"), "user_list_40");
      // One line per user on a wide screen: every row as tall as the first, and short.
      const heights = await rows.evaluateAll((trs) =>
        trs.map((tr) => tr.getBoundingClientRect().height)
      );
      assert.ok(Math.max(...heights) <= 56, `row heights ${heights.join(", ")}`);
      const paused = page.locator('tr[data-user-id="user_list_33"]').getByTestId("user-status");
      assert.match(await paused.innerText(), /^paused\s*· budget$/);
      await inspect(page, dir, "admin-users-page-1", shots);

      await s.step("a second page", async () => {
        await page.getByTestId("users-next").click();
        await range.filter({ hasText: /^26–41 of 41 users/ }).waitFor();
        assert.equal(await rows.count(), 16);
        assert.equal(await rows.first().getAttribute("data-user-id"), "user_list_15");
        assert.ok(await page.getByTestId("users-next").isDisabled());
        const tokens = page.locator('tr[data-user-id="user_list_07"]').getByTestId("user-status");
        assert.match(await tokens.innerText(), /^paused\s*· tokens$/);
        await inspect(page, dir, "admin-users-page-2", shots);
        await page.getByTestId("users-prev").click();
        await range.filter({ hasText: /^1–25 of 41 users/ }).waitFor();
      });

      await s.step("the paused filter", async () => {
        await page.getByLabel("Status").selectOption("paused");
        await range.filter({ hasText: /^2 users ·/ }).waitFor();
        assert.deepEqual(await rows.evaluateAll((trs) => trs.map((tr) => tr.dataset.userId)), [
          "user_list_33",
          "user_list_07",
        ]);
        assert.equal(await page.getByTestId("users-next").count(), 0, "one page: no pager");
        await inspect(page, dir, "admin-users-paused", shots);
        await page.getByLabel("Status").selectOption("");
      });

      await s.step("search by e-mail, then by id", async () => {
        await page.getByLabel("Search e-mail or user id").fill("PERSON-3");
        await range.filter({ hasText: /^11 users ·/ }).waitFor();
        assert.equal(await rows.first().getAttribute("data-user-id"), "user_list_39");
        await inspect(page, dir, "admin-users-search", shots);
        await page.getByLabel("Search e-mail or user id").fill("user_list_2");
        await range.filter({ hasText: /^10 users ·/ }).waitFor();
        await page.getByLabel("Search e-mail or user id").fill("nobody at all");
        await page.getByTestId("users-empty").filter({ hasText: "No user matches." }).waitFor();
      });
      await page.setViewportSize(DESKTOP);
      await page.close();
    });
    assert.deepEqual(user.w.errors, []);
    assert.deepEqual(operator.w.errors, []);
    await user.w.context.close();
    await operator.w.context.close();
  } finally {
    await done(shots);
    await browser.close();
    await server.close();
    await fake.close();
  }
});
