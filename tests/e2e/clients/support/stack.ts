/**
 * What a coding tool runs against: Keyway as a real process in local mode (an e-mail sign-in, no
 * Clerk) on a loopback port, before a fake GLM in `auto` mode (testing/fakes/glm.ts). Between the
 * tool and the app sits an observer on loopback (the app's PUBLIC_URL, so the URLs in
 * `/api/key` and in every recipe point at it) that passes everything on and notes, for each
 * `/v1/*` exchange, when the answer came, its status and, for a refusal, its body — so a test can
 * tell how long a tool went on after a refusal and how often it retried.
 */
import assert from "node:assert/strict";
import type { KeyBody } from "../../../../lib/api_types.ts";
import { FakeGlm } from "../../../../testing/fakes/glm.ts";
import { MASTER_KEY } from "../../../support/helpers.ts";
import { type RunningMain, startMain } from "../../../support/subprocess.ts";

/** One `/v1/*` exchange as the observer saw it. */
export interface Exchange {
  path: string;
  /** performance.now() when the answer's head was passed on. */
  at: number;
  status: number;
  /** Whether the request asked for a stream. */
  stream: boolean;
  requestBytes: number;
  /** The body of an answer with status ≥ 400. */
  error?: string;
  retryAfter: string | null;
}

export interface ClientStack {
  /** The origin tools are given (the observer's; also the app's PUBLIC_URL). */
  url: string;
  /** Every /v1/* exchange so far, in order. */
  exchanges: Exchange[];
  glm: FakeGlm;
  app: RunningMain;
  /** Signs a new person in (local mode) and returns their `POST /api/key` answer. */
  signUp(email: string): Promise<KeyBody>;
  /** Today's usage as `GET /api/usage` tells the key's owner. */
  usage(
    apiKey: string,
  ): Promise<{ requests: number; promptTokens: number; completionTokens: number }>;
  close(): Promise<void>;
}

function freePort(): number {
  const probe = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = probe.addr.port;
  probe.close();
  return port;
}

/** Starts a fake GLM and the app in local mode; `env` adds to (or overrides) the app's settings. */
export async function startStack(env: Record<string, string> = {}): Promise<ClientStack> {
  const dir = await Deno.makeTempDir({ prefix: "keyway_clients_app_" });
  const glm = new FakeGlm();
  glm.mode = "auto";
  const port = freePort();
  const appUrl = `http://127.0.0.1:${port}`;
  const exchanges: Exchange[] = [];
  const observer = Deno.serve(
    { hostname: "127.0.0.1", port: 0, onListen: () => {} },
    (req) => observe(req, appUrl, exchanges),
  );
  const url = `http://127.0.0.1:${observer.addr.port}`;
  let app: RunningMain;
  try {
    app = await startMain({
      DENO_KV_PATH: `${dir}/kv.sqlite3`,
      PORT: String(port),
      PUBLIC_URL: url,
      GLM_API_KEY: MASTER_KEY,
      GLM_BASE_URL: glm.baseUrl,
      ...env,
    }, dir);
  } catch (err) {
    await observer.shutdown();
    await glm.close();
    throw err;
  }
  return {
    url,
    exchanges,
    glm,
    app,
    async signUp(email) {
      const signIn = await fetch(`${url}/auth/local/sign-in`, {
        method: "POST",
        headers: { "content-type": "application/json", origin: url },
        body: JSON.stringify({ email }),
      });
      assert.equal(signIn.status, 200, `local sign-in of ${email}: ${await signIn.text()}`);
      const cookie = (signIn.headers.get("set-cookie") ?? "").split(";")[0];
      const res = await fetch(`${url}/api/key`, {
        method: "POST",
        headers: { cookie, origin: url },
      });
      assert.equal(res.status, 201, `POST /api/key for ${email}`);
      return await res.json();
    },
    async usage(apiKey) {
      const res = await fetch(`${url}/api/usage?days=1`, {
        headers: { authorization: `Bearer ${apiKey}` },
      });
      assert.equal(res.status, 200, "GET /api/usage");
      const { requests, promptTokens, completionTokens } = (await res.json()).today;
      return { requests, promptTokens, completionTokens };
    },
    async close() {
      await app.stop();
      await observer.shutdown();
      await glm.close();
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    },
  };
}

const HOP_BY_HOP = ["host", "connection", "keep-alive", "transfer-encoding", "content-length"];

/** Passes one request on to the app and notes what came back (see the module's comment). */
async function observe(req: Request, appUrl: string, exchanges: Exchange[]): Promise<Response> {
  const target = new URL(req.url);
  const body = req.method === "GET" || req.method === "HEAD"
    ? null
    : new Uint8Array(await req.arrayBuffer());
  const headers = new Headers(req.headers);
  for (const name of HOP_BY_HOP) headers.delete(name);
  let res: Response;
  try {
    res = await fetch(`${appUrl}${target.pathname}${target.search}`, {
      method: req.method,
      headers,
      body,
      redirect: "manual",
      signal: req.signal,
    });
  } catch {
    return new Response(null, { status: 502 });
  }
  const out = new Headers(res.headers);
  for (const name of [...HOP_BY_HOP, "content-encoding"]) out.delete(name);
  if (!target.pathname.startsWith("/v1/")) {
    return new Response(res.body, { status: res.status, headers: out });
  }
  let stream = false;
  try {
    stream = body !== null && JSON.parse(new TextDecoder().decode(body)).stream === true;
  } catch { /* not JSON: the app refuses it */ }
  const exchange: Exchange = {
    path: target.pathname,
    at: performance.now(),
    status: res.status,
    stream,
    requestBytes: body?.byteLength ?? 0,
    retryAfter: res.headers.get("retry-after"),
  };
  exchanges.push(exchange);
  if (res.status < 400) return new Response(res.body, { status: res.status, headers: out });
  exchange.error = await res.text();
  return new Response(exchange.error, { status: res.status, headers: out });
}
