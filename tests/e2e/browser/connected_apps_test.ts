/**
 * Connected apps in a real browser (Debian Chromium) against a real Keyway server: a signed-out
 * person who opens a connect link signs up from there and comes back to the approval with the
 * client named; the device page shows how long ago the request was made, that the client named
 * itself and the requesting address; the dashboard lists the apps with their usage and revokes
 * one behind a confirmation. axe-core and screenshots at desktop and phone, light and dark.
 */
import assert from "node:assert/strict";
import { randomToken } from "../../../lib/core/encoding.ts";
import { s256 } from "../../../lib/identity/connect.ts";
import { createApp } from "../../../routes/mod.ts";
import {
  DESKTOP,
  inspect,
  launchBrowser,
  shotsFolder,
  signedIn,
  startServer,
  watchedContext,
} from "../../support/browser.ts";
import { FakeGlm } from "../../../testing/fakes/glm.ts";

Deno.test("browser: connected apps — sign up from a connect link, the device page, the dashboard", async (t) => {
  const glm = new FakeGlm();
  const server = await startServer({ GLM_BASE_URL: glm.baseUrl });
  // A second listener on both stacks, so a device start has a real client address.
  const dual = Deno.serve(
    { hostname: "::", port: 0, onListen: () => {} },
    createApp(server.services).fetch,
  );
  const browser = await launchBrowser();
  const shots = await shotsFolder();
  const taken: string[] = [];
  const w = await watchedContext(browser, { viewport: DESKTOP });
  try {
    const page = await w.newPage();

    await t.step(
      "signed out → /connect → sign up → back on the approval, client named",
      async () => {
        const connect = `${server.url}/connect?${new URLSearchParams({
          client: "Keyway for Zed",
          redirect_uri: "http://127.0.0.1:53999/callback",
          code_challenge: await s256(randomToken(48)),
          code_challenge_method: "S256",
          state: "st",
        })}`;
        await page.goto(connect);
        assert.equal(new URL(page.url()).pathname, "/sign-in");
        assert.match(
          await page.getByTestId("auth-connecting").innerText(),
          /Sign in to connect Keyway for Zed to Keyway/,
        );
        await inspect(page, shots.dir, "connect-sign-in", taken);
        // "Create an account" keeps the way back; so does the header's "Sign up".
        const header = page.getByRole("banner").getByRole("link", { name: "Sign up" });
        assert.match((await header.getAttribute("href"))!, /^\/sign-up\?redirect=%2Fconnect%3F/);
        await page.getByRole("link", { name: "Create an account" }).click();
        await page.waitForURL((u) => u.pathname === "/sign-up");
        assert.match(
          await page.getByTestId("auth-connecting").innerText(),
          /Create an account to connect Keyway for Zed/,
        );
        await inspect(page, shots.dir, "connect-sign-up", taken);
        await page.getByLabel("E-mail address").fill("newcomer@example.com");
        await Promise.all([
          page.waitForURL((u) => u.pathname === "/connect"),
          page.getByRole("button", { name: "Sign up" }).click(),
        ]);
        const card = await page.locator(".connect-card").innerText();
        assert.match(card, /Keyway for Zed wants a Keyway key/);
        assert.match(card, /Approving as\s+newcomer@example\.com/);
        assert.match(card, /Not you\? Switch account/);
        await inspect(page, shots.dir, "connect-approve-new-user", taken);
      },
    );

    await t.step("switch account: signed out, then back to the same approval", async () => {
      const before = page.url();
      await Promise.all([
        page.waitForURL((u) => u.pathname === "/sign-in"),
        page.getByRole("button", { name: "Not you? Switch account" }).click(),
      ]);
      assert.equal(
        new URL(page.url()).searchParams.get("redirect"),
        new URL(before).pathname + new URL(before).search,
      );
      await page.getByLabel("E-mail address").fill("other@example.com");
      await Promise.all([
        page.waitForURL((u) => u.pathname === "/connect"),
        page.getByRole("button", { name: "Sign in" }).click(),
      ]);
      assert.match(
        await page.locator(".connect-card").innerText(),
        /Approving as\s+other@example\.com/,
      );
    });

    await t.step("the device page: how long ago, 'says it is', the address", async () => {
      const res = await fetch(`http://[::1]:${dual.addr.port}/api/connect/device`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ client: "Visual Studio Code" }),
      });
      assert.equal(res.status, 200);
      const { verificationUriComplete, userCode } = await res.json();
      const { search } = new URL(verificationUriComplete);
      await page.goto(`${server.url}/connect/device${search}`);
      await page.getByRole("button", { name: "Continue" }).click();
      await page.getByTestId("device-user-code").waitFor();
      assert.equal(await page.getByTestId("device-user-code").innerText(), userCode);
      assert.match(
        await page.getByTestId("device-requested").innerText(),
        /^\d+ seconds? ago from ::1$/,
      );
      assert.match(
        await page.getByTestId("device-says").innerText(),
        /says it is “Visual Studio Code”/,
      );
      assert.match(
        await page.locator(".connect-card h1").innerText(),
        /says it is Visual Studio Code/,
      );
      await inspect(page, shots.dir, "connect-device-confirm", taken);
      await page.getByRole("button", { name: "Approve" }).click();
      await page.getByText("is connected").waitFor();
    });

    await t.step("dashboard: the apps, their usage, revoke behind a confirmation", async () => {
      const { w: user, userId } = await signedIn(browser, server, "dash@example.com");
      const { users } = server.services;
      await users.provision(userId);
      const cli = await users.createAppKey(userId, { name: "Terminal CLI", flow: "device" }, 20);
      await users.createAppKey(userId, { name: "Cursor", flow: "redirect" }, 20);
      for (let i = 0; i < 2; i++) {
        const r = await fetch(`${server.url}/v1/chat/completions`, {
          method: "POST",
          headers: { authorization: `Bearer ${cli.apiKey}`, "content-type": "application/json" },
          body: JSON.stringify({ model: "glm-4.6", messages: [{ role: "user", content: "hi" }] }),
        });
        assert.equal(r.status, 200);
        await r.arrayBuffer();
      }
      const dash = await user.newPage();
      await dash.goto(`${server.url}/dashboard`);
      const apps = dash.getByTestId("apps");
      await apps.getByText("Terminal CLI").waitFor();
      const row = dash.getByTestId(`app-${cli.app.id}`);
      assert.match(await row.innerText(), new RegExp(cli.apiKey.slice(0, 7)));
      assert.match(await row.getByTestId("app-usage").innerText(), /^2 requests · 36 tokens/);
      assert.doesNotMatch(await row.innerText(), /Never/, "last used is shown");
      await inspect(dash, shots.dir, "dashboard-connected-apps", taken);
      await row.getByRole("button", { name: "Revoke Terminal CLI" }).click();
      await row.getByRole("group", { name: "Confirm revoking Terminal CLI" }).waitFor();
      await inspect(dash, shots.dir, "dashboard-revoke-confirm", taken);
      await row.getByRole("button", { name: "Yes, revoke" }).click();
      await apps.getByText("Terminal CLI is disconnected").waitFor();
      assert.equal(await dash.getByTestId(`app-${cli.app.id}`).count(), 0);
      const after = await fetch(`${server.url}/v1/models`, {
        headers: { authorization: `Bearer ${cli.apiKey}` },
      });
      assert.equal(after.status, 401);
      await after.body?.cancel();
      assert.deepEqual(user.errors, []);
      await user.context.close();
    });
    assert.deepEqual(w.errors, []);
  } finally {
    await w.context.close();
    await browser.close();
    await dual.shutdown();
    await server.close();
    await glm.close();
    await shots.done(taken);
  }
});
