/**
 * clients/vscode/keyway.ts with a stand-in `vscode` object against a real Keyway server, with
 * Playwright (Chromium) playing the user in the browser the editor opens: the PKCE redirect, the
 * device-code fallback, the key kept in `context.secrets`, and a 401 that connects again.
 *
 * What the stand-in plays for VS Code: `env.openExternal` opens the page in the test's browser;
 * a `vscode://` redirect, which Chromium would hand to the OS and the OS to VS Code, is taken off
 * the approve form's answer and given to the registered URI handler, as VS Code does.
 */
import assert from "node:assert/strict";
import type { BrowserContext, Page } from "playwright-core";
import type * as vscode from "vscode";
import {
  createKeywayClient,
  type KeywayContext,
  KeywayError,
  type VsCodeApi,
} from "../../../clients/vscode/keyway.ts";
import {
  launchBrowser,
  startServer,
  type TestServer,
  watchedContext,
} from "../../support/browser.ts";
import { PUBLIC_URL } from "../../support/helpers.ts";
import type { DeviceStartBody, KeyBody } from "../../../lib/api_types.ts";
import type { KeywayDeviceStart, KeywayKey } from "../../../clients/vscode/keyway.ts";

// The drop-in client keeps its own copy of the server's shapes (it cannot import lib/): the type
// check fails here when either side changes a field without the other.
type Same<A, B> = [A] extends [B] ? [B] extends [A] ? true : false : false;
const shapesInStep: [Same<KeywayKey, KeyBody>, Same<KeywayDeviceStart, DeviceStartBody>] = [
  true,
  true,
];
void shapesInStep;

const EXTENSION_ID = "keyway-example.keyway-example";
const KEY = /^kw_[A-Za-z0-9_-]{40,}$/;

/** vscode.Uri's surface the module uses, over a WHATWG URL. */
class StandInUri {
  constructor(private readonly url: URL) {}
  get scheme() {
    return this.url.protocol.slice(0, -1);
  }
  get path() {
    return this.url.pathname;
  }
  get query() {
    return this.url.search.slice(1);
  }
  toString(_skipEncoding?: boolean) {
    return this.url.href;
  }
}

interface StandIn {
  api: VsCodeApi;
  context: KeywayContext;
  secrets: Map<string, string>;
  messages: string[];
  opened: string[];
  /** What VS Code does when the OS opens a vscode:// link: hand it to the URI handler. */
  deliver(url: string): void;
}

function standIn(options: {
  openExternal(url: string): Promise<boolean>;
  onMessage?(message: string, items: string[]): string | undefined;
}): StandIn {
  const handlers: vscode.UriHandler[] = [];
  const secrets = new Map<string, string>();
  const messages: string[] = [];
  const opened: string[] = [];
  const parse = (value: string) => new StandInUri(new URL(value)) as unknown as vscode.Uri;
  const api = {
    env: {
      uriScheme: "vscode",
      appName: "Visual Studio Code",
      openExternal: async (uri: vscode.Uri) => {
        opened.push(uri.toString());
        return await options.openExternal(uri.toString());
      },
      asExternalUri: (uri: vscode.Uri) => Promise.resolve(uri),
    },
    window: {
      registerUriHandler: (handler: vscode.UriHandler) => {
        handlers.push(handler);
        return { dispose: () => {} };
      },
      showInformationMessage: (message: string, ...items: string[]) => {
        messages.push(message);
        return Promise.resolve(options.onMessage?.(message, items));
      },
      withProgress: <R>(
        _options: vscode.ProgressOptions,
        task: (
          progress: vscode.Progress<{ message?: string }>,
          token: vscode.CancellationToken,
        ) => Thenable<R>,
      ) =>
        task({ report: () => {} }, {
          isCancellationRequested: false,
          onCancellationRequested: () => ({ dispose: () => {} }),
        } as unknown as vscode.CancellationToken),
    },
    Uri: { parse },
    ProgressLocation: { Notification: 15 as vscode.ProgressLocation.Notification },
  };
  return {
    api: api as unknown as VsCodeApi,
    context: {
      extension: { id: EXTENSION_ID },
      secrets: {
        get: (key: string) => Promise.resolve(secrets.get(key)),
        store: (key: string, value: string) => Promise.resolve(void secrets.set(key, value)),
        delete: (key: string) => Promise.resolve(void secrets.delete(key)),
      },
    },
    secrets,
    messages,
    opened,
    deliver: (url) => {
      assert.equal(handlers.length, 1, "one URI handler registered");
      handlers[0].handleUri(parse(url));
    },
  };
}

/**
 * The approve form's answer is a redirect to vscode://…: Chromium would hand it to the OS, so
 * the test takes it here and passes it to the stand-in, as the OS and VS Code would.
 */
async function routeEditorRedirects(
  context: BrowserContext,
  server: TestServer,
  editor: () => StandIn,
) {
  await context.route(`${server.url}/connect`, async (route) => {
    if (route.request().method() !== "POST") return await route.continue();
    const res = await route.fetch({ maxRedirects: 0 });
    const location = res.headers()["location"] ?? "";
    if (!location.startsWith("vscode://")) return await route.fulfill({ response: res });
    editor().deliver(location);
    await route.fulfill({
      status: 200,
      contentType: "text/html",
      body: "<!doctype html><title>Opening VS Code</title><p>Opening VS Code…</p>",
    });
  });
}

/** The user in the browser: signs in when asked, then approves. */
async function approveInBrowser(page: Page, url: string, email: string) {
  await page.goto(url);
  if (new URL(page.url()).pathname === "/sign-in") {
    await page.getByLabel("E-mail address").fill(email);
    await Promise.all([
      page.waitForURL((u) => u.pathname === "/connect"),
      page.getByRole("button", { name: "Sign in" }).click(),
    ]);
  }
  assert.match(
    await page.locator(".connect-card").innerText(),
    /Visual Studio Code wants a Keyway key/,
  );
  assert.match(await page.locator(".connect-card").innerText(), /vscode:\/\/keyway-example/);
  await Promise.all([
    page.getByText("Opening VS Code").waitFor(),
    page.getByRole("button", { name: "Approve" }).click(),
  ]);
}

Deno.test("vscode client: PKCE redirect, device fallback, secrets, reconnect after 401", async (t) => {
  const server = await startServer({}, { connect: { pollIntervalS: 1 } });
  const browser = await launchBrowser();
  const w = await watchedContext(browser);
  const page = await w.newPage();
  let editor!: StandIn;
  await routeEditorRedirects(w.context, server, () => editor);
  const models = (key: string) =>
    fetch(`${server.url}/v1/models`, { headers: { authorization: `Bearer ${key}` } });
  try {
    let userTask: Promise<void> = Promise.resolve();
    editor = standIn({
      openExternal: (url) => {
        // openExternal returns once the browser is open; the user acts afterwards.
        userTask = approveInBrowser(page, url, "vic@example.com");
        return Promise.resolve(true);
      },
    });
    const keyway = createKeywayClient(editor.api);

    let firstKey = "";
    await t.step("PKCE: the browser approves, the key lands in secrets and works", async () => {
      const key = await keyway.getKeywayKey(editor.context, server.url);
      await userTask;
      assert.match(key.apiKey, KEY);
      firstKey = key.apiKey;
      const connectUrl = new URL(editor.opened[0]);
      assert.equal(connectUrl.pathname, "/connect");
      assert.equal(connectUrl.searchParams.get("client"), "Visual Studio Code");
      assert.equal(
        connectUrl.searchParams.get("redirect_uri"),
        `vscode://${EXTENSION_ID}/keyway-callback`,
      );
      assert.equal(connectUrl.searchParams.get("code_challenge_method"), "S256");
      const stored = JSON.parse(editor.secrets.get(`keyway.key:${server.url}`)!);
      assert.equal(stored.apiKey, key.apiKey);
      assert.equal(stored.baseUrl, `${PUBLIC_URL}/v1`);
      assert.equal((await models(key.apiKey)).status, 200);
      // Asked again: the stored key, no browser.
      const again = await keyway.getKeywayKey(editor.context, server.url);
      assert.equal(again.apiKey, key.apiKey);
      assert.equal(editor.opened.length, 1);
    });

    await t.step("a 401 forgets the key and connects again", async () => {
      const userId = (await server.services.users.resolveKey(firstKey))!.id;
      const { keyId } = JSON.parse(editor.secrets.get(`keyway.key:${server.url}`)!);
      assert.match(keyId, /^k_/, "the editor holds its own key");
      await server.services.users.revokeAppKey(userId, keyId); // e.g. revoked on the dashboard
      assert.equal((await models(firstKey)).status, 401);
      const res = await keyway.fetch(editor.context, server.url, "/v1/models");
      await userTask;
      assert.equal(res.status, 200);
      assert.equal((await res.json()).object, "list");
      assert.equal(editor.opened.length, 2, "the browser opened once more");
      const stored = JSON.parse(editor.secrets.get(`keyway.key:${server.url}`)!);
      assert.notEqual(stored.apiKey, firstKey);
      assert.equal((await server.services.users.resolveKey(stored.apiKey))?.id, userId);
    });

    await t.step("disconnect revokes the editor's own key and forgets it", async () => {
      const stored = JSON.parse(editor.secrets.get(`keyway.key:${server.url}`)!);
      const userId = (await server.services.users.resolveKey(stored.apiKey))!.id;
      const others = (await server.services.users.get(userId))!.apps!.length;
      const result = await keyway.disconnect(editor.context, server.url);
      assert.deepEqual(result, { revoked: true, keyPrefix: stored.apiKey.slice(0, 7) });
      assert.equal(editor.secrets.get(`keyway.key:${server.url}`), undefined);
      assert.equal((await models(stored.apiKey)).status, 401);
      const apps = (await server.services.users.get(userId))!.apps!;
      assert.equal(apps.length, others - 1);
      assert.ok(!apps.some((a) => a.id === stored.keyId));
      // Nothing stored any more: nothing to revoke.
      assert.deepEqual(await keyway.disconnect(editor.context, server.url), {
        revoked: true,
        keyPrefix: null,
      });
    });

    await t.step("cancel in the browser: KeywayError access_denied, nothing stored", async () => {
      const cancelling = standIn({
        openExternal: (url) => {
          userTask = (async () => {
            await page.goto(url);
            await Promise.all([
              page.getByText("Opening VS Code").waitFor(),
              page.getByRole("button", { name: "Cancel" }).click(),
            ]);
          })();
          return Promise.resolve(true);
        },
      });
      editor = cancelling;
      const client = createKeywayClient(cancelling.api);
      await assert.rejects(
        client.getKeywayKey(cancelling.context, server.url),
        (err) => err instanceof KeywayError && err.code === "access_denied",
      );
      await userTask;
      assert.equal(cancelling.secrets.size, 0);
    });

    await t.step("no browser: the device flow, the user enters the code", async () => {
      const device = standIn({
        // The connect page cannot be opened (a remote machine); the device page can.
        openExternal: (url) => {
          const target = new URL(url);
          if (target.pathname === "/connect") return Promise.resolve(false);
          assert.equal(target.origin, PUBLIC_URL);
          userTask = (async () => {
            await page.goto(`${server.url}${target.pathname}${target.search}`);
            await page.getByRole("button", { name: "Continue" }).click();
            await page.getByRole("button", { name: "Approve" }).click();
            await page.getByText("is connected").waitFor();
          })();
          return Promise.resolve(true);
        },
        onMessage: (message, items) =>
          items.includes("Open browser") && /enter the code/.test(message)
            ? "Open browser"
            : undefined,
      });
      editor = device;
      const client = createKeywayClient(device.api);
      const key = await client.getKeywayKey(device.context, server.url, {
        clientName: "Keyway example",
      });
      await userTask;
      assert.match(key.apiKey, KEY);
      const shown = device.messages.find((m) => /enter the code/.test(m))!;
      assert.match(shown, /[BCDFGHJKLMNPQRSTVWXZ]{4}-[BCDFGHJKLMNPQRSTVWXZ]{4}/);
      assert.ok(shown.includes(`${PUBLIC_URL}/connect/device`));
      assert.equal(
        JSON.parse(device.secrets.get(`keyway.key:${server.url}`)!).apiKey,
        key.apiKey,
      );
      assert.equal((await models(key.apiKey)).status, 200);
    });
    await t.step('the user picks "Use a code instead" while the browser waits', async () => {
      let connectOpened = false;
      const chooser = standIn({
        openExternal: (url) => {
          const target = new URL(url);
          // The browser opened on another machine: nothing comes back to this window.
          if (target.pathname === "/connect") return Promise.resolve(connectOpened = true);
          userTask = (async () => {
            await page.goto(`${server.url}${target.pathname}${target.search}`);
            await page.getByRole("button", { name: "Continue" }).click();
            await page.getByRole("button", { name: "Approve" }).click();
            await page.getByText("is connected").waitFor();
          })();
          return Promise.resolve(true);
        },
        onMessage: (_message, items) =>
          items.find((i) => i === "Use a code instead" || i === "Open browser"),
      });
      editor = chooser;
      const key = await createKeywayClient(chooser.api).getKeywayKey(chooser.context, server.url);
      await userTask;
      assert.ok(connectOpened);
      assert.match(key.apiKey, KEY);
      assert.equal((await models(key.apiKey)).status, 200);
    });
    assert.deepEqual(w.errors, []);
  } finally {
    await w.context.close();
    await browser.close();
    await server.close();
  }
});
