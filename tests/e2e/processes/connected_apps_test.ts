/**
 * Connected apps across real app processes on one KV file (CONTRACT §5 Keys, Connecting an
 * editor): every approval — two device codes and one PKCE redirect — creates its own working key
 * beside the default one; GET /api/keys lists all four; revoking one on process A is refused at
 * once on process B while the others keep working; `byKey` splits the usage exactly; and the
 * user's one set of limits covers all their keys together.
 */
import assert from "node:assert/strict";
import { randomToken } from "../../../lib/core/encoding.ts";
import { s256 } from "../../../lib/identity/connect.ts";
import type { KeysBody, UsageBody } from "../../../lib/api_types.ts";
import { formPost, processEnv } from "../../support/helpers.ts";
import { ClerkIssuer } from "../../../testing/fakes/clerk_issuer.ts";
import { FakeGlm } from "../../../testing/fakes/glm.ts";
import { type RunningMain, startMain } from "../../support/subprocess.ts";

const issuer = await ClerkIssuer.create();
const REDIRECT = "http://127.0.0.1:53123/callback";

async function post(app: RunningMain, path: string, body: unknown): Promise<Response> {
  return await fetch(`${app.url}${path}`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify(body),
  });
}

/** The device flow as an editor and its user run it: start, look up, approve, poll. */
async function connectDevice(app: RunningMain, token: string, client: string): Promise<string> {
  const start = await post(app, "/api/connect/device", { client });
  assert.equal(start.status, 200);
  const { deviceCode, userCode } = await start.json();
  const lookup = await fetch(
    `${app.url}/connect/device`,
    formPost(token, { code: userCode, action: "lookup" }),
  );
  assert.equal(lookup.status, 200);
  assert.match(await lookup.text(), /says it is/);
  const approved = await fetch(
    `${app.url}/connect/device`,
    formPost(token, { code: userCode, action: "approve" }),
  );
  assert.equal(approved.status, 200);
  assert.match(await approved.text(), /is connected/);
  const polled = await post(app, "/api/connect/device/token", { deviceCode });
  assert.equal(polled.status, 200);
  return (await polled.json()).apiKey;
}

/** The PKCE redirect flow: approve on the page, exchange the code with the verifier. */
async function connectRedirect(app: RunningMain, token: string, client: string): Promise<string> {
  const verifier = randomToken(48);
  const res = await fetch(
    `${app.url}/connect`,
    formPost(token, {
      client,
      redirect_uri: REDIRECT,
      code_challenge: await s256(verifier),
      code_challenge_method: "S256",
      state: "s",
      decision: "approve",
    }),
  );
  assert.equal(res.status, 303, await res.text());
  const code = new URL(res.headers.get("location")!).searchParams.get("code")!;
  const exchanged = await post(app, "/api/connect/token", { code, code_verifier: verifier });
  assert.equal(exchanged.status, 200);
  return (await exchanged.json()).apiKey;
}

function chat(app: RunningMain, key: string): Promise<Response> {
  return fetch(`${app.url}/v1/chat/completions`, {
    method: "POST",
    headers: { authorization: `Bearer ${key}`, "content-type": "application/json" },
    body: JSON.stringify({ model: "glm-4.6", messages: [{ role: "user", content: "hi" }] }),
  });
}

/** The status, once the whole answer is read (its usage is committed by then). */
async function status(res: Promise<Response>): Promise<number> {
  const r = await res;
  await r.arrayBuffer();
  return r.status;
}

async function startTwo(dir: string, glm: FakeGlm, extra: Record<string, string> = {}) {
  const env = processEnv(`${dir}/kv.sqlite3`, glm, issuer, extra);
  return await Promise.all([startMain(env, dir), startMain(env, dir)]);
}

Deno.test("connected apps: own keys per approval, listed, revoked at once on another process, usage split exactly", async () => {
  const dir = await Deno.makeTempDir();
  const glm = new FakeGlm();
  const apps: RunningMain[] = [];
  try {
    apps.push(...await startTwo(dir, glm));
    const [a, b] = apps;
    const token = await issuer.token("user_apps", { ttlSeconds: 600 });
    const session = { authorization: `Bearer ${token}` };
    const defaultKey = (await (await fetch(`${a.url}/api/key`, { headers: session })).json())
      .apiKey as string;

    const laptop = await connectDevice(a, token, "Laptop CLI");
    const server = await connectDevice(b, token, "Laptop CLI"); // the same client, twice
    const editor = await connectRedirect(a, token, "VS Code");
    const all = [defaultKey, laptop, server, editor];
    assert.equal(new Set(all).size, 4, "four distinct keys");

    const listed = await fetch(`${b.url}/api/keys`, { headers: session });
    assert.equal(listed.status, 200);
    assert.match(listed.headers.get("content-type") ?? "", /application\/json/);
    const { keys } = await listed.json() as KeysBody;
    assert.equal(keys.length, 4);
    assert.deepEqual(keys.map((k) => k.default), [true, false, false, false]);
    assert.equal(keys[0].id, "default");
    assert.deepEqual(keys.map((k) => k.name), [
      "Default key",
      "Laptop CLI",
      "Laptop CLI (2)",
      "VS Code",
    ]);
    assert.deepEqual(keys.map((k) => k.keyPrefix), all.map((k) => k.slice(0, 7)));
    for (const k of keys.slice(1)) assert.match(k.id, /^k_[A-Za-z0-9_-]{22}$/);
    assert.ok(keys.every((k) => k.lastUsedAt === null));
    assert.ok(!JSON.stringify(keys).includes("kw_" + all[1].slice(3, 20)), "no secrets listed");

    // Each key works, on either process: 1, 2, 3 and 4 requests.
    const plan = all.map((key, i) => ({ key, n: i + 1 }));
    for (const { key, n } of plan) {
      for (let i = 0; i < n; i++) assert.equal(await status(chat(i % 2 ? a : b, key)), 200);
    }
    const usage = await (await fetch(`${a.url}/api/usage?days=1`, { headers: session }))
      .json() as UsageBody;
    assert.deepEqual(
      usage.byKey.map((r) => [r.keyId, r.requests, r.totalTokens]),
      keys.map((k, i) => [k.id, i + 1, (i + 1) * 18]),
    );
    assert.equal(usage.byKey.reduce((s, r) => s + r.requests, 0), usage.today.requests);
    assert.equal(usage.byKey.reduce((s, r) => s + r.totalTokens, 0), usage.today.totalTokens);
    const cost = usage.byKey.reduce((s, r) => s + r.costUsd, 0);
    assert.ok(Math.abs(cost - usage.today.costUsd) < 1e-8, `${cost} vs ${usage.today.costUsd}`);
    const afterUse =
      (await (await fetch(`${a.url}/api/keys`, { headers: session })).json() as KeysBody)
        .keys;
    assert.ok(afterUse.every((k) => k.lastUsedAt !== null), "last use recorded for every key");
    assert.deepEqual(afterUse.map((k) => k.usage30d.requests), [1, 2, 3, 4]);

    // B has just served every key (its caches are warm). Revoked on A: refused on B at once.
    const revoked = await fetch(`${a.url}/api/keys/${keys[2].id}`, {
      method: "DELETE",
      headers: session,
    });
    assert.equal(revoked.status, 200);
    assert.deepEqual(await revoked.json(), { ok: true });
    const refused = await chat(b, server);
    assert.equal(refused.status, 401);
    assert.equal((await refused.json()).error.code, "invalid_api_key");
    for (const key of [defaultKey, laptop, editor]) assert.equal(await status(chat(b, key)), 200);
    const left = (await (await fetch(`${b.url}/api/keys`, { headers: session })).json() as KeysBody)
      .keys;
    assert.deepEqual(left.map((k) => k.id), [keys[0].id, keys[1].id, keys[3].id]);
    // Its past usage still adds up, under its name.
    const after = await (await fetch(`${b.url}/api/usage?days=1`, { headers: session }))
      .json() as UsageBody;
    const gone = after.byKey.find((r) => r.keyId === keys[2].id)!;
    assert.equal(gone.name, "Laptop CLI (2) (revoked)");
    assert.equal(gone.requests, 3);
    assert.equal(after.byKey.reduce((s, r) => s + r.requests, 0), after.today.requests);

    // The default key cannot be deleted; another user's key id is not found.
    const def = await fetch(`${a.url}/api/keys/default`, { method: "DELETE", headers: session });
    assert.equal(def.status, 400);
    assert.equal((await def.json()).error.code, "invalid_request");
    const other = await issuer.token("user_other", { ttlSeconds: 600 });
    const foreign = await fetch(`${a.url}/api/keys/${keys[1].id}`, {
      method: "DELETE",
      headers: { authorization: `Bearer ${other}` },
    });
    assert.equal(foreign.status, 404);
    assert.equal((await foreign.json()).error.code, "not_found");
    assert.equal(await status(chat(a, laptop)), 200, "still working");

    // An app may revoke its own key with it ("disconnect"), and no other key.
    const notItself = await fetch(`${a.url}/api/keys/${keys[1].id}`, {
      method: "DELETE",
      headers: { authorization: `Bearer ${editor}` },
    });
    assert.equal(notItself.status, 403);
    await notItself.body?.cancel();
    const itself = await fetch(`${a.url}/api/keys/${keys[3].id}`, {
      method: "DELETE",
      headers: { authorization: `Bearer ${editor}` },
    });
    assert.equal(itself.status, 200);
    await itself.body?.cancel();
    assert.equal(await status(chat(b, editor)), 401);
  } finally {
    for (const app of apps) await app.stop();
    await glm.close();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("connected apps: limits are per user, not per key — rpm 5 over three keys admits exactly 5", async () => {
  const dir = await Deno.makeTempDir();
  const glm = new FakeGlm();
  glm.jsonDelayMs = 100;
  const apps: RunningMain[] = [];
  try {
    apps.push(...await startTwo(dir, glm, { RATE_LIMIT_RPM: "5" }));
    const [a, b] = apps;
    const token = await issuer.token("user_rpm", { ttlSeconds: 600 });
    const session = { authorization: `Bearer ${token}` };
    const defaultKey = (await (await fetch(`${a.url}/api/key`, { headers: session })).json())
      .apiKey as string;
    const keys = [
      defaultKey,
      await connectDevice(a, token, "CLI"),
      await connectRedirect(b, token, "VS Code"),
    ];
    // 15 requests at once, 5 per key, spread over both processes.
    const statuses = await Promise.all(
      Array.from({ length: 15 }, (_, i) => status(chat(i % 2 ? a : b, keys[i % 3]))),
    );
    assert.equal(statuses.filter((s) => s === 200).length, 5, statuses.join(","));
    assert.equal(statuses.filter((s) => s === 429).length, 10, statuses.join(","));
    const usage = await (await fetch(`${a.url}/api/usage?days=1`, { headers: session }))
      .json() as UsageBody;
    assert.equal(usage.today.requests, 5);
    assert.equal(usage.byKey.reduce((s, r) => s + r.requests, 0), 5);
  } finally {
    for (const app of apps) await app.stop();
    await glm.close();
    await Deno.remove(dir, { recursive: true });
  }
});
