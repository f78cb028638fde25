/** The gateway tests' app: a user with a key before a fake GLM, and what their checks share. */
import assert from "node:assert/strict";
import { userUsage } from "../../lib/usage/usage.ts";
import { FakeGlm } from "../../testing/fakes/glm.ts";
import { bearer, json, type TestApp, testApp } from "./helpers.ts";

export interface Setup {
  app: TestApp;
  fake: FakeGlm;
  apiKey: string;
  userId: string;
  session: string;
  chat(body?: unknown, init?: { key?: string; headers?: Record<string, string> }): Promise<
    Response
  >;
  usage(): Promise<{ requests: number; promptTokens: number; completionTokens: number }>;
  close(): Promise<void>;
}

export const CHAT = { model: "glm-4.6", messages: [{ role: "user", content: "hi" }] };

export async function setup(env: Record<string, string> = {}): Promise<Setup> {
  const fake = new FakeGlm();
  const app = await testApp({ GLM_BASE_URL: fake.baseUrl, ...env });
  const { token, userId } = await app.services.sessions.issueLocal("ada@example.test");
  const res = await app.request("/api/key", { method: "POST", headers: bearer(token) });
  assert.equal(res.status, 201);
  const apiKey = String((await json(res)).apiKey);
  const s: Setup = {
    app,
    fake,
    apiKey,
    userId,
    session: token,
    chat: (body = CHAT, init = {}) =>
      app.request("/v1/chat/completions", {
        method: "POST",
        headers: {
          ...bearer(init.key ?? s.apiKey),
          "content-type": "application/json",
          ...init.headers,
        },
        body: typeof body === "string" ? body : JSON.stringify(body),
      }),
    usage: async () => {
      const u = await userUsage(app.kv, app.services.config.pricing, userId, 1);
      return {
        requests: u.today.requests,
        promptTokens: u.today.promptTokens,
        completionTokens: u.today.completionTokens,
      };
    },
    close: async () => {
      await fake.close();
      await app.close();
    },
  };
  return s;
}

/** Lets go of a response body whether or not it was read. */
export async function drain(res: Response) {
  if (!res.bodyUsed) await res.body?.cancel();
}

export function assertRateHeaders(res: Response) {
  assert.match(res.headers.get("x-ratelimit-limit-requests") ?? "", /^\d+$/);
  assert.match(res.headers.get("x-ratelimit-remaining-requests") ?? "", /^\d+$/);
  assert.match(
    res.headers.get("x-ratelimit-reset-requests") ?? "",
    /^(\d+ms|[\d.]+s|\d+m\d+s|\d+h\d+m\d+s)$/,
  );
}

export async function errorOf(res: Response) {
  assert.match(res.headers.get("content-type") ?? "", /application\/json/);
  return (await json<{ error: { code: string; message: string } }>(res)).error;
}

/** A POST to a gateway on a real port (serveGateway). */
export function post(
  url: string,
  key: string,
  body: unknown = CHAT,
  path = "/v1/chat/completions",
) {
  return fetch(`${url}${path}`, {
    method: "POST",
    headers: { ...bearer(key), "content-type": "application/json" },
    body: JSON.stringify(body),
  });
}
