/**
 * The request log in the browser: the dashboard's last requests, the operator's per-user page,
 * and /admin/requests with its filters and pages — audited with axe-core and photographed at
 * desktop and phone widths, light and dark.
 */
import assert from "node:assert/strict";
import { localUserId } from "../../../lib/identity/sessions.ts";
import {
  inspect,
  launchBrowser,
  shotsFolder,
  signedIn,
  startServer,
} from "../../support/browser.ts";
import { FakeGlm } from "../../../testing/fakes/glm.ts";

const OPERATOR = "op@example.com";
const USER = "ada@example.com";

Deno.test("request log pages: the dashboard's last requests, the operator's user page, /admin/requests filtered and paged", async (t) => {
  const fake = new FakeGlm();
  const server = await startServer({
    GLM_BASE_URL: fake.baseUrl,
    ADMIN_USER_IDS: await localUserId(OPERATOR),
  });
  const browser = await launchBrowser();
  const { dir, done } = await shotsFolder();
  const shots: string[] = [];
  try {
    const ada = await signedIn(browser, server, USER);
    const key = await fetch(`${server.url}/api/key`, {
      method: "POST",
      headers: { authorization: `Bearer ${ada.token}` },
    }).then((r) => r.json()).then((b) => String(b.apiKey));
    const send = async (
      body: Record<string, unknown>,
      path = "/v1/chat/completions",
      apiKey = key,
    ) => {
      const res = await fetch(`${server.url}${path}`, {
        method: "POST",
        headers: {
          authorization: `Bearer ${apiKey}`,
          "content-type": "application/json",
          "user-agent": "claude-cli/2.1.3 (external, cli)",
        },
        body: JSON.stringify(body),
      });
      await res.text();
      return res.status;
    };
    const chat = { model: "glm-4.6", messages: [{ role: "user", content: "hi" }] };
    for (let i = 0; i < 8; i++) assert.equal(await send(chat), 200);
    fake.mode = "sse";
    assert.equal(await send({ ...chat, stream: true }), 200);
    fake.mode = "json";
    assert.equal(
      await send({
        model: "claude-sonnet-4-5",
        max_tokens: 64,
        messages: [{ role: "user", content: "hi" }],
      }, "/v1/messages"),
      200,
    );
    fake.mode = "error500";
    assert.equal(await send(chat), 500);
    fake.mode = "json";
    // A connected app's key: its requests are listed under the app's name.
    const app = await server.services.users.createAppKey(
      ada.userId,
      { name: "Zed editor", flow: "device" },
      20,
    );
    assert.equal(await send(chat, undefined, app.apiKey), 200);
    for (let i = 0; i < 2; i++) assert.equal(await send({ ...chat, model: "gpt-9" }), 400);
    // Refusals are written within a second.
    await new Promise((r) => setTimeout(r, 1300));

    await t.step("the dashboard lists the user's last requests", async () => {
      const page = await ada.w.newPage();
      assert.equal((await page.goto(`${server.url}/dashboard`))?.status(), 200);
      const table = page.getByTestId("recent-requests");
      const rows = table.getByTestId("request-row");
      assert.equal(await rows.count(), 10, "the last ten: newest first");
      const text = await table.innerText();
      assert.match(text, /asked as\s+claude-sonnet-4-5/);
      assert.match(text, /chat · Zed editor · claude-cli/);
      assert.match(text, /500/);
      assert.match(text, /claude-cli\/2\.1\.3/);
      assert.ok(!(await page.content()).includes(key), "the key is not in the page's log");
      await inspect(page, dir, "dashboard-requests", shots);
      await page.close();
    });

    const op = await signedIn(browser, server, OPERATOR);
    await t.step("the operator's page of the user lists theirs", async () => {
      const page = await op.w.newPage();
      assert.equal((await page.goto(`${server.url}/admin/users/${ada.userId}`))?.status(), 200);
      assert.equal(await page.getByTestId("user-requests").getByTestId("request-row").count(), 13);
      await inspect(page, dir, "admin-user-requests", shots);
      await page.close();
    });

    await t.step("/admin/requests: filters and a second page", async () => {
      const page = await op.w.newPage();
      assert.equal((await page.goto(`${server.url}/admin/requests?limit=5`))?.status(), 200);
      const rows = page.getByTestId("request-log").getByTestId("request-row");
      assert.equal(await rows.count(), 5);
      assert.match(await rows.first().innerText(), /ada@example\.com/, "users by e-mail");
      const first = await rows.first().innerText();
      await inspect(page, dir, "admin-requests", shots);
      await page.getByRole("link", { name: "Next page" }).click();
      await page.waitForURL(/cursor=/);
      assert.equal(await rows.count(), 5);
      assert.notEqual(await rows.first().innerText(), first, "another page");
      await page.getByRole("link", { name: "First page" }).click();
      await page.waitForURL((url) => !url.search.includes("cursor="));

      await page.getByLabel("Status").fill("400");
      await page.getByLabel("User id").fill(ada.userId);
      await page.getByRole("button", { name: "Show" }).click();
      await page.waitForURL(/status=400/);
      assert.equal(await rows.count(), 1);
      assert.match(await rows.first().innerText(), /model_not_allowed/);
      assert.match(await rows.first().innerText(), /2 times that minute/);
      await page.getByLabel("Status").fill("");
      await page.getByLabel("Model").fill("glm-5.1");
      await page.getByRole("button", { name: "Show" }).click();
      await page.waitForURL(/model=glm-5\.1/);
      assert.equal(await rows.count(), 1);
      const today = new Date().toISOString().slice(0, 10);
      await page.getByLabel("Model").fill("");
      await page.getByLabel("From (UTC)").fill(today);
      await page.getByLabel("To (UTC, included)").fill(today);
      await page.getByRole("button", { name: "Show" }).click();
      await page.waitForURL(/from=/);
      assert.equal(await rows.count(), 13);
      await inspect(page, dir, "admin-requests-filtered", shots);

      const bad = await page.goto(`${server.url}/admin/requests?status=abc`);
      assert.equal(bad?.status(), 400);
      assert.match(await page.getByTestId("filter-problem").innerText(), /^status: /);
      assert.equal(await page.getByLabel("Status").getAttribute("aria-invalid"), "true");
      await inspect(page, dir, "admin-requests-bad-filter", shots);
      await page.close();
    });

    await t.step("a user who is not an operator gets 403", async () => {
      const page = await ada.w.newPage();
      assert.equal((await page.goto(`${server.url}/admin/requests`))?.status(), 403);
      await page.close();
    });
    // The only console errors are the browser's notes of the two refusals asked for above.
    const refused = (status: number) =>
      new RegExp(`status of ${status} .*/admin/requests(\\?status=abc)?\\)$`);
    assert.deepEqual(ada.w.errors.filter((e) => !refused(403).test(e)), []);
    assert.deepEqual(op.w.errors.filter((e) => !refused(400).test(e)), []);
    await ada.w.context.close();
    await op.w.context.close();
  } finally {
    await done(shots);
    await browser.close();
    await server.close();
    await fake.close();
  }
});
