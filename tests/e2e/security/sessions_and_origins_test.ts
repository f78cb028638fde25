/**
 * Security findings, each reproduced against a real server process: local mode's Host
 * guard (DNS rebinding), owner-only KV files, server-side sign-out, the sign-in redirect, pending
 * Clerk sessions, JWKS fetches that junk tokens cannot multiply, and the CSRF origin rule.
 */
import assert from "node:assert/strict";
import { ClerkIssuer } from "../../../testing/fakes/clerk_issuer.ts";
import { FakeClerkApi } from "../../../testing/fakes/clerk_api.ts";
import { ENCRYPTION_SECRET } from "../../support/helpers.ts";
import { type RunningMain, startMain } from "../../support/subprocess.ts";

const issuer = await ClerkIssuer.create();
/** Signs with its own key under its own kid: a well-formed token Clerk never issued. */
const stranger = await ClerkIssuer.create();

interface RawResponse {
  status: number;
  headers: Headers;
  body: string;
}

/**
 * One HTTP/1.1 request over a plain socket: fetch always sends the URL's own Host, and these
 * tests need the Host a DNS-rebinding page or a reverse proxy would send.
 */
async function rawRequest(
  server: RunningMain,
  host: string,
  method: string,
  path: string,
  headers: Record<string, string> = {},
  body = "",
): Promise<RawResponse> {
  const url = new URL(server.url);
  const conn = await Deno.connect({ hostname: url.hostname, port: Number(url.port) });
  try {
    const payload = new TextEncoder().encode(body);
    const head = [
      `${method} ${path} HTTP/1.1`,
      `Host: ${host}`,
      "Connection: close",
      `Content-Length: ${payload.length}`,
      ...Object.entries(headers).map(([name, value]) => `${name}: ${value}`),
    ];
    let out = new Uint8Array([
      ...new TextEncoder().encode(`${head.join("\r\n")}\r\n\r\n`),
      ...payload,
    ]);
    while (out.length) out = out.subarray(await conn.write(out));
    const chunks: Uint8Array[] = [];
    const buf = new Uint8Array(64 * 1024);
    for (let n = await conn.read(buf); n !== null; n = await conn.read(buf)) {
      chunks.push(buf.slice(0, n));
    }
    const text = new TextDecoder().decode(new Uint8Array(chunks.flatMap((c) => [...c])));
    const split = text.indexOf("\r\n\r\n");
    const [statusLine, ...headerLines] = text.slice(0, split).split("\r\n");
    const parsed = new Headers();
    for (const line of headerLines) {
      const colon = line.indexOf(":");
      parsed.append(line.slice(0, colon).trim(), line.slice(colon + 1).trim());
    }
    const rest = text.slice(split + 4);
    return {
      status: Number(statusLine.split(" ")[1]),
      headers: parsed,
      body: parsed.get("transfer-encoding")?.includes("chunked") ? unchunk(rest) : rest,
    };
  } finally {
    conn.close();
  }
}

function unchunk(text: string): string {
  let out = "";
  for (let at = 0;;) {
    const eol = text.indexOf("\r\n", at);
    const size = parseInt(text.slice(at, eol), 16);
    if (!size) return out;
    out += text.slice(eol + 2, eol + 2 + size);
    at = eol + 2 + size + 2;
  }
}

function errorCode(body: string): string | undefined {
  return JSON.parse(body)?.error?.code;
}

/** Signs in locally (JSON) from a loopback origin; returns the `name=value` cookie. */
async function signIn(server: RunningMain, email: string): Promise<string> {
  const res = await fetch(`${server.url}/auth/local/sign-in`, {
    method: "POST",
    headers: { "content-type": "application/json", origin: server.url },
    body: JSON.stringify({ email }),
  });
  assert.equal(res.status, 200);
  await res.body?.cancel();
  const cookie = (res.headers.get("set-cookie") ?? "").split(";")[0];
  assert.match(cookie, /^__session=./);
  return cookie;
}

async function status(res: Promise<Response>): Promise<number> {
  const r = await res;
  await r.body?.cancel();
  return r.status;
}

async function withServer(
  env: Record<string, string>,
  fn: (server: RunningMain, dir: string) => Promise<void>,
) {
  const dir = await Deno.makeTempDir({ prefix: "keyway_security_" });
  const server = await startMain({ PORT: "0", DENO_KV_PATH: `${dir}/keyway.sqlite3`, ...env }, dir);
  try {
    await fn(server, dir);
  } finally {
    await server.stop();
    await Deno.remove(dir, { recursive: true });
  }
}

Deno.test("security (local mode process): Host guard, sign-out, sign-in redirect, CSRF", async (t) => {
  await withServer({}, async (server) => {
    const port = new URL(server.url).port;

    await t.step("a Host that is not a loopback name gets 403 forbidden everywhere", async () => {
      const json = { "content-type": "application/json" };
      const chat = JSON.stringify({
        model: "glm-4.6",
        messages: [{ role: "user", content: "hi" }],
      });
      const hosts = [
        "evil.example",
        `evil.example:${port}`,
        `localhost.evil.example:${port}`,
        `127.0.0.1.nip.io:${port}`,
        `user@localhost:${port}`,
      ];
      for (const host of hosts) {
        const page = await rawRequest(server, host, "GET", "/");
        assert.equal(page.status, 403, `/ via ${host}`);
        const key = await rawRequest(server, host, "GET", "/api/key");
        assert.equal(key.status, 403, `/api/key via ${host}`);
        assert.match(key.headers.get("content-type") ?? "", /application\/json/);
        assert.equal(errorCode(key.body), "forbidden");
        assert.match(
          key.headers.get("x-request-id") ?? "",
          /^[0-9a-f]{8}-/,
          "an id like any answer",
        );
      }
      const gateway = await rawRequest(server, "evil.example", "POST", "/v1/chat/completions", {
        ...json,
        authorization: "Bearer kw_x",
      }, chat);
      assert.equal(gateway.status, 403);
      assert.equal(errorCode(gateway.body), "forbidden");
      const messages = await rawRequest(server, "evil.example", "POST", "/v1/messages", json, "{}");
      assert.equal(messages.status, 403);
      const anthropic = JSON.parse(messages.body);
      assert.equal(anthropic.type, "error");
      assert.equal(anthropic.error.type, "permission_error");
      assert.equal(anthropic.error.code, "forbidden");
      const signIn = await rawRequest(server, "evil.example", "POST", "/auth/local/sign-in", {
        "content-type": "application/x-www-form-urlencoded",
        origin: "http://evil.example",
      }, "email=victim%40example.com");
      assert.equal(signIn.status, 403);
      assert.equal(signIn.headers.get("set-cookie"), null, "no session for a rebinding page");
    });

    await t.step("localhost, 127.0.0.1 and [::1] on any port are answered as usual", async () => {
      for (const host of [`localhost:${port}`, `127.0.0.1:${port}`, `[::1]:${port}`, "LOCALHOST"]) {
        assert.equal((await rawRequest(server, host, "GET", "/")).status, 200, host);
        const key = await rawRequest(server, host, "GET", "/api/key");
        assert.equal(key.status, 401, host);
        assert.equal(errorCode(key.body), "unauthorized");
      }
      const form = await rawRequest(server, `localhost:${port}`, "POST", "/auth/local/sign-in", {
        "content-type": "application/x-www-form-urlencoded",
        origin: `http://localhost:${port}`,
      }, "email=ann%40example.com");
      assert.equal(form.status, 303);
      assert.match(form.headers.get("set-cookie") ?? "", /^__session=/);
    });

    await t.step("sign-out ends the session server-side: a copied cookie gets 401", async () => {
      const cookie = await signIn(server, "grace@example.test");
      const other = await signIn(server, "grace@example.test");
      assert.equal(await status(fetch(`${server.url}/api/key`, { headers: { cookie } })), 200);
      // Sign-out stays CSRF-checked: a cross-site form cannot sign anyone out.
      const forged = await fetch(`${server.url}/auth/sign-out`, {
        method: "POST",
        headers: { cookie, "sec-fetch-site": "cross-site" },
        redirect: "manual",
      });
      assert.equal(forged.status, 403);
      await forged.body?.cancel();
      assert.equal(await status(fetch(`${server.url}/api/key`, { headers: { cookie } })), 200);

      const out = await fetch(`${server.url}/auth/sign-out`, {
        method: "POST",
        headers: { cookie, origin: server.url },
        redirect: "manual",
      });
      assert.equal(out.status, 303);
      await out.body?.cancel();
      const replay = await fetch(`${server.url}/api/key`, { headers: { cookie } });
      assert.equal(replay.status, 401);
      assert.equal((await replay.json()).error.code, "unauthorized");
      const page = await fetch(`${server.url}/dashboard`, {
        headers: { cookie },
        redirect: "manual",
      });
      assert.equal(page.status, 303);
      assert.equal(page.headers.get("location"), "/sign-in");
      await page.body?.cancel();
      // Only that session ended: the same person's other session still works.
      assert.equal(
        await status(fetch(`${server.url}/api/key`, { headers: { cookie: other } })),
        200,
      );
    });

    await t.step(
      "sign-in redirect: only a same-origin path, never a 500 or another host",
      async () => {
        const cases: Array<[string, string]> = [
          ["/\r\nSet-Cookie: x=1", "/dashboard"],
          ["/\r/evil.com", "/dashboard"],
          ["/\n/evil.com", "/dashboard"],
          ["/\t/evil.com", "/dashboard"],
          ["\t//evil.com", "/dashboard"],
          [" /evil", "/dashboard"],
          ["//evil.com", "/dashboard"],
          ["/\\evil.com", "/dashboard"],
          ["/x\\/evil.com", "/dashboard"],
          ["https://evil.com", "/dashboard"],
          ["javascript:alert(1)", "/dashboard"],
          ["/dashbo\u00e4rd", "/dashboard"],
          ["/connect?client=vscode&state=a%20b", "/connect?client=vscode&state=a%20b"],
          ["/", "/"],
        ];
        for (const [redirect, expected] of cases) {
          const res = await fetch(`${server.url}/auth/local/sign-in`, {
            method: "POST",
            headers: { "content-type": "application/x-www-form-urlencoded", origin: server.url },
            body: new URLSearchParams({ email: "ann@example.com", redirect }).toString(),
            redirect: "manual",
          });
          await res.body?.cancel();
          const what = JSON.stringify(redirect);
          assert.equal(res.status, 303, what);
          const location = res.headers.get("location") ?? "";
          assert.ok(
            location.startsWith("/") && !location.startsWith("//"),
            `${what} → ${location}`,
          );
          assert.equal(location, expected, what);
          assert.match(res.headers.get("set-cookie") ?? "", /^__session=/, what);
        }
      },
    );

    await t.step(
      "CSRF: cookie writes need a loopback Origin on this port, or same-origin",
      async () => {
        const cookie = await signIn(server, "csrf@example.test");
        const post = (headers: Record<string, string>) =>
          fetch(`${server.url}/api/key`, { method: "POST", headers: { cookie, ...headers } });
        const refused: Array<Record<string, string>> = [
          { "sec-fetch-site": "cross-site" },
          { "sec-fetch-site": "same-site" },
          { origin: "https://evil.example" },
          { origin: "null" },
          { origin: `http://evil.example:${port}` },
          { origin: `http://localhost:${Number(port) + 1}` },
          { origin: `https://localhost:${port}` },
        ];
        for (const headers of refused) {
          const res = await post(headers);
          assert.equal(res.status, 403, JSON.stringify(headers));
          assert.match(res.headers.get("content-type") ?? "", /application\/json/);
          assert.equal((await res.json()).error.code, "forbidden");
        }
        // Nothing was provisioned by the refused writes.
        assert.equal(await status(post({ origin: `http://localhost:${port}` })), 201);
        const allowed: Array<Record<string, string>> = [
          { origin: `http://127.0.0.1:${port}` },
          { origin: `http://[::1]:${port}` },
          { "sec-fetch-site": "same-origin" },
          { "sec-fetch-site": "none" },
          {}, // not a browser: no ambient cookie of a victim
        ];
        for (const headers of allowed) {
          assert.equal(await status(post(headers)), 200, JSON.stringify(headers));
        }
      },
    );
  });
});

Deno.test("security: the KV file and the folder Keyway creates are owner-only", async () => {
  if (Deno.build.os === "windows") return;
  const dir = await Deno.makeTempDir({ prefix: "keyway_security_kv_" });
  const folder = `${dir}/state/data`;
  const kvPath = `${folder}/keyway.sqlite3`;
  const mode = async (path: string) => (await Deno.stat(path)).mode! & 0o777;
  const files = async () => {
    const found: string[] = [];
    for await (const entry of Deno.readDir(folder)) found.push(`${folder}/${entry.name}`);
    return found;
  };
  const run = async () => {
    const server = await startMain({ PORT: "0", DENO_KV_PATH: kvPath }, dir);
    try {
      // A write, so SQLite's sidecar files exist too.
      const cookie = await signIn(server, "perm@example.test");
      assert.equal(await status(fetch(`${server.url}/api/key`, { headers: { cookie } })), 200);
      for (const path of [`${dir}/state`, folder]) assert.equal(await mode(path), 0o700, path);
      const created = await files();
      assert.ok(created.includes(kvPath));
      for (const path of created) assert.equal(await mode(path), 0o600, path);
    } finally {
      await server.stop();
    }
  };
  try {
    await run();
    // A file that already existed with loose permissions is tightened on the next start.
    for (const path of await files()) await Deno.chmod(path, 0o644);
    await run();
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("security (Clerk process): pending sessions are signed out; CSRF origins never from Host", async (t) => {
  const PUBLIC = "https://keyway.example";
  await withServer({
    PUBLIC_URL: PUBLIC,
    CLERK_JWT_KEY: issuer.publicKeyPem,
    KEY_ENCRYPTION_SECRET: ENCRYPTION_SECRET,
  }, async (server) => {
    const token = (sub: string, claims: Record<string, unknown> = {}) =>
      issuer.token(sub, { azp: PUBLIC, ttlSeconds: 300, claims });

    await t.step("sts: pending → 401 on /api/*, the dashboard sends to sign-in", async () => {
      const pending = await token("user_pending", { sts: "pending" });
      const res = await fetch(`${server.url}/api/key`, {
        headers: { authorization: `Bearer ${pending}` },
      });
      assert.equal(res.status, 401);
      assert.equal((await res.json()).error.code, "unauthorized");
      const page = await fetch(`${server.url}/dashboard`, {
        headers: { cookie: `__session=${pending}` },
        redirect: "manual",
      });
      assert.equal(page.status, 303);
      assert.equal(page.headers.get("location"), "/sign-in");
      await page.body?.cancel();
      // The same user's active session works.
      const active = await token("user_pending", { sts: "active" });
      const ok = await fetch(`${server.url}/api/key`, {
        headers: { authorization: `Bearer ${active}` },
      });
      assert.equal(ok.status, 200);
      await ok.body?.cancel();
    });

    await t.step("an Origin matching the Host is no proof: only PUBLIC_URL's origin", async () => {
      const cookie = `__session=${await token("user_csrf")}`;
      const viaHost = await fetch(`${server.url}/api/key`, {
        method: "POST",
        headers: { cookie, origin: server.url },
      });
      assert.equal(viaHost.status, 403);
      assert.equal((await viaHost.json()).error.code, "forbidden");
      const rebound = await rawRequest(server, "evil.example", "POST", "/api/key", {
        cookie,
        origin: "http://evil.example",
      });
      assert.equal(rebound.status, 403);
      assert.equal(errorCode(rebound.body), "forbidden");
      const noOrigin = await fetch(`${server.url}/api/key`, {
        method: "POST",
        headers: { cookie, "sec-fetch-site": "cross-site" },
      });
      assert.equal(noOrigin.status, 403);
      await noOrigin.body?.cancel();
      const same = await fetch(`${server.url}/api/key`, {
        method: "POST",
        headers: { cookie, origin: PUBLIC },
      });
      assert.equal(same.status, 201);
      await same.body?.cancel();
    });
  });
});

Deno.test("security (Clerk JWKS process): 200 junk tokens cause at most one JWKS fetch", async () => {
  const secretKey = "sk_test_securityJwksSecret0123456789";
  const fake = FakeClerkApi.start({ secretKey, issuer });
  fake.addUser({ id: "user_jwks_ok", email: "ok@example.com" });
  const jwksFetches = () => fake.calls.filter((c) => c.path === "/v1/jwks").length;
  try {
    await withServer({
      PUBLIC_URL: "http://localhost:8000",
      CLERK_SECRET_KEY: secretKey,
      CLERK_API_URL: fake.url,
      KEY_ENCRYPTION_SECRET: ENCRYPTION_SECRET,
    }, async (server) => {
      const now = Math.floor(Date.now() / 1000);
      const refused = async (token: string, what: string) => {
        const res = await fetch(`${server.url}/api/key`, {
          headers: { authorization: `Bearer ${token}` },
        });
        assert.equal(res.status, 401, what);
        assert.equal((await res.json()).error.code, "unauthorized", what);
      };
      const unknownKid = () => ({ header: { kid: "ins_" + crypto.randomUUID() } });

      // Tokens that cannot be valid whatever the key: never a fetch.
      const hopeless: Array<[string, () => Promise<string>]> = [
        ["junk", () => Promise.resolve(crypto.randomUUID())],
        ["three junk parts", () => Promise.resolve(`a.${crypto.randomUUID()}.c`)],
        ["expired", () => stranger.token("u", { ...unknownKid(), claims: { exp: now - 60 } })],
        [
          "not yet valid",
          () => stranger.token("u", { ...unknownKid(), claims: { nbf: now + 60 } }),
        ],
        ["wrong azp", () => stranger.token("u", { ...unknownKid(), azp: "https://evil.example" })],
        [
          "http iss",
          () => stranger.token("u", { ...unknownKid(), claims: { iss: "http://x.test" } }),
        ],
        ["no iss", () => stranger.token("u", { ...unknownKid(), claims: { iss: undefined } })],
        ["pending", () => stranger.token("u", { ...unknownKid(), claims: { sts: "pending" } })],
        ["alg none", () => stranger.token("u", { header: { alg: "none", kid: "x" } })],
        ["no kid", () => stranger.token("u", { header: { kid: undefined } })],
      ];
      for (let i = 0; i < 150; i++) {
        const [what, make] = hopeless[i % hopeless.length];
        await refused(await make(), what);
      }
      assert.equal(jwksFetches(), 0, "hopeless tokens fetched the JWKS");

      // Well-formed tokens under unknown kids, all at once: one fetch, then refused without one.
      const unknown = await Promise.all(
        Array.from({ length: 50 }, () => stranger.token("u", unknownKid())),
      );
      await Promise.all(unknown.map((token) => refused(token, "unknown kid")));
      assert.equal(jwksFetches(), 1);
      assert.equal(
        fake.calls.find((c) => c.path === "/v1/jwks")?.authorization,
        `Bearer ${secretKey}`,
      );

      // A genuine session still works, from the keys fetched once.
      const ok = await fetch(`${server.url}/api/key`, {
        headers: { authorization: `Bearer ${await issuer.token("user_jwks_ok")}` },
      });
      assert.equal(ok.status, 200);
      assert.equal((await ok.json()).userId, "user_jwks_ok");
      // Same kid, another key: the signature is checked.
      const impostor = await ClerkIssuer.create({ kid: issuer.kid });
      await refused(await impostor.token("user_jwks_ok"), "foreign signature under a known kid");
      assert.equal(jwksFetches(), 1);
    });
  } finally {
    await fake.close();
  }
});
