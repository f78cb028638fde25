/**
 * Keyway for VS Code extensions: get the signed-in user's Keyway key into the editor without
 * copy-paste. Drop this file into your extension and call:
 *
 *   import * as vscode from "vscode";
 *   import { createKeywayClient } from "./keyway";
 *   const keyway = createKeywayClient(vscode);
 *   const { apiKey, baseUrl } = await keyway.getKeywayKey(context, "https://keyway.example.com");
 *
 * It runs Keyway's PKCE redirect flow (the browser opens, the user approves, the editor's URI
 * handler receives a one-time code), falls back to the device-code flow when no browser can be
 * opened, the redirect cannot reach this window (VS Code for the Web) or the user asks for a
 * code, and keeps the key in `context.secrets`. Needs VS Code ≥ 1.74 (global fetch, crypto).
 * The `vscode` API is passed in rather than imported so the module can be tested with a stand-in.
 */
import type * as vscode from "vscode";

/** The parts of the `vscode` module this client uses (the real module fits). */
export interface VsCodeApi {
  env: Pick<typeof vscode.env, "openExternal" | "asExternalUri" | "uriScheme" | "appName">;
  window: Pick<
    typeof vscode.window,
    "registerUriHandler" | "showInformationMessage" | "withProgress"
  >;
  Uri: Pick<typeof vscode.Uri, "parse">;
  ProgressLocation: Pick<typeof vscode.ProgressLocation, "Notification">;
}

/** The parts of an ExtensionContext this client uses. */
export interface KeywayContext {
  secrets: Pick<vscode.SecretStorage, "get" | "store" | "delete">;
  extension: { id: string };
}

/** Keyway's key answer (CONTRACT §5: the `/api/key` success body). */
export interface KeywayKey {
  apiKey: string;
  /** OpenAI-compatible base URL (`…/v1`). */
  baseUrl: string;
  /** Anthropic-compatible base URL (clients append `/v1/messages`). */
  anthropicBaseUrl: string;
  mode: "proxy" | "shared";
  keyPrefix: string;
  /** This editor's own key id (`k_…`): what "disconnect" revokes. */
  keyId: string;
  userId: string;
  createdAt: string;
  /** The limits in force (null: unlimited). */
  limits: {
    rpm: number;
    rpd: number;
    tokensPerDay: number | null;
    budgetUsdMonthly: number | null;
  };
}

/** Keyway's answer to a device-code start (CONTRACT §5, RFC 8628). */
export interface KeywayDeviceStart {
  deviceCode: string;
  userCode: string;
  verificationUri: string;
  verificationUriComplete: string;
  expiresIn: number;
  interval: number;
}

export interface KeywayOptions {
  /** The name the approve page shows. Default: the editor's name (`vscode.env.appName`). */
  clientName?: string;
  /** `redirect` (default: falls back to `device` when needed) or `device` only. */
  flow?: "auto" | "device";
  /** How long to wait for the browser's answer before giving up (default 5 min). */
  timeoutMs?: number;
}

export interface KeywayClientOptions {
  /**
   * VS Code allows one URI handler per extension. Set false when your extension registers its own,
   * and pass Keyway's callbacks on: `if (keyway.handleUri(uri)) return;`.
   */
  registerUriHandler?: boolean;
  /** fetch to use (default: the global one). */
  fetch?: typeof fetch;
}

/** A refusal from Keyway or the user, with Keyway's error code when there is one. */
export class KeywayError extends Error {
  constructor(readonly code: string, message: string) {
    super(message);
    this.name = "KeywayError";
  }
}

const CALLBACK_PATH = "/keyway-callback";
const USE_CODE = "Use a code instead";
const OPEN_BROWSER = "Open browser";

export function createKeywayClient(api: VsCodeApi, clientOptions: KeywayClientOptions = {}) {
  const doFetch = clientOptions.fetch ?? ((input, init) => fetch(input, init));
  /** Callbacks awaited by state. */
  const waiting = new Map<string, (query: URLSearchParams) => void>();
  /** One connect at a time per Keyway server, whoever asks. */
  const inFlight = new Map<string, Promise<KeywayKey>>();
  let handlerRegistered = false;

  /** Feeds a URI to the client; true when it was a Keyway callback. */
  function handleUri(uri: vscode.Uri): boolean {
    if (uri.path !== CALLBACK_PATH) return false;
    const query = new URLSearchParams(uri.query);
    const resolve = waiting.get(query.get("state") ?? "");
    if (!resolve) return false;
    waiting.delete(query.get("state")!);
    resolve(query);
    return true;
  }

  const origin = (baseUrl: string) => new URL(baseUrl).origin;
  const secretName = (baseUrl: string) => `keyway.key:${origin(baseUrl)}`;

  async function post(baseUrl: string, path: string, body: unknown) {
    const res = await doFetch(`${origin(baseUrl)}${path}`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify(body),
    });
    const json = await res.json().catch(() => null);
    if (res.ok && typeof json?.apiKey === "string" && typeof json?.baseUrl === "string") {
      return json as KeywayKey;
    }
    const err = json?.error;
    throw new KeywayError(
      typeof err?.code === "string" ? err.code : `http_${res.status}`,
      typeof err?.message === "string" ? err.message : `Keyway answered ${res.status}`,
    );
  }

  async function redirectFlow(
    context: KeywayContext,
    baseUrl: string,
    client: string,
    timeoutMs: number,
  ): Promise<KeywayKey | "device"> {
    const callback = await api.env.asExternalUri(
      api.Uri.parse(`${api.env.uriScheme}://${context.extension.id}${CALLBACK_PATH}`),
    );
    // VS Code for the Web maps the callback to an https page Keyway does not redirect to.
    if (callback.scheme === "https") return "device";
    if (!handlerRegistered && clientOptions.registerUriHandler !== false) {
      api.window.registerUriHandler({ handleUri: (uri) => void handleUri(uri) });
      handlerRegistered = true;
    }
    const verifier = randomBase64Url(32);
    const state = randomBase64Url(16);
    const url = new URL("/connect", origin(baseUrl));
    url.search = new URLSearchParams({
      client,
      redirect_uri: callback.toString(true),
      code_challenge: await s256(verifier),
      code_challenge_method: "S256",
      state,
    }).toString();

    let settle!: (result: URLSearchParams | "device" | "timeout") => void;
    const answer = new Promise<URLSearchParams | "device" | "timeout">((r) => (settle = r));
    waiting.set(state, settle);
    const timer = setTimeout(() => settle("timeout"), timeoutMs);
    try {
      // A Thenable, not a Promise: no .catch().
      const opened = await Promise.resolve(api.env.openExternal(api.Uri.parse(url.href)))
        .catch(() => false);
      if (!opened) return "device";
      // The notification offers the device flow when the browser is on another machine.
      api.window.showInformationMessage(
        `Approve ${client} in your browser to connect Keyway.`,
        USE_CODE,
      ).then((choice) => choice === USE_CODE && settle("device"), () => {});
      const result = await answer;
      if (result === "device") return "device";
      if (result === "timeout") {
        throw new KeywayError("timeout", "Keyway: no answer from the browser in time.");
      }
      const error = result.get("error");
      if (error) {
        throw new KeywayError(error, error === "access_denied" ? "Connection cancelled." : error);
      }
      return await post(baseUrl, "/api/connect/token", {
        code: result.get("code") ?? "",
        code_verifier: verifier,
      });
    } finally {
      clearTimeout(timer);
      waiting.delete(state);
    }
  }

  async function deviceFlow(baseUrl: string, client: string): Promise<KeywayKey> {
    const res = await doFetch(`${origin(baseUrl)}/api/connect/device`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ client }),
    });
    if (!res.ok) {
      throw new KeywayError(`http_${res.status}`, "Keyway: could not start a device code.");
    }
    const start: KeywayDeviceStart = await res.json();
    api.window.showInformationMessage(
      `Keyway: open ${start.verificationUri} and enter the code ${start.userCode}.`,
      OPEN_BROWSER,
    ).then((choice) => {
      if (choice === OPEN_BROWSER) {
        api.env.openExternal(api.Uri.parse(start.verificationUriComplete)).then(() => {}, () => {});
      }
    }, () => {});
    return await api.window.withProgress(
      {
        location: api.ProgressLocation.Notification,
        title: `Keyway: waiting for code ${start.userCode} to be approved…`,
        cancellable: true,
      },
      async (_progress, token) => {
        let interval = start.interval;
        const deadline = Date.now() + start.expiresIn * 1000;
        while (Date.now() < deadline) {
          await sleep(interval * 1000, token);
          if (token.isCancellationRequested) {
            throw new KeywayError("cancelled", "Connection cancelled.");
          }
          try {
            return await post(baseUrl, "/api/connect/device/token", {
              deviceCode: start.deviceCode,
            });
          } catch (err) {
            if (!(err instanceof KeywayError)) throw err;
            if (err.code === "authorization_pending") continue;
            if (err.code === "slow_down") interval += 5; // RFC 8628 §3.5
            else throw err;
          }
        }
        throw new KeywayError("expired_token", "The code expired before it was approved.");
      },
    );
  }

  async function connect(context: KeywayContext, baseUrl: string, options: KeywayOptions) {
    // "&", "=", "%", "#" and "+" do not survive every editor's URI re-encoding.
    const client = (options.clientName ?? api.env.appName).replace(/[&=%#+]/g, " ").trim()
      .slice(0, 64) || "VS Code";
    let key: KeywayKey | "device" = "device";
    if (options.flow !== "device") {
      key = await redirectFlow(context, baseUrl, client, options.timeoutMs ?? 300_000);
    }
    if (key === "device") key = await deviceFlow(baseUrl, client);
    await context.secrets.store(secretName(baseUrl), JSON.stringify(key));
    return key;
  }

  /** The stored key for this Keyway server, or a new connection when there is none. */
  async function getKeywayKey(
    context: KeywayContext,
    baseUrl: string,
    options: KeywayOptions = {},
  ): Promise<KeywayKey> {
    // A damaged entry reads as none: connect again.
    const stored = await storedKey(context, baseUrl);
    if (stored) return stored;
    const running = inFlight.get(origin(baseUrl));
    if (running) return await running;
    const attempt = connect(context, baseUrl, options).finally(() =>
      inFlight.delete(origin(baseUrl))
    );
    inFlight.set(origin(baseUrl), attempt);
    return await attempt;
  }

  /** Forgets the stored key (signing out of Keyway in this editor). */
  async function forgetKey(context: KeywayContext, baseUrl: string) {
    await context.secrets.delete(secretName(baseUrl));
  }

  /** The key stored for this Keyway server, without connecting (null when there is none). */
  async function storedKey(context: KeywayContext, baseUrl: string): Promise<KeywayKey | null> {
    const stored = await context.secrets.get(secretName(baseUrl));
    if (!stored) return null;
    try {
      const key = JSON.parse(stored) as KeywayKey;
      return typeof key.apiKey === "string" ? key : null;
    } catch {
      return null;
    }
  }

  /**
   * Disconnects this editor: revokes its own key on Keyway (`DELETE /api/keys/<keyId>`, sent with
   * that key — an app's key may revoke itself) and forgets it. The key is forgotten even when
   * Keyway cannot be reached; `revoked` says whether Keyway confirmed it (a key already revoked
   * or refused counts as revoked). A key handed out before per-app keys (no `keyId`, or the
   * default key) is only forgotten: revoke it by rotating on the dashboard.
   */
  async function disconnect(
    context: KeywayContext,
    baseUrl: string,
  ): Promise<{ revoked: boolean; keyPrefix: string | null }> {
    const key = await storedKey(context, baseUrl);
    await forgetKey(context, baseUrl);
    if (!key) return { revoked: true, keyPrefix: null };
    if (!key.keyId || key.keyId === "default" || key.mode !== "proxy") {
      return { revoked: false, keyPrefix: key.keyPrefix };
    }
    try {
      const res = await doFetch(
        `${origin(baseUrl)}/api/keys/${encodeURIComponent(key.keyId)}`,
        { method: "DELETE", headers: { authorization: `Bearer ${key.apiKey}` } },
      );
      await res.body?.cancel();
      // 401: the key no longer works (revoked on the dashboard, or the account deleted).
      return {
        revoked: res.ok || res.status === 401 || res.status === 404,
        keyPrefix: key.keyPrefix,
      };
    } catch {
      return { revoked: false, keyPrefix: key.keyPrefix };
    }
  }

  /**
   * The key was refused (401: rotated on the dashboard, or revoked): forget it and connect again.
   * `rejectedKey` avoids dropping a newer key that another request already fetched.
   */
  async function reconnect(
    context: KeywayContext,
    baseUrl: string,
    rejectedKey: string,
    options: KeywayOptions = {},
  ): Promise<KeywayKey> {
    const current = await context.secrets.get(secretName(baseUrl));
    if (!current || current.includes(JSON.stringify(rejectedKey))) {
      await forgetKey(context, baseUrl);
    }
    return await getKeywayKey(context, baseUrl, options);
  }

  /**
   * fetch against Keyway with the key (`path` such as "/v1/chat/completions"); on a 401 the key is
   * replaced through reconnect() and the request sent once more. A body stream cannot be resent,
   * so give `init.body` as a string or bytes.
   */
  async function keywayFetch(
    context: KeywayContext,
    baseUrl: string,
    path: string,
    init: RequestInit = {},
    options: KeywayOptions = {},
  ): Promise<Response> {
    const send = (key: KeywayKey) => {
      const headers = new Headers(init.headers);
      headers.set("authorization", `Bearer ${key.apiKey}`);
      return doFetch(`${origin(baseUrl)}${path}`, { ...init, headers });
    };
    const key = await getKeywayKey(context, baseUrl, options);
    const res = await send(key);
    if (res.status !== 401) return res;
    await res.body?.cancel();
    return await send(await reconnect(context, baseUrl, key.apiKey, options));
  }

  return {
    getKeywayKey,
    storedKey,
    forgetKey,
    disconnect,
    reconnect,
    fetch: keywayFetch,
    handleUri,
  };
}

export type KeywayClient = ReturnType<typeof createKeywayClient>;

function randomBase64Url(bytes: number): string {
  return base64Url(crypto.getRandomValues(new Uint8Array(bytes)));
}

function base64Url(bytes: Uint8Array): string {
  let bin = "";
  for (const b of bytes) bin += String.fromCharCode(b);
  return btoa(bin).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

/** PKCE S256 challenge (RFC 7636 §4.2). */
async function s256(verifier: string): Promise<string> {
  const digest = await crypto.subtle.digest("SHA-256", new TextEncoder().encode(verifier));
  return base64Url(new Uint8Array(digest));
}

function sleep(ms: number, token: vscode.CancellationToken) {
  return new Promise<void>((resolve) => {
    const timer = setTimeout(done, ms);
    const sub = token.onCancellationRequested(done);
    function done() {
      clearTimeout(timer);
      sub.dispose();
      resolve();
    }
  });
}
