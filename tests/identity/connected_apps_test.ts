/**
 * Connected apps' keys in one process (CONTRACT §5 Keys, Connecting an editor; §7 Events):
 * MAX_KEYS_PER_USER stops an approval with a page that says why and creates nothing; rotation
 * touches the default key only; disabling or deleting the user refuses every key; key.created
 * and key.revoked reach the operator's backend; the approval pages name the account.
 */
import assert from "node:assert/strict";
import { randomToken } from "../../lib/core/encoding.ts";
import { s256 } from "../../lib/identity/connect.ts";
import type { KeysBody } from "../../lib/api_types.ts";
import { keys as kvKeys } from "../../lib/core/kv.ts";
import { recordUsage } from "../../lib/usage/usage.ts";
import { EVENTS_SECRET, Receiver } from "../../testing/fakes/events_receiver.ts";
import { FakeGlm } from "../../testing/fakes/glm.ts";
import {
  clerkEnv,
  ClerkIssuer,
  eventually,
  formPost,
  PUBLIC_URL,
  type TestApp,
  testApp,
} from "../support/helpers.ts";

async function startDevice(app: TestApp, client: string) {
  const res = await app.request("/api/connect/device", {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ client }),
  });
  assert.equal(res.status, 200);
  return await res.json() as { deviceCode: string; userCode: string };
}

const poll = (app: TestApp, deviceCode: string) =>
  app.request("/api/connect/device/token", {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ deviceCode }),
  });

async function connectDevice(app: TestApp, token: string, client: string): Promise<string> {
  const { deviceCode, userCode } = await startDevice(app, client);
  const approved = await app.request(
    "/connect/device",
    formPost(token, { code: userCode, action: "approve" }),
  );
  assert.equal(approved.status, 200);
  await approved.body?.cancel();
  const res = await poll(app, deviceCode);
  assert.equal(res.status, 200);
  return (await res.json()).apiKey;
}

function pkceFields(challenge: string, client = "VS Code") {
  return {
    client,
    redirect_uri: "http://127.0.0.1:53123/cb",
    code_challenge: challenge,
    code_challenge_method: "S256",
  };
}

const models = (app: TestApp, key: string) =>
  app.request("/v1/models", { headers: { authorization: `Bearer ${key}` } });

async function keyIndexSize(kv: Deno.Kv) {
  let n = 0;
  for await (const _ of kv.list({ prefix: ["keys_by_hash"] })) n++;
  return n;
}

Deno.test("connected apps: at MAX_KEYS_PER_USER the approval pages say why and nothing is created", async () => {
  const app = await testApp({ MAX_KEYS_PER_USER: "3" });
  try {
    const { token } = await app.services.sessions.issueLocal("max@example.com");
    const session = { cookie: `__session=${token}` };
    await connectDevice(app, token, "One");
    await connectDevice(app, token, "Two"); // default + 2 = 3 keys
    const before = await keyIndexSize(app.kv);
    assert.equal(before, 3);

    // Device: the look-up says why, the approval refuses, the editor keeps waiting.
    const { deviceCode, userCode } = await startDevice(app, "Three");
    const lookup = await app.request(
      "/connect/device",
      formPost(token, { code: userCode, action: "lookup" }),
    );
    assert.equal(lookup.status, 200);
    const page = await lookup.text();
    assert.match(page, /already holds 3 keys, the most it may have/);
    assert.match(page, /href="\/dashboard#connected-apps"/);
    assert.doesNotMatch(page, /value="approve"/, "no approve button");
    const approve = await app.request(
      "/connect/device",
      formPost(token, { code: userCode, action: "approve" }),
    );
    assert.equal(approve.status, 403);
    assert.match(await approve.text(), /Nothing was created/);
    assert.equal((await (await poll(app, deviceCode)).json()).error.code, "authorization_pending");

    // PKCE: the same, and no redirect with a code.
    const challenge = await s256(randomToken(48));
    const get = await app.request(`/connect?${new URLSearchParams(pkceFields(challenge))}`, {
      headers: session,
    });
    assert.equal(get.status, 200);
    assert.match(await get.text(), /already holds 3 keys/);
    const post = await app.request(
      "/connect",
      formPost(token, { ...pkceFields(challenge), decision: "approve" }),
    );
    assert.equal(post.status, 403);
    assert.equal(post.headers.get("location"), null);
    await post.body?.cancel();

    assert.equal(await keyIndexSize(app.kv), before, "no key was created");
    const listed = await (await app.request("/api/keys", { headers: session })).json() as KeysBody;
    assert.equal(listed.keys.length, 3);
  } finally {
    await app.close();
  }
});

Deno.test("connected apps: rotation is the default key's; disable and delete refuse every key", async () => {
  const app = await testApp();
  try {
    const { token } = await app.services.sessions.issueLocal("life@example.com");
    const session = { cookie: `__session=${token}`, origin: PUBLIC_URL };
    const appKey = await connectDevice(app, token, "CLI");
    const before = await (await app.request("/api/key", { headers: session })).json();
    const rotated = await app.request("/api/key/rotate", { method: "POST", headers: session });
    assert.equal(rotated.status, 200);
    const after = await rotated.json();
    assert.equal((await models(app, before.apiKey)).status, 401, "old default key stopped");
    assert.equal((await models(app, after.apiKey)).status, 200);
    assert.equal((await models(app, appKey)).status, 200, "the app's key is untouched");
    const ids = (await (await app.request("/api/keys", { headers: session })).json() as KeysBody)
      .keys.map((k) => k.id);
    assert.equal(ids[0], "default", "the default key keeps its id through rotation");

    await app.services.users.setStatus(before.userId, "disabled");
    const disabled = await models(app, appKey);
    assert.equal(disabled.status, 403);
    assert.equal((await disabled.json()).error.code, "user_disabled");
    await app.services.users.setStatus(before.userId, "active");
    assert.equal((await models(app, appKey)).status, 200);

    await app.services.users.markDeleted(before.userId);
    assert.equal((await models(app, appKey)).status, 401);
    assert.equal((await models(app, after.apiKey)).status, 401);
    assert.equal(await keyIndexSize(app.kv), 0, "every key's index entry is gone");
  } finally {
    await app.close();
  }
});

Deno.test("connected apps: key.created and key.revoked reach the operator's backend", async () => {
  const receiver = new Receiver();
  const glm = new FakeGlm();
  const app = await testApp({
    EVENTS_WEBHOOK_URL: receiver.url,
    EVENTS_WEBHOOK_SECRET: EVENTS_SECRET,
    GLM_BASE_URL: glm.baseUrl,
  });
  try {
    const { token } = await app.services.sessions.issueLocal("ev@example.com");
    const session = { cookie: `__session=${token}`, origin: PUBLIC_URL };
    const appKey = await connectDevice(app, token, "Zed");
    const { keys } = await (await app.request("/api/keys", { headers: session }))
      .json() as KeysBody;
    const res = await app.request(`/api/keys/${keys[1].id}`, {
      method: "DELETE",
      headers: session,
    });
    assert.equal(res.status, 200);
    await res.body?.cancel();
    const of = (type: string) => receiver.deliveries.find((d) => d.body.type === type)?.body;
    await eventually(() => of("key.revoked") !== undefined, 5000, () => receiver.deliveries);
    for (const type of ["key.created", "key.revoked"]) {
      const event = of(type)!;
      assert.equal(event.keyId, keys[1].id);
      assert.equal(event.name, "Zed");
      assert.equal(event.keyPrefix, appKey.slice(0, 7));
      assert.ok(!JSON.stringify(event).includes(appKey), "never the key itself");
    }
  } finally {
    await app.close();
    await receiver.close();
    await glm.close();
  }
});

Deno.test("connected apps: the operator's per-user page has a column per key", async () => {
  const issuer = await ClerkIssuer.create();
  const glm = new FakeGlm();
  const app = await testApp(
    clerkEnv(issuer, { ADMIN_USER_IDS: "user_op", GLM_BASE_URL: glm.baseUrl }),
  );
  try {
    const token = await issuer.token("user_x", { ttlSeconds: 600 });
    const key = await connectDevice(app, token, "Helix <editor>");
    const chat = await app.request("/v1/chat/completions", {
      method: "POST",
      headers: { authorization: `Bearer ${key}`, "content-type": "application/json" },
      body: JSON.stringify({ model: "glm-4.6", messages: [{ role: "user", content: "hi" }] }),
    });
    assert.equal(chat.status, 200);
    await chat.arrayBuffer();
    const op = await issuer.token("user_op", { ttlSeconds: 600 });
    const page = await app.request("/admin/users/user_x", {
      headers: { cookie: `__session=${op}` },
    });
    assert.equal(page.status, 200);
    const html = await page.text();
    const table = html.slice(html.indexOf('data-testid="user-keys"'));
    assert.match(table, /Default key/);
    assert.match(table, /Helix &lt;editor>/, "the name, escaped");
    assert.match(table, /<td class="num" data-label="Requests">1<\/td>/);
    // The operator's list counts every key: the default one and the app's.
    const list = await app.request("/api/admin/users?query=user_x", {
      headers: { authorization: `Bearer ${op}` },
    });
    assert.equal(list.status, 200);
    const { users } = await list.json();
    assert.deepEqual(users.map((u: { userId: string; keys: number }) => [u.userId, u.keys]), [
      ["user_x", 2],
    ]);
  } finally {
    await app.close();
    await glm.close();
  }
});

Deno.test("connected apps: a revoked key's last use, written again by a request that settled after the revocation, is dropped at the next listing", async () => {
  const app = await testApp();
  try {
    const { token } = await app.services.sessions.issueLocal("late@example.com");
    const session = { cookie: `__session=${token}`, origin: PUBLIC_URL };
    await connectDevice(app, token, "Zed");
    await connectDevice(app, token, "Helix");
    const { keys: listed } = await (await app.request("/api/keys", { headers: session }))
      .json() as KeysBody;
    const [, gone, kept] = listed;
    const { userId } = await (await app.request("/api/key", { headers: session })).json();
    await app.services.users.revokeAppKey(userId, gone.id);
    const lastUse = (id: string) => app.kv.get(kvKeys.keyLastUsed(userId, id));
    assert.equal((await lastUse(gone.id)).value, null, "the revocation drops it");
    // Requests of both keys settle after the revocation (a KV `max` writes the last use again).
    for (const keyId of [gone.id, kept.id]) {
      await recordUsage(app.kv, app.services.config.pricing, {
        userId,
        keyId,
        model: "glm-4.6",
        promptTokens: 3,
        completionTokens: 2,
      });
    }
    assert.notEqual((await lastUse(gone.id)).value, null);
    const after = await (await app.request("/api/keys", { headers: session })).json() as KeysBody;
    assert.deepEqual(after.keys.map((k) => k.id), ["default", kept.id]);
    assert.equal((await lastUse(gone.id)).value, null, "dropped by the listing");
    assert.notEqual((await lastUse(kept.id)).value, null, "a held key's last use stays");
    assert.notEqual(after.keys[1].lastUsedAt, null);
  } finally {
    await app.close();
  }
});
