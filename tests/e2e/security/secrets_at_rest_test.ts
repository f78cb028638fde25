/**
 * Secrets at rest and in transit, against a real server process on a KV file: no plaintext
 * user key and no master key in KV (structured or raw bytes), and the master key in no
 * response body and no log line.
 */
import assert from "node:assert/strict";
import { Webhook } from "svix";
import { ClerkIssuer } from "../../../testing/fakes/clerk_issuer.ts";
import { ENCRYPTION_SECRET, MASTER_KEY } from "../../support/helpers.ts";
import { type RunningMain, startMain } from "../../support/subprocess.ts";

const issuer = await ClerkIssuer.create();
const WEBHOOK_SECRET = "whsec_" + btoa("keyway-secrets-test-webhook-key!");

interface Seen {
  /** Every user key any response handed out (including rotated-away ones). */
  userKeys: Set<string>;
  /** Every response body, for the master-key check. */
  bodies: string[];
  userIds: string[];
}

async function call(server: RunningMain, seen: Seen, path: string, init?: RequestInit) {
  const res = await fetch(server.url + path, init);
  const text = await res.text();
  seen.bodies.push(`${init?.method ?? "GET"} ${path} ${res.status}\n${text}`);
  if (res.headers.get("content-type")?.includes("application/json")) {
    try {
      const body = JSON.parse(text);
      if (typeof body?.apiKey === "string") seen.userKeys.add(body.apiKey);
    } catch {
      // Not JSON after all: only the text matters here.
    }
  }
  return { status: res.status, text };
}

/** Reads every KV entry with Deno.openKv and every file's raw bytes. */
async function readAtRest(dir: string, kvPath: string) {
  const raw: string[] = [];
  for await (const file of Deno.readDir(dir)) {
    if (!file.isFile) continue;
    // latin1 keeps every byte as one character, so ASCII secrets are found wherever they sit.
    raw.push(new TextDecoder("latin1").decode(await Deno.readFile(`${dir}/${file.name}`)));
  }
  const kv = await Deno.openKv(kvPath);
  const entries: string[] = [];
  try {
    for await (const entry of kv.list({ prefix: [] })) {
      entries.push(JSON.stringify({ key: entry.key, value: entry.value }, (_k, v) => {
        if (v instanceof Deno.KvU64) return `u64:${v.value}`;
        if (typeof v === "bigint") return `bigint:${v}`;
        if (v instanceof Uint8Array) return `bytes:${new TextDecoder("latin1").decode(v)}`;
        return v;
      }));
    }
  } finally {
    kv.close();
  }
  return { raw: raw.join("\n"), entries };
}

function assertNowhere(haystacks: string[], needle: string, what: string) {
  for (const hay of haystacks) {
    assert.ok(!hay.includes(needle), `${what} found in:\n${hay.slice(0, 400)}`);
  }
}

Deno.test("secrets: Clerk mode server on a KV file", async () => {
  const dir = await Deno.makeTempDir({ prefix: "keyway_secrets_" });
  const kvPath = `${dir}/keyway.sqlite3`;
  const seen: Seen = { userKeys: new Set(), bodies: [], userIds: [] };
  let server: RunningMain | undefined;
  try {
    server = await startMain({
      PORT: "0",
      DENO_KV_PATH: kvPath,
      PUBLIC_URL: "http://localhost:8000",
      GLM_API_KEY: MASTER_KEY,
      KEY_ENCRYPTION_SECRET: ENCRYPTION_SECRET,
      CLERK_JWT_KEY: issuer.publicKeyPem,
      CLERK_WEBHOOK_SECRET: WEBHOOK_SECRET,
    }, dir);
    const auth = async (userId: string) => ({
      authorization: `Bearer ${await issuer.token(userId)}`,
    });

    assert.equal((await call(server, seen, "/health")).status, 200);
    for (const userId of ["user_s1", "user_s2", "user_s3"]) {
      seen.userIds.push(userId);
      assert.equal(
        (await call(server, seen, "/api/key", { method: "POST", headers: await auth(userId) }))
          .status,
        201,
      );
      assert.equal(
        (await call(server, seen, "/api/key", { headers: await auth(userId) })).status,
        200,
      );
    }
    for (const userId of ["user_s1", "user_s2", "user_s1"]) {
      const res = await call(server, seen, "/api/key/rotate", {
        method: "POST",
        headers: await auth(userId),
      });
      assert.equal(res.status, 200);
    }
    // A webhook-provisioned user, then a deleted one.
    const payload = JSON.stringify({
      type: "user.created",
      object: "event",
      data: {
        id: "user_s4",
        email_addresses: [{ id: "idn_1", email_address: "s4@example.com" }],
        primary_email_address_id: "idn_1",
        first_name: "Four",
        last_name: null,
      },
    });
    const now = new Date();
    const hook = await call(server, seen, "/api/webhooks/clerk", {
      method: "POST",
      headers: {
        "svix-id": "msg_s4",
        "svix-timestamp": String(Math.floor(now.getTime() / 1000)),
        "svix-signature": new Webhook(WEBHOOK_SECRET).sign("msg_s4", now, payload),
      },
      body: payload,
    });
    assert.equal(hook.status, 200, hook.text);
    seen.userIds.push("user_s4");
    assert.equal(
      (await call(server, seen, "/api/key", { headers: await auth("user_s4") })).status,
      200,
    );
    // Error paths and the other surfaces must not leak either.
    await call(server, seen, "/api/key", { headers: { authorization: "Bearer nope" } });
    await call(server, seen, "/api/does-not-exist");
    await call(server, seen, "/v1/models", {
      headers: { authorization: `Bearer ${[...seen.userKeys][0]}` },
    });
    await call(server, seen, "/v1/chat/completions", {
      method: "POST",
      headers: { authorization: "Bearer kw_wrong", "content-type": "application/json" },
      body: JSON.stringify({ model: "glm-4.6", messages: [{ role: "user", content: "hi" }] }),
    });
    await call(server, seen, "/");
    await call(server, seen, "/sign-in");

    assert.equal(seen.userKeys.size, 4 + 3, "four users, three rotations");
  } finally {
    await server?.stop();
  }
  try {
    const out = server!.output();
    assert.match(out.stdout, /"keyway listening"/);
    const logs = [out.stdout, out.stderr];
    const { raw, entries } = await readAtRest(dir, kvPath);

    // Positive controls: the search would find what is stored.
    assert.ok(entries.length > 0);
    for (const userId of seen.userIds) {
      assert.ok(raw.includes(userId), `raw bytes should contain ${userId}`);
      assert.ok(entries.some((e) => e.includes(userId)));
    }
    assert.ok(raw.includes("s4@example.com"), "raw search sees stored e-mail addresses");

    assertNowhere([raw, ...entries], MASTER_KEY, "the master key in KV");
    assertNowhere([raw, ...entries], ENCRYPTION_SECRET, "the encryption secret in KV");
    for (const key of seen.userKeys) {
      // The random part alone is as secret as the whole key.
      assertNowhere([raw, ...entries], key.slice(3), `a user key (${key.slice(0, 7)}…) in KV`);
      assertNowhere(logs, key.slice(3), `a user key (${key.slice(0, 7)}…) in the logs`);
    }
    assertNowhere(seen.bodies, MASTER_KEY, "the master key in a response");
    assertNowhere(logs, MASTER_KEY, "the master key in the logs");
    assertNowhere(logs, ENCRYPTION_SECRET, "the encryption secret in the logs");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("secrets: local mode server on a KV file", async () => {
  const dir = await Deno.makeTempDir({ prefix: "keyway_secrets_local_" });
  const kvPath = `${dir}/keyway.sqlite3`;
  const seen: Seen = { userKeys: new Set(), bodies: [], userIds: [] };
  let server: RunningMain | undefined;
  try {
    const running = await startMain(
      { PORT: "0", DENO_KV_PATH: kvPath, GLM_API_KEY: MASTER_KEY },
      dir,
    );
    server = running;
    for (const email of ["a@example.com", "b@example.com"]) {
      const res = await fetch(running.url + "/auth/local/sign-in", {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ email }),
      });
      assert.equal(res.status, 200);
      await res.body?.cancel();
      const cookie = (res.headers.get("set-cookie") ?? "").split(";")[0];
      assert.equal(
        (await call(running, seen, "/api/key", { method: "POST", headers: { cookie } })).status,
        201,
      );
      assert.equal(
        (await call(running, seen, "/api/key/rotate", { method: "POST", headers: { cookie } }))
          .status,
        200,
      );
    }
    await call(running, seen, "/");
    assert.equal(seen.userKeys.size, 4);
  } finally {
    await server?.stop();
  }
  try {
    const out = server!.output();
    const logs = [out.stdout, out.stderr];
    const { raw, entries } = await readAtRest(dir, kvPath);
    assert.ok(raw.includes("user_local_"), "positive control: user ids are in the raw bytes");
    assertNowhere([raw, ...entries], MASTER_KEY, "the master key in KV");
    for (const key of seen.userKeys) {
      assertNowhere([raw, ...entries], key.slice(3), `a user key (${key.slice(0, 7)}…) in KV`);
      assertNowhere(logs, key.slice(3), "a user key in the logs");
    }
    assertNowhere(seen.bodies, MASTER_KEY, "the master key in a response");
    assertNowhere(logs, MASTER_KEY, "the master key in the logs");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
