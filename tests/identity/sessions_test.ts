import assert from "node:assert/strict";
import { FakeClerkApi } from "../../testing/fakes/clerk_api.ts";
import {
  bearer,
  clerkEnv,
  ClerkIssuer,
  ENCRYPTION_SECRET,
  json,
  testApp,
} from "../support/helpers.ts";

const issuer = await ClerkIssuer.create();
// Same kid as the real issuer, different key pair: only the signature tells them apart.
const impostor = await ClerkIssuer.create({ kid: issuer.kid });

async function expectUnauthorized(res: Response, what: string) {
  assert.equal(res.status, 401, what);
  assert.match(res.headers.get("content-type") ?? "", /application\/json/, what);
  const body = await json<{ error: { code: string; message: string } }>(res);
  assert.deepEqual(Object.keys(body), ["error"], what);
  assert.equal(body.error.code, "unauthorized", what);
  assert.equal(typeof body.error.message, "string", what);
}

Deno.test("sessions (networkless, CLERK_JWT_KEY)", async (t) => {
  const app = await testApp(clerkEnv(issuer));
  const now = () => Math.floor(Date.now() / 1000);
  const key = (headers?: HeadersInit) => app.request("/api/key", { method: "POST", headers });
  try {
    await t.step("rejected tokens → 401 unauthorized", async () => {
      const cases: Array<[string, HeadersInit | undefined]> = [
        ["missing", undefined],
        ["empty bearer", { authorization: "Bearer " }],
        ["not a bearer scheme", { authorization: `Basic ${btoa("a:b")}` }],
        ["malformed", bearer("not.a.jwt")],
        ["garbage", bearer("x".repeat(300))],
        ["foreign-signed", bearer(await impostor.token("user_a"))],
        ["expired", bearer(await issuer.token("user_a", { claims: { exp: now() - 30 } }))],
        ["not yet valid", bearer(await issuer.token("user_a", { claims: { nbf: now() + 60 } }))],
        ["wrong azp", bearer(await issuer.token("user_a", { azp: "https://evil.example" }))],
        ["alg none", bearer(await issuer.token("user_a", { header: { alg: "none" } }))],
        ["HS256 with the public key", bearer(await hs256WithPublicKey("user_a"))],
        [
          "signature of another token",
          bearer(spliceSignature(await issuer.token("user_a"), await issuer.token("user_b"))),
        ],
        ["no sub", bearer(await issuer.token("user_a", { claims: { sub: undefined } }))],
        ["bad cookie", { cookie: "__session=nope" }],
        ["cookie from another issuer", { cookie: `__session=${await impostor.token("user_a")}` }],
      ];
      for (const [what, headers] of cases) await expectUnauthorized(await key(headers), what);
      assert.equal(await app.services.users.get("user_a"), null);
    });

    await t.step("within the 5 s clock skew is accepted", async () => {
      const barelyExpired = await issuer.token("user_skew", { claims: { exp: now() - 2 } });
      const barelyFuture = await issuer.token("user_skew", { claims: { nbf: now() + 2 } });
      assert.equal((await key(bearer(barelyExpired))).status, 201);
      assert.equal((await key(bearer(barelyFuture))).status, 200);
    });

    await t.step("a token without azp is accepted", async () => {
      const token = await issuer.token("user_noazp", { claims: { azp: undefined } });
      assert.equal((await key(bearer(token))).status, 201);
    });

    await t.step("bearer and __session cookie both work, for the same user", async () => {
      const token = await issuer.token("user_both");
      const viaBearer = await key(bearer(token));
      assert.equal(viaBearer.status, 201);
      const viaCookie = await app.request("/api/key", {
        headers: { cookie: `__session=${await issuer.token("user_both")}` },
      });
      assert.equal(viaCookie.status, 200);
      assert.match(viaCookie.headers.get("content-type") ?? "", /application\/json/);
      const a = await json(viaBearer);
      const b = await json(viaCookie);
      assert.equal(a.userId, "user_both");
      assert.equal(b.apiKey, a.apiKey);
    });

    await t.step("cookie POST from another origin → 403 forbidden; same origin works", async () => {
      const cookie = `__session=${await issuer.token("user_csrf")}`;
      const cross = await app.request("/api/key", {
        method: "POST",
        headers: { cookie, origin: "https://evil.example" },
      });
      assert.equal(cross.status, 403);
      assert.match(cross.headers.get("content-type") ?? "", /application\/json/);
      assert.equal((await json<{ error: { code: string } }>(cross)).error.code, "forbidden");
      assert.equal(await app.services.users.get("user_csrf"), null);
      const rotate = await app.request("/api/key/rotate", {
        method: "POST",
        headers: { cookie, origin: "https://evil.example" },
      });
      assert.equal(rotate.status, 403);
      const same = await app.request("/api/key", {
        method: "POST",
        headers: { cookie, origin: "http://localhost:8000" },
      });
      assert.equal(same.status, 201);
      // A bearer token is not ambient authority: no origin check needed.
      const bearerCross = await app.request("/api/key", {
        method: "POST",
        headers: { ...bearer(await issuer.token("user_csrf")), origin: "https://evil.example" },
      });
      assert.equal(bearerCross.status, 200);
    });

    await t.step("local sign-in answers 404 JSON when Clerk is configured", async () => {
      const res = await app.request("/auth/local/sign-in", {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ email: "a@example.com" }),
      });
      assert.equal(res.status, 404);
      assert.match(res.headers.get("content-type") ?? "", /application\/json/);
      assert.equal((await json<{ error: { code: string } }>(res)).error.code, "not_found");
      assert.equal(res.headers.get("set-cookie"), null);
    });
  } finally {
    await app.close();
  }
});

Deno.test("CLERK_AUTHORIZED_PARTIES: every listed origin is accepted in azp", async () => {
  const app = await testApp(
    clerkEnv(issuer, { CLERK_AUTHORIZED_PARTIES: "http://localhost:8000, https://app.example" }),
  );
  try {
    for (const [azp, status] of [["https://app.example", 201], ["https://other.example", 401]]) {
      const token = await issuer.token("user_azp", { azp: String(azp) });
      const res = await app.request("/api/key", { method: "POST", headers: bearer(token) });
      assert.equal(res.status, status, String(azp));
    }
  } finally {
    await app.close();
  }
});

Deno.test("sessions via JWKS from the Backend API (CLERK_SECRET_KEY, no CLERK_JWT_KEY)", async () => {
  const secretKey = "sk_test_jwksModeSecret0123456789";
  const fake = FakeClerkApi.start({ secretKey, issuer });
  fake.addUser({ id: "user_jwks", email: "j@example.com" });
  const app = await testApp({
    CLERK_SECRET_KEY: secretKey,
    CLERK_API_URL: fake.url,
    KEY_ENCRYPTION_SECRET: ENCRYPTION_SECRET,
  });
  try {
    const ok = await app.request("/api/key", {
      method: "POST",
      headers: bearer(await issuer.token("user_jwks")),
    });
    assert.equal(ok.status, 201);
    assert.equal((await json(ok)).userId, "user_jwks");
    const jwks = fake.calls.filter((c) => c.path === "/v1/jwks");
    assert.ok(jwks.length >= 1);
    assert.equal(jwks[0].authorization, `Bearer ${secretKey}`);
    await expectUnauthorized(
      await app.request("/api/key", { headers: bearer(await impostor.token("user_jwks")) }),
      "foreign-signed in JWKS mode",
    );
    await expectUnauthorized(
      await app.request("/api/key", {
        headers: bearer(await issuer.token("user_jwks", { claims: { exp: 1 } })),
      }),
      "expired in JWKS mode",
    );
  } finally {
    // The fake user makes the profile sync succeed; let it finish before closing.
    await app.services.clerkSync.idle();
    await app.close();
    await fake.close();
  }
});

Deno.test("local mode: sign-in sets an HttpOnly SameSite=Lax cookie that works on /api/key", async () => {
  const app = await testApp();
  try {
    assert.equal(app.services.config.localMode, true);
    const res = await app.request("/auth/local/sign-in", {
      method: "POST",
      headers: { "content-type": "application/json", origin: "http://localhost:8000" },
      body: JSON.stringify({ email: "Ann@Example.com" }),
    });
    assert.equal(res.status, 200);
    const setCookie = res.headers.get("set-cookie") ?? "";
    assert.match(setCookie, /^__session=[^;]+/);
    assert.match(setCookie, /;\s*HttpOnly/i);
    assert.match(setCookie, /;\s*SameSite=Lax/i);
    assert.match(setCookie, /;\s*Path=\//i);
    const cookie = setCookie.split(";")[0];

    const key = await app.request("/api/key", {
      method: "POST",
      headers: { cookie, origin: "http://localhost:8000" },
    });
    assert.equal(key.status, 201);
    const body = await json(key);
    assert.match(String(body.userId), /^user_local_[0-9a-f]{20}$/);
    assert.equal((await app.services.users.get(String(body.userId)))?.email, "ann@example.com");

    // The same e-mail signs in as the same user.
    const again = await app.request("/auth/local/sign-in", {
      method: "POST",
      headers: { "content-type": "application/x-www-form-urlencoded" },
      body: "email=ann%40example.com",
    });
    assert.equal(again.status, 303);
    const cookie2 = (again.headers.get("set-cookie") ?? "").split(";")[0];
    const key2 = await app.request("/api/key", { headers: { cookie: cookie2 } });
    assert.equal((await json(key2)).apiKey, body.apiKey);

    const cross = await app.request("/auth/local/sign-in", {
      method: "POST",
      headers: { "content-type": "application/json", origin: "https://evil.example" },
      body: JSON.stringify({ email: "ann@example.com" }),
    });
    assert.equal(cross.status, 403);
    assert.equal(cross.headers.get("set-cookie"), null);

    // A Clerk-shaped token is no session in local mode.
    await expectUnauthorized(
      await app.request("/api/key", { headers: bearer(await issuer.token("user_x")) }),
      "clerk token in local mode",
    );
  } finally {
    await app.close();
  }
});

/** The classic RS256→HS256 confusion: an HMAC keyed with the public key PEM. */
async function hs256WithPublicKey(sub: string): Promise<string> {
  const enc = new TextEncoder();
  const b64 = (v: unknown) =>
    btoa(JSON.stringify(v)).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  const now = Math.floor(Date.now() / 1000);
  const input = `${b64({ alg: "HS256", typ: "JWT", kid: issuer.kid })}.${
    b64({ sub, azp: "http://localhost:8000", exp: now + 60, iat: now, nbf: now })
  }`;
  const key = await crypto.subtle.importKey(
    "raw",
    enc.encode(issuer.publicKeyPem),
    { name: "HMAC", hash: "SHA-256" },
    false,
    ["sign"],
  );
  const sig = new Uint8Array(await crypto.subtle.sign("HMAC", key, enc.encode(input)));
  return `${input}.${
    btoa(String.fromCharCode(...sig)).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "")
  }`;
}

/** Header and claims of `a` with the signature of `b`. */
function spliceSignature(a: string, b: string): string {
  return a.split(".").slice(0, 2).join(".") + "." + b.split(".")[2];
}
