/**
 * The connect flows in a real browser (Debian Chromium via playwright-core) against a real Keyway
 * server: local sign-in → approve → the redirect caught by a loopback listener → token exchange →
 * the key works; the device flow end to end; cancel; a replayed code; a wrong verifier; a refused
 * redirect_uri; axe audits and screenshots of both pages at desktop and phone, light and dark.
 * Screenshots go to a temp folder, removed at the end unless KEYWAY_KEEP_SHOTS is set.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import axe from "axe-core";
import type { Page } from "playwright-core";
import { randomToken } from "../../../lib/core/encoding.ts";
import { s256 } from "../../../lib/identity/connect.ts";
import { launchBrowser, startServer, watchedContext } from "../../support/browser.ts";
import { PUBLIC_URL } from "../../support/helpers.ts";

const DESKTOP = { width: 1280, height: 800 };
const PHONE = { width: 390, height: 844 };
const KEY = /^kw_[A-Za-z0-9_-]{40,}$/;

/** axe-core at both widths, light and dark; a screenshot of each. Serious/critical fail. */
export async function auditAndShoot(page: Page, dir: string | null, name: string) {
  for (const [size, viewport] of [["desktop", DESKTOP], ["phone", PHONE]] as const) {
    await page.setViewportSize(viewport);
    for (const scheme of ["light", "dark"] as const) {
      await page.emulateMedia({ colorScheme: scheme });
      // Evaluated through the DevTools protocol: the page's CSP (no inline scripts) stays on.
      if (!(await page.evaluate(() => "axe" in globalThis))) await page.evaluate(axe.source);
      const violations = await page.evaluate(async () => {
        const run = (globalThis as unknown as {
          axe: {
            run(): Promise<
              { violations: { id: string; impact: string; nodes: { target: string[] }[] }[] }
            >;
          };
        }).axe.run;
        const result = await run();
        return result.violations
          .filter((v) => v.impact === "serious" || v.impact === "critical")
          .map((v) =>
            `${v.id} (${v.impact}): ${v.nodes.map((n) => n.target.join(" ")).join(", ")}`
          );
      });
      assert.deepEqual(violations, [], `${name} ${size} ${scheme}`);
      if (dir) {
        await page.screenshot({ path: join(dir, `${name}-${size}-${scheme}.png`), fullPage: true });
      }
    }
  }
  await page.setViewportSize(DESKTOP);
  await page.emulateMedia({ colorScheme: "light" });
}

Deno.test("browser: connect flows", async (t) => {
  const shotsDir = await Deno.makeTempDir({ prefix: "keyway-connect-shots-" });
  const server = await startServer({}, { connect: { pollIntervalS: 1 } });
  const browser = await launchBrowser();
  // The editor's side of a loopback redirect: a listener that records what reached it.
  const caught: URL[] = [];
  const listener = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen: () => {} }, (req) => {
    const url = new URL(req.url);
    if (url.pathname !== "/callback") return new Response(null, { status: 204 }); // favicon
    caught.push(url);
    return new Response(
      "<!doctype html><title>Editor</title><p>Done, you can close this tab.</p>",
      {
        headers: { "content-type": "text/html" },
      },
    );
  });
  const redirectUri = `http://127.0.0.1:${listener.addr.port}/callback`;
  const connectUrl = (challenge: string, extra: Record<string, string> = {}) =>
    `${server.url}/connect?${new URLSearchParams({
      client: "Keyway for VS Code",
      redirect_uri: redirectUri,
      code_challenge: challenge,
      code_challenge_method: "S256",
      state: "browser-state",
      ...extra,
    })}`;
  const exchange = (code: string, verifier: string) =>
    fetch(`${server.url}/api/connect/token`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ code, code_verifier: verifier }),
    });
  const w = await watchedContext(browser, { viewport: DESKTOP });
  /** Chromium logs a page answered 400 as a console error: drop those the test asked for. */
  const expect400 = (path: string) => {
    const i = w.errors.findIndex((e) => e.includes("status of 400") && e.includes(path));
    assert.ok(i >= 0, `a 400 for ${path} was logged`);
    w.errors.splice(i, 1);
  };
  try {
    const page = await w.newPage();
    /** Approves in the browser and returns the code the listener received. */
    const approveAndCatch = async (challenge: string) => {
      const before = caught.length;
      await page.goto(connectUrl(challenge));
      await Promise.all([
        page.waitForURL((url) => url.href.startsWith(redirectUri)),
        page.getByRole("button", { name: "Approve" }).click(),
      ]);
      assert.equal(caught.length, before + 1);
      const got = caught[caught.length - 1];
      assert.equal(got.searchParams.get("state"), "browser-state");
      return got.searchParams.get("code")!;
    };

    await t.step(
      "PKCE: sign in → approve → loopback redirect → exchange → /v1/models",
      async () => {
        const verifier = randomToken(48);
        await page.goto(connectUrl(await s256(verifier)));
        assert.equal(new URL(page.url()).pathname, "/sign-in", "signed out: sign in first");
        await page.getByLabel("E-mail address").fill("vera@example.com");
        await Promise.all([
          page.waitForURL((url) => url.pathname === "/connect"),
          page.getByRole("button", { name: "Sign in" }).click(),
        ]);
        // Back on the approve page with the same request.
        assert.equal(new URL(page.url()).searchParams.get("redirect_uri"), redirectUri);
        const card = page.locator(".connect-card");
        assert.match(await card.innerText(), /Keyway for VS Code wants a Keyway key/);
        assert.match(await card.innerText(), /http:\/\/127\.0\.0\.1:\d+/);
        assert.match(await card.innerText(), /counted against your limits/);
        await auditAndShoot(page, shotsDir, "connect-approve");

        const before = caught.length;
        await Promise.all([
          page.waitForURL((url) => url.href.startsWith(redirectUri)),
          page.getByRole("button", { name: "Approve" }).click(),
        ]);
        assert.equal(caught.length, before + 1, "the redirect reached the listener");
        const got = caught[caught.length - 1];
        assert.equal(got.pathname, "/callback");
        assert.equal(got.searchParams.get("state"), "browser-state");
        const code = got.searchParams.get("code")!;
        const res = await exchange(code, verifier);
        assert.equal(res.status, 200);
        const body = await res.json();
        assert.match(body.apiKey, KEY);
        assert.equal(body.baseUrl, `${PUBLIC_URL}/v1`);
        const models = await fetch(`${server.url}/v1/models`, {
          headers: { authorization: `Bearer ${body.apiKey}` },
        });
        assert.equal(models.status, 200);
        assert.equal((await models.json()).object, "list");

        const replay = await exchange(code, verifier);
        assert.equal(replay.status, 400);
        assert.equal((await replay.json()).error.code, "invalid_grant", "a replayed code");
      },
    );

    await t.step("a wrong verifier gets invalid_grant (and spends the code)", async () => {
      const verifier = randomToken(48);
      const code = await approveAndCatch(await s256(verifier));
      const wrong = await exchange(code, randomToken(48));
      assert.equal(wrong.status, 400);
      assert.equal((await wrong.json()).error.code, "invalid_grant");
      const right = await exchange(code, verifier);
      assert.equal((await right.json()).error.code, "invalid_grant");
    });

    await t.step("cancel: the client gets error=access_denied and no code", async () => {
      const before = caught.length;
      await page.goto(connectUrl(await s256(randomToken(48))));
      await Promise.all([
        page.waitForURL((url) => url.href.startsWith(redirectUri)),
        page.getByRole("button", { name: "Cancel" }).click(),
      ]);
      const got = caught[before];
      assert.equal(got.searchParams.get("error"), "access_denied");
      assert.equal(got.searchParams.get("state"), "browser-state");
      assert.equal(got.searchParams.get("code"), null);
    });

    await t.step("a disallowed redirect_uri: an error page, no redirect", async () => {
      const before = caught.length;
      const res = await page.goto(
        connectUrl(await s256(randomToken(48)), {
          redirect_uri: `http://127.0.0.1.evil.example:${listener.addr.port}/callback`,
        }),
      );
      assert.equal(res?.status(), 400);
      assert.equal(new URL(page.url()).origin, server.url);
      assert.match(await page.getByRole("alert").innerText(), /redirect_uri/);
      assert.equal(await page.getByRole("button", { name: "Approve" }).count(), 0);
      await auditAndShoot(page, shotsDir, "connect-error");
      assert.equal(caught.length, before);
      expect400(`${server.url}/connect?`);
    });

    await t.step("device flow end to end", async () => {
      const start = await (await fetch(`${server.url}/api/connect/device`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ client: "Keyway CLI" }),
      })).json();
      assert.equal(start.interval, 1);
      const poll = () =>
        fetch(`${server.url}/api/connect/device/token`, {
          method: "POST",
          headers: { "content-type": "application/json" },
          body: JSON.stringify({ deviceCode: start.deviceCode }),
        });
      const pending = await poll();
      assert.equal((await pending.json()).error.code, "authorization_pending");

      // PUBLIC_URL is the configured origin; this test server listens on another port.
      const complete = new URL(start.verificationUriComplete);
      assert.equal(complete.origin, PUBLIC_URL);
      await page.goto(`${server.url}${complete.pathname}${complete.search}`);
      assert.equal(await page.getByLabel("Code").inputValue(), start.userCode, "pre-filled");
      await auditAndShoot(page, shotsDir, "connect-device-code");
      await page.getByRole("button", { name: "Continue" }).click();
      await page.getByTestId("device-user-code").waitFor();
      assert.equal(await page.getByTestId("device-user-code").innerText(), start.userCode);
      assert.match(
        await page.locator(".connect-card").innerText(),
        /says it is Keyway CLI wants a Keyway key/,
      );
      await auditAndShoot(page, shotsDir, "connect-device-confirm");
      await page.getByRole("button", { name: "Approve" }).click();
      await page.getByText("Keyway CLI is connected").waitFor();
      await auditAndShoot(page, shotsDir, "connect-device-done");

      let answer: Response | null = null;
      for (let i = 0; i < 20 && !answer; i++) {
        await new Promise((r) => setTimeout(r, 1_050)); // the interval, as a client waits
        const res = await poll();
        if (res.status === 200) answer = res;
        else assert.equal((await res.json()).error.code, "authorization_pending");
      }
      assert.ok(answer, "the key arrived");
      const key = (await answer.json()).apiKey;
      assert.match(key, KEY);
      const models = await fetch(`${server.url}/v1/models`, {
        headers: { authorization: `Bearer ${key}` },
      });
      assert.equal(models.status, 200);
      await models.body?.cancel();
    });

    await t.step("device flow: deny, and a wrong code on the page", async () => {
      const start = await (await fetch(`${server.url}/api/connect/device`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ client: "Keyway CLI" }),
      })).json();
      await page.goto(`${server.url}/connect/device`);
      await page.getByLabel("Code").fill("BCDF-BCDF");
      await page.getByRole("button", { name: "Continue" }).click();
      assert.match(await page.getByRole("alert").innerText(), /not valid or has expired/);
      expect400(`${server.url}/connect/device`);
      await page.getByLabel("Code").fill(start.userCode);
      await page.getByRole("button", { name: "Continue" }).click();
      await page.getByRole("button", { name: "Deny" }).click();
      await page.getByText("Request denied", { exact: false }).first().waitFor();
      const res = await fetch(`${server.url}/api/connect/device/token`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ deviceCode: start.deviceCode }),
      });
      assert.equal((await res.json()).error.code, "access_denied");
    });

    assert.deepEqual(w.errors, []);
  } finally {
    await w.context.close();
    await browser.close();
    await listener.shutdown();
    await server.close();
    if (Deno.env.get("KEYWAY_KEEP_SHOTS")) console.log(`screenshots kept in ${shotsDir}`);
    else await Deno.remove(shotsDir, { recursive: true });
  }
});
