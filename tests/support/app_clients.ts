/** What the process tests send a running app (tests/support/subprocess.ts), as a client would. */
import assert from "node:assert/strict";
import type { ClerkIssuer } from "../../testing/fakes/clerk_issuer.ts";
import { bearer } from "./helpers.ts";
import type { RunningMain } from "./subprocess.ts";

/** The user's key, provisioned through GET /api/key with a session. */
export async function provision(
  app: RunningMain,
  issuer: ClerkIssuer,
  userId: string,
): Promise<string> {
  const res = await fetch(`${app.url}/api/key`, {
    headers: bearer(await issuer.token(userId, { ttlSeconds: 600 })),
  });
  assert.equal(res.status, 200, `GET /api/key for ${userId}`);
  return (await res.json()).apiKey;
}

/** POST /v1/chat/completions: JSON, or streamed (held by the fake when it holds streams). */
export function chat(
  app: RunningMain,
  key: string,
  options: { stream?: boolean; content?: string } = {},
): Promise<Response> {
  return fetch(`${app.url}/v1/chat/completions`, {
    method: "POST",
    headers: { ...bearer(key), "content-type": "application/json" },
    body: JSON.stringify({
      model: "glm-4.6",
      messages: [{ role: "user", content: options.content ?? "hi" }],
      ...(options.stream ? { stream: true, max_tokens: 50 } : {}),
    }),
  });
}

/** Today's usage as GET /api/usage tells the key's owner. */
export async function todayUsage(app: RunningMain, key: string) {
  const res = await fetch(`${app.url}/api/usage?days=1`, { headers: bearer(key) });
  assert.equal(res.status, 200, "GET /api/usage");
  const { requests, promptTokens, completionTokens } = (await res.json()).today;
  return { requests, promptTokens, completionTokens };
}
