/**
 * Connect flows at the HTTP level (CONTRACT §5 "Connecting an editor"): the PKCE redirect (approve
 * page, token exchange, replay, wrong verifier, expiry, racing exchanges, the redirect allow-list,
 * CSRF) and the device-code flow (every RFC 8628 state, wrong codes rate-limited).
 */
import assert from "node:assert/strict";
import { loadConfig } from "../../lib/core/config.ts";
import { randomToken } from "../../lib/core/encoding.ts";
import { connectRedirect, s256 } from "../../lib/identity/connect.ts";
import type { DeviceStartBody } from "../../lib/api_types.ts";
import {
  clerkEnv,
  ClerkIssuer,
  formPost,
  json,
  PUBLIC_URL,
  type TestApp,
  testApp,
} from "../support/helpers.ts";

const REDIRECT = "http://127.0.0.1:53123/callback";
const KEY = /^kw_[A-Za-z0-9_-]{40,}$/;

/** A clock the connect flows read; tests move it instead of sleeping. */
function fakeClock() {
  let now = Date.now();
  return { now: () => now, advance: (ms: number) => (now += ms) };
}

async function signIn(app: TestApp, email: string) {
  const { token } = await app.services.sessions.issueLocal(email);
  return token;
}

async function pkce() {
  const verifier = randomToken(48);
  return { verifier, challenge: await s256(verifier) };
}

function connectQuery(challenge: string, extra: Record<string, string> = {}) {
  return {
    client: "VS Code",
    redirect_uri: REDIRECT,
    code_challenge: challenge,
    code_challenge_method: "S256",
    state: "st-123",
    ...extra,
  };
}

/** Approves a PKCE request as the signed-in user and returns the code from the redirect. */
async function approve(app: TestApp, token: string, challenge: string) {
  const res = await app.request(
    "/connect",
    formPost(token, {
      ...connectQuery(challenge),
      decision: "approve",
    }),
  );
  assert.equal(res.status, 303, await res.text());
  const location = new URL(res.headers.get("location")!);
  assert.equal(`${location.origin}${location.pathname}`, REDIRECT);
  assert.equal(location.searchParams.get("state"), "st-123");
  return location.searchParams.get("code")!;
}

const exchange = (app: TestApp, code: string, verifier: string) =>
  app.request("/api/connect/token", {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ code, code_verifier: verifier }),
  });

async function errorCode(res: Response) {
  assert.match(res.headers.get("content-type") ?? "", /application\/json/);
  return (await json<{ error: { code: string; message: string } }>(res)).error;
}

Deno.test("connect: PKCE redirect flow", async (t) => {
  const clock = fakeClock();
  const app = await testApp({}, { connect: { now: clock.now } });
  try {
    const token = await signIn(app, "ada@example.com");

    await t.step("signed out: sign in first, then back to the same request", async () => {
      const { challenge } = await pkce();
      const query = new URLSearchParams(connectQuery(challenge));
      const res = await app.request(`/connect?${query}`, { redirect: "manual" });
      assert.equal(res.status, 303);
      const location = new URL(res.headers.get("location")!, PUBLIC_URL);
      assert.equal(location.pathname, "/sign-in");
      assert.equal(location.searchParams.get("redirect"), `/connect?${query}`);
      // The sign-in form carries it, and signing in lands back on /connect.
      const signInPage = await (await app.request(location.href)).text();
      assert.ok(
        signInPage.includes(`value="/connect?${query.toString().replaceAll("&", "&amp;")}"`),
      );
      const signedIn = await app.request("/auth/local/sign-in", {
        method: "POST",
        redirect: "manual",
        headers: { origin: PUBLIC_URL, "content-type": "application/x-www-form-urlencoded" },
        body: new URLSearchParams({ email: "ada@example.com", redirect: `/connect?${query}` })
          .toString(),
      });
      assert.equal(signedIn.status, 303);
      assert.equal(signedIn.headers.get("location"), `/connect?${query}`);
      // Already signed in: /sign-in?redirect= goes straight back.
      const again = await app.request(location.href, {
        redirect: "manual",
        headers: { cookie: `__session=${token}` },
      });
      assert.equal(again.headers.get("location"), `/connect?${query}`);
    });

    await t.step("the approve page says who asks, what it gets and where it goes", async () => {
      const { challenge } = await pkce();
      const query = new URLSearchParams(connectQuery(challenge, { client: "<b>Evil</b> & Co" }));
      const res = await app.request(`/connect?${query}`, {
        headers: { cookie: `__session=${token}` },
      });
      assert.equal(res.status, 200);
      assert.match(res.headers.get("content-type")!, /text\/html/);
      assert.equal(res.headers.get("cache-control"), "no-store");
      // Only this redirect target is added to form-action (browsers check redirects after POST).
      assert.match(
        res.headers.get("content-security-policy")!,
        /form-action 'self' http:\/\/127\.0\.0\.1:53123;/,
      );
      const html = await res.text();
      assert.ok(html.includes("&lt;b>Evil&lt;/b> &amp; Co"), "the client name is escaped");
      assert.ok(!html.includes("<b>Evil</b>"));
      assert.ok(html.includes("http://127.0.0.1:53123"));
      assert.match(html, /A Keyway API key of its own/);
      assert.match(html, /counted against your limits/);
      assert.ok(html.includes("ada@example.com"), "shows who is signed in");
      assert.match(html, /Approving as<\/span> <strong>ada@example\.com<\/strong>/);
      assert.match(html, /Switch account/);
      // Other pages keep the plain form-action.
      const landing = await app.request("/");
      assert.match(landing.headers.get("content-security-policy")!, /form-action 'self';/);
    });

    let key = "";
    await t.step("approve → code → token exchange → the key works on /v1/models", async () => {
      const { verifier, challenge } = await pkce();
      const code = await approve(app, token, challenge);
      assert.match(code, /^[A-Za-z0-9_-]{43}$/);
      const res = await exchange(app, code, verifier);
      assert.equal(res.status, 200);
      assert.match(res.headers.get("content-type")!, /application\/json/);
      assert.equal(res.headers.get("cache-control"), "no-store");
      const body = await json(res);
      assert.match(String(body.apiKey), KEY);
      key = String(body.apiKey);
      assert.equal(body.baseUrl, `${PUBLIC_URL}/v1`);
      assert.equal(body.mode, "proxy");
      const viaApi = await json(
        await app.request("/api/key", { headers: { cookie: `__session=${token}` } }),
      );
      // The /api/key body with the app's own key: same account, limits and URLs, another key.
      assert.notEqual(body.apiKey, viaApi.apiKey, "the app's own key, not the default one");
      assert.equal(body.keyPrefix, key.slice(0, 7));
      assert.match(String(body.keyId), /^k_[A-Za-z0-9_-]{22}$/);
      assert.equal(viaApi.keyId, "default");
      const { apiKey: _a, keyPrefix: _p, createdAt: _c, keyId: _k, ...rest } = body;
      const { apiKey: _b, keyPrefix: _q, createdAt: _d, keyId: _l, ...restViaApi } = viaApi;
      assert.deepEqual(rest, restViaApi);
      const models = await app.request("/v1/models", {
        headers: { authorization: `Bearer ${key}` },
      });
      assert.equal(models.status, 200);
      // The stored code holds the user id and the challenge only, under the code's hash.
      for await (const entry of app.kv.list({ prefix: ["connect_codes"] })) {
        const text = JSON.stringify(entry);
        assert.ok(!text.includes(code) && !text.includes(key));
      }
    });

    await t.step("a replayed code is invalid_grant", async () => {
      const { verifier, challenge } = await pkce();
      const code = await approve(app, token, challenge);
      assert.equal((await exchange(app, code, verifier)).status, 200);
      const replay = await exchange(app, code, verifier);
      assert.equal(replay.status, 400);
      assert.equal((await errorCode(replay)).code, "invalid_grant");
    });

    await t.step("a wrong verifier is invalid_grant, and spends the code", async () => {
      const { verifier, challenge } = await pkce();
      const code = await approve(app, token, challenge);
      const wrong = await exchange(app, code, (await pkce()).verifier);
      assert.equal(wrong.status, 400);
      assert.equal((await errorCode(wrong)).code, "invalid_grant");
      const right = await exchange(app, code, verifier);
      assert.equal((await errorCode(right)).code, "invalid_grant");
      const unknown = await exchange(app, randomToken(32), verifier);
      assert.equal((await errorCode(unknown)).code, "invalid_grant");
    });

    await t.step("a code expires after 60 s", async () => {
      const { verifier, challenge } = await pkce();
      const late = await approve(app, token, challenge);
      clock.advance(60_001);
      const res = await exchange(app, late, verifier);
      assert.equal(res.status, 400);
      assert.equal((await errorCode(res)).code, "invalid_grant");
      const fresh = await pkce();
      const inTime = await approve(app, token, fresh.challenge);
      clock.advance(59_000);
      assert.equal((await exchange(app, inTime, fresh.verifier)).status, 200);
    });

    await t.step("concurrent exchanges of one code: exactly one winner", async () => {
      const { verifier, challenge } = await pkce();
      const code = await approve(app, token, challenge);
      const results = await Promise.all(
        Array.from({ length: 16 }, () => exchange(app, code, verifier)),
      );
      const statuses = results.map((r) => r.status).sort();
      assert.deepEqual(statuses, [200, ...Array(15).fill(400)]);
      for (const r of results) await r.body?.cancel();
    });

    await t.step("cancel redirects with access_denied and the state", async () => {
      const { challenge } = await pkce();
      const res = await app.request(
        "/connect",
        formPost(token, {
          ...connectQuery(challenge),
          decision: "cancel",
        }),
      );
      assert.equal(res.status, 303);
      const location = new URL(res.headers.get("location")!);
      assert.equal(location.searchParams.get("error"), "access_denied");
      assert.equal(location.searchParams.get("state"), "st-123");
      assert.equal(location.searchParams.get("code"), null);
    });

    await t.step("approve and cancel refuse cross-site POSTs (CSRF)", async () => {
      const { challenge } = await pkce();
      for (const decision of ["approve", "cancel"]) {
        const res = await app.request(
          "/connect",
          formPost(token, { ...connectQuery(challenge), decision }, "https://evil.example"),
        );
        assert.equal(res.status, 403);
        assert.equal(res.headers.get("location"), null);
        assert.match(await res.text(), /Cross-origin request/);
        const noOrigin = await app.request("/connect", {
          method: "POST",
          redirect: "manual",
          headers: {
            cookie: `__session=${token}`,
            "sec-fetch-site": "cross-site",
            "content-type": "application/x-www-form-urlencoded",
          },
          body: new URLSearchParams({ ...connectQuery(challenge), decision }).toString(),
        });
        assert.equal(noOrigin.status, 403);
        assert.equal(noOrigin.headers.get("location"), null);
      }
      assert.equal((await Array.fromAsync(app.kv.list({ prefix: ["connect_codes"] }))).length, 0);
    });

    await t.step("bad requests: an error page naming the field, no redirect", async () => {
      const { challenge } = await pkce();
      const cases: Array<[Record<string, string>, RegExp]> = [
        [{ code_challenge: "short" }, /code_challenge/],
        [{ code_challenge_method: "plain" }, /code_challenge_method: must be S256/],
        [{ client: "" }, /client/],
        [{ client: "x".repeat(65) }, /client/],
        [{ client: "VS\u0007Code" }, /client: must not contain control characters/],
      ];
      for (const [extra, field] of cases) {
        const query = new URLSearchParams(connectQuery(challenge, extra));
        const res = await app.request(`/connect?${query}`, {
          redirect: "manual",
          headers: { cookie: `__session=${token}` },
        });
        assert.equal(res.status, 400, JSON.stringify(extra));
        assert.equal(res.headers.get("location"), null);
        assert.match(await res.text(), field);
      }
      const res = await app.request("/api/connect/token", {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ code: "abc" }),
      });
      assert.equal(res.status, 400);
      const err = await errorCode(res);
      assert.equal(err.code, "invalid_request");
      assert.match(err.message, /^code_verifier/);
    });
  } finally {
    await app.close();
  }
});

Deno.test("connect: redirect_uri allow-list", async (t) => {
  const schemes = ["vscode", "vscode-insiders", "cursor"];
  const allowed: Array<[string, string]> = [
    ["http://127.0.0.1:53123/callback", "http://127.0.0.1:53123"],
    ["http://localhost:8080/", "http://localhost:8080"],
    ["http://127.0.0.1:1/cb?keep=1", "http://127.0.0.1:1"],
    ["vscode://publisher.keyway/keyway-callback", "vscode://publisher.keyway"],
    ["VSCODE://publisher.keyway/cb", "vscode://publisher.keyway"],
    ["vscode-insiders://publisher.keyway/cb", "vscode-insiders://publisher.keyway"],
    ["cursor://publisher.keyway/cb", "cursor://publisher.keyway"],
  ];
  const refused = [
    "https://evil.com/cb",
    "http://evil.com:8080/cb",
    "http://127.0.0.1/cb", // no port
    "http://localhost/cb",
    "http://127.0.0.1:80/cb", // URL drops the default port: same as none
    "http://127.0.0.1.evil.com:8080/cb",
    "http://localhost.evil.com:8080/cb",
    "http://127.0.0.1@evil.com:8080/cb",
    "http://user:pass@127.0.0.1:8080/cb",
    "http://evil.com#@127.0.0.1:8080/",
    "http://127.0.0.1:8080/cb#fragment",
    "https://127.0.0.1:8080/cb",
    "http://[::1]:8080/cb",
    "javascript:alert(1)",
    "javascript://127.0.0.1:8080/%0aalert(1)",
    "data:text/html,hi",
    "file:///etc/passwd",
    "windsurf://publisher.keyway/cb", // not in this list of schemes
    "vscode:publisher.keyway/cb", // no host
    "vscode:///cb",
    " http://127.0.0.1:8080/cb",
    "http://127.0.0.1:8080/c b",
    "http:\\\\127.0.0.1:8080\\cb",
    "http://127.0.0.1:8080/\tcb",
    "//127.0.0.1:8080/cb",
    "/dashboard",
    "",
  ];
  await t.step("connectRedirect: allowed targets and their labels", () => {
    for (const [uri, label] of allowed) {
      assert.equal(connectRedirect(uri, schemes)?.label, label, uri);
    }
  });
  await t.step("connectRedirect: everything else is refused", () => {
    for (const uri of refused) assert.equal(connectRedirect(uri, schemes), null, uri);
  });

  const app = await testApp({ CONNECT_REDIRECT_SCHEMES: schemes.join(",") });
  try {
    const token = await signIn(app, "bob@example.com");
    const { challenge } = await pkce();
    await t.step("pages: an error page with status 400 and no redirect, GET and POST", async () => {
      for (const uri of refused) {
        const query = new URLSearchParams(connectQuery(challenge, { redirect_uri: uri }));
        const get = await app.request(`/connect?${query}`, {
          redirect: "manual",
          headers: { cookie: `__session=${token}` },
        });
        assert.equal(get.status, 400, uri);
        assert.equal(get.headers.get("location"), null);
        assert.match(get.headers.get("content-type")!, /text\/html/);
        assert.match(await get.text(), /redirect_uri/);
        // A hand-made form POST is checked again: the hidden field is not trusted.
        const post = await app.request(
          "/connect",
          formPost(token, {
            ...connectQuery(challenge, { redirect_uri: uri }),
            decision: "approve",
          }),
        );
        assert.equal(post.status, 400, uri);
        assert.equal(post.headers.get("location"), null);
        await post.body?.cancel();
      }
    });
  } finally {
    await app.close();
  }

  await t.step("CONNECT_REDIRECT_SCHEMES: default list, scheme names only", () => {
    const base = { DENO_KV_PATH: ":memory:" };
    assert.deepEqual(loadConfig(base).connectRedirectSchemes, [
      "vscode",
      "vscode-insiders",
      "vscodium",
      "cursor",
      "windsurf",
    ]);
    assert.deepEqual(
      loadConfig({ ...base, CONNECT_REDIRECT_SCHEMES: " Zed , vscode:" }).connectRedirectSchemes,
      ["zed", "vscode"],
    );
    for (const bad of ["https", "vscode,javascript", "vs code", "1abc", "vscode://x"]) {
      assert.throws(
        () => loadConfig({ ...base, CONNECT_REDIRECT_SCHEMES: bad }),
        /CONNECT_REDIRECT_SCHEMES must be a comma list/,
        bad,
      );
    }
  });
});

const startDevice = async (app: TestApp, client = "Terminal") => {
  const res = await app.request("/api/connect/device", {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ client }),
  });
  assert.equal(res.status, 200);
  return await json<DeviceStartBody>(res);
};

const poll = (app: TestApp, deviceCode: string) =>
  app.request("/api/connect/device/token", {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ deviceCode }),
  });

const devicePage = (app: TestApp, token: string, fields: Record<string, string>) =>
  app.request("/connect/device", formPost(token, fields));

Deno.test("connect: device code flow (RFC 8628)", async (t) => {
  const clock = fakeClock();
  const app = await testApp({}, { connect: { now: clock.now } });
  try {
    const token = await signIn(app, "cy@example.com");

    await t.step("start: the contract's shape, an unambiguous user code", async () => {
      const body = await startDevice(app);
      assert.match(body.deviceCode, /^[A-Za-z0-9_-]{43}$/);
      assert.match(body.userCode, /^[BCDFGHJKLMNPQRSTVWXZ]{4}-[BCDFGHJKLMNPQRSTVWXZ]{4}$/);
      assert.equal(body.verificationUri, `${PUBLIC_URL}/connect/device`);
      assert.equal(
        body.verificationUriComplete,
        `${PUBLIC_URL}/connect/device?code=${body.userCode}`,
      );
      assert.equal(body.expiresIn, 600);
      assert.equal(body.interval, 5);
      const bad = await app.request("/api/connect/device", {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ client: "" }),
      });
      assert.equal(bad.status, 400);
      assert.match((await errorCode(bad)).message, /^client/);
    });

    await t.step("pending, slow_down (+5 s each), approve, the key once", async () => {
      const start = await startDevice(app, "My <CLI>");
      let res = await poll(app, start.deviceCode);
      assert.equal(res.status, 400);
      assert.equal((await errorCode(res)).code, "authorization_pending");
      clock.advance(1_000);
      res = await poll(app, start.deviceCode);
      assert.equal((await errorCode(res)).code, "slow_down");
      clock.advance(6_000); // the interval is now 10 s
      assert.equal((await errorCode(await poll(app, start.deviceCode))).code, "slow_down");
      clock.advance(15_000);
      assert.equal(
        (await errorCode(await poll(app, start.deviceCode))).code,
        "authorization_pending",
      );

      // The page: GET pre-fills the code; POST looks it up and shows the client; approve.
      const get = await app.request(`/connect/device?code=${start.userCode}`, {
        headers: { cookie: `__session=${token}` },
      });
      assert.equal(get.status, 200);
      assert.ok((await get.text()).includes(`value="${start.userCode}"`));
      const lookup = await devicePage(app, token, {
        code: start.userCode.toLowerCase().replace("-", ""),
        action: "lookup",
      });
      assert.equal(lookup.status, 200);
      const confirm = await lookup.text();
      assert.ok(confirm.includes("My &lt;CLI>"));
      assert.ok(confirm.includes(start.userCode));
      const approved = await devicePage(app, token, { code: start.userCode, action: "approve" });
      assert.equal(approved.status, 200);
      assert.match(await approved.text(), /is connected/);

      clock.advance(15_000);
      res = await poll(app, start.deviceCode);
      assert.equal(res.status, 200);
      const body = await json(res);
      assert.match(String(body.apiKey), KEY);
      const viaApi = await json(
        await app.request("/api/key", { headers: { cookie: `__session=${token}` } }),
      );
      assert.notEqual(body.apiKey, viaApi.apiKey, "the device's own key");
      clock.advance(15_000);
      const again = await poll(app, start.deviceCode);
      assert.equal((await errorCode(again)).code, "invalid_grant", "handed out once");
    });

    await t.step("concurrent polls of an approved code: exactly one gets the key", async () => {
      const start = await startDevice(app);
      await devicePage(app, token, { code: start.userCode, action: "lookup" });
      await (await devicePage(app, token, { code: start.userCode, action: "approve" })).text();
      const results = await Promise.all(
        Array.from({ length: 10 }, () => poll(app, start.deviceCode)),
      );
      assert.deepEqual(results.map((r) => r.status).sort(), [200, ...Array(9).fill(400)]);
      for (const r of results) await r.body?.cancel();
    });

    await t.step("denied → access_denied", async () => {
      const start = await startDevice(app);
      const denied = await devicePage(app, token, { code: start.userCode, action: "deny" });
      assert.match(await denied.text(), /Request denied/);
      const res = await poll(app, start.deviceCode);
      assert.equal((await errorCode(res)).code, "access_denied");
      // A decided code cannot be approved afterwards.
      const late = await devicePage(app, token, { code: start.userCode, action: "approve" });
      assert.match(await late.text(), /already denied/);
    });

    await t.step("after expiresIn → expired_token; the page no longer knows the code", async () => {
      const start = await startDevice(app);
      clock.advance(600_001);
      assert.equal((await errorCode(await poll(app, start.deviceCode))).code, "expired_token");
      const page = await devicePage(app, token, { code: start.userCode, action: "approve" });
      assert.equal(page.status, 400);
      assert.match(await page.text(), /not valid or has expired/);
    });

    await t.step("unknown device code → invalid_grant", async () => {
      const res = await poll(app, randomToken(32));
      assert.equal((await errorCode(res)).code, "invalid_grant");
    });

    await t.step("the device page refuses cross-site POSTs", async () => {
      const start = await startDevice(app);
      const res = await app.request(
        "/connect/device",
        formPost(token, { code: start.userCode, action: "approve" }, "https://evil.example"),
      );
      assert.equal(res.status, 403);
      await res.body?.cancel();
      assert.equal(
        (await errorCode(await poll(app, start.deviceCode))).code,
        "authorization_pending",
      );
    });

    await t.step("signed out: the page signs in first and comes back with the code", async () => {
      const res = await app.request("/connect/device?code=BCDF-GHJK", { redirect: "manual" });
      assert.equal(res.status, 303);
      const location = new URL(res.headers.get("location")!, PUBLIC_URL);
      assert.equal(location.searchParams.get("redirect"), "/connect/device?code=BCDF-GHJK");
    });
  } finally {
    await app.close();
  }
});

Deno.test("connect: wrong user codes are rate-limited per user", async () => {
  const clock = fakeClock();
  // A one-minute window (the default is 15), so the device code outlives it.
  const app = await testApp({}, { connect: { now: clock.now, missWindowMs: 60_000 } });
  try {
    const guesser = await signIn(app, "guess@example.com");
    const other = await signIn(app, "other@example.com");
    const start = await startDevice(app);
    // Concurrent wrong guesses: exactly the limit (5) is looked up, the rest are refused.
    const guesses = await Promise.all(
      Array.from(
        { length: 12 },
        (_, i) =>
          devicePage(app, guesser, { code: `BCDF-GHJ${"BCDFGHJKLMNP"[i]}`, action: "lookup" }),
      ),
    );
    const statuses = guesses.map((r) => r.status).sort();
    assert.deepEqual(statuses, [...Array(5).fill(400), ...Array(7).fill(429)]);
    const limited = guesses.find((r) => r.status === 429)!;
    assert.ok(Number(limited.headers.get("retry-after")) > 0);
    assert.match(await limited.text(), /Too many wrong codes/);
    for (const r of guesses) if (!r.bodyUsed) await r.body?.cancel();
    // Even the right code is refused while limited; another user is unaffected.
    const right = await devicePage(app, guesser, { code: start.userCode, action: "lookup" });
    assert.equal(right.status, 429);
    await right.body?.cancel();
    const fine = await devicePage(app, other, { code: start.userCode, action: "lookup" });
    assert.equal(fine.status, 200);
    await fine.body?.cancel();
    // Right codes do not count; after the window the guesser may try again.
    clock.advance(60_000);
    const later = await devicePage(app, guesser, { code: start.userCode, action: "lookup" });
    assert.equal(later.status, 200);
    await later.body?.cancel();
  } finally {
    await app.close();
  }
});

Deno.test("connect: a disabled or deleted user gets no key", async () => {
  const app = await testApp();
  try {
    const token = await signIn(app, "dee@example.com");
    const userId = (await json(
      await app.request("/api/key", { headers: { cookie: `__session=${token}` } }),
    )).userId as string;
    const { verifier, challenge } = await pkce();
    const code = await approve(app, token, challenge);
    const device = await startDevice(app);
    await devicePage(app, token, { code: device.userCode, action: "lookup" });
    await (await devicePage(app, token, { code: device.userCode, action: "approve" })).text();

    await app.services.users.setStatus(userId, "disabled");
    const res = await exchange(app, code, verifier);
    assert.equal(res.status, 403);
    assert.equal((await errorCode(res)).code, "user_disabled");
    const polled = await poll(app, device.deviceCode);
    assert.equal(polled.status, 403);
    assert.equal((await errorCode(polled)).code, "user_disabled");
    const key = await app.request("/api/key", { headers: { cookie: `__session=${token}` } });
    assert.equal(key.status, 403, "GET /api/key refuses a disabled user too");
    assert.equal((await errorCode(key)).code, "user_disabled");
    // The approve page says so instead of redirecting a code that cannot work.
    const page = await app.request(
      "/connect",
      formPost(token, {
        ...connectQuery((await pkce()).challenge),
        decision: "approve",
      }),
    );
    assert.equal(page.status, 403);
    assert.equal(page.headers.get("location"), null);
    assert.match(await page.text(), /disabled/);
  } finally {
    await app.close();
  }
});

Deno.test("connect: a revocation or disable on another process counts at once for the editor's key", async () => {
  const dir = await Deno.makeTempDir();
  const env = { DENO_KV_PATH: `${dir}/kv.sqlite3` };
  const a = await testApp(env);
  const b = await testApp(env);
  try {
    const token = await signIn(b, "two@example.com");
    const session = { cookie: `__session=${token}` };
    const before = await json<{ apiKey: string }>(
      await b.request("/api/key", { headers: session }),
    );
    const { verifier, challenge } = await pkce();
    const code = await approve(b, token, challenge);
    // The default key rotated through the other process: the app's own key is untouched.
    const rotated = await a.request("/api/key/rotate", {
      method: "POST",
      headers: { ...session, origin: PUBLIC_URL },
    });
    assert.equal(rotated.status, 200);
    const fresh = (await json<{ apiKey: string }>(rotated)).apiKey;
    assert.notEqual(fresh, before.apiKey);
    const res = await exchange(b, code, verifier);
    assert.equal(res.status, 200);
    const appKey = (await json<{ apiKey: string }>(res)).apiKey;
    assert.ok(appKey !== fresh && appKey !== before.apiKey, "the app's own key");

    // The key an approval created, revoked through A before the editor exchanges its code on B:
    // invalid_grant, nothing handed out.
    const second = await pkce();
    const code2 = await approve(b, token, second.challenge);
    const listed = await json<{ keys: { id: string; default: boolean }[] }>(
      await a.request("/api/keys", { headers: session }),
    );
    const newest = listed.keys.at(-1)!;
    assert.equal(newest.default, false);
    const revoked = await a.request(`/api/keys/${newest.id}`, {
      method: "DELETE",
      headers: { ...session, origin: PUBLIC_URL },
    });
    assert.equal(revoked.status, 200);
    const late = await exchange(b, code2, second.verifier);
    assert.equal(late.status, 400);
    assert.equal((await errorCode(late)).code, "invalid_grant");

    // Disabled through A: approving on B at once is refused, no code handed out.
    const user = await json<{ userId: string }>(await a.request("/api/key", { headers: session }));
    await b.request("/api/key", { headers: session }); // B remembers the active user
    await a.services.users.setStatus(user.userId, "disabled");
    const page = await b.request(
      "/connect",
      formPost(token, { ...connectQuery((await pkce()).challenge), decision: "approve" }),
    );
    assert.equal(page.status, 403);
    assert.equal(page.headers.get("location"), null);
  } finally {
    await a.close();
    await b.close();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("connect: /sign-in?redirect= comes back in Clerk mode; unsafe values are dropped", async () => {
  const issuer = await ClerkIssuer.create();
  const app = await testApp(clerkEnv(issuer));
  try {
    const { challenge } = await pkce();
    const back = `/connect?${new URLSearchParams(connectQuery(challenge))}`;
    const res = await app.request(`/connect?${new URLSearchParams(connectQuery(challenge))}`, {
      redirect: "manual",
    });
    assert.equal(res.status, 303);
    const signIn = await app.request(res.headers.get("location")!);
    const html = await signIn.text();
    // ClerkJS's mount sends the user back here (static/clerk.js reads data-redirect).
    assert.ok(html.includes(`data-redirect="${back.replaceAll("&", "&amp;")}"`));
    // Clerk's own "Sign up" / "Sign in" links keep the way back, and the page says what connects.
    const query = `?redirect=${encodeURIComponent(back)}`;
    assert.ok(html.includes(`data-sign-up-url="/sign-up${query}"`));
    assert.ok(html.includes(`data-sign-in-url="/sign-in${query}"`));
    assert.match(html, /Sign in to connect <strong>VS Code<\/strong>/);
    const token = await issuer.token("user_clerk_connect", { ttlSeconds: 600 });
    const page = await app.request(back, { headers: { cookie: `__session=${token}` } });
    assert.equal(page.status, 200);
    assert.match(await page.text(), /wants a Keyway key/);
    for (const unsafe of ["//evil.example/x", "https://evil.example/", "/\\evil.example"]) {
      const html = await (await app.request(`/sign-in?redirect=${encodeURIComponent(unsafe)}`))
        .text();
      assert.ok(html.includes('data-redirect="/dashboard"'), unsafe);
    }
  } finally {
    await app.close();
  }
});

Deno.test("connect: anonymous device starts are capped per minute; the approve forms have a body limit", async (t) => {
  const app = await testApp({}, { connect: { deviceStartsPerMinute: 3 } });
  try {
    await t.step("the 4th device start in a minute → 429 with Retry-After", async () => {
      const start = () =>
        app.request("/api/connect/device", {
          method: "POST",
          headers: { "content-type": "application/json" },
          body: JSON.stringify({ client: "Keyway CLI" }),
        });
      const statuses = [];
      for (let i = 0; i < 4; i++) {
        const res = await start();
        statuses.push(res.status);
        if (res.status === 429) {
          assert.equal((await res.json()).error.code, "rate_limit_exceeded");
          assert.match(res.headers.get("retry-after") ?? "", /^\d+$/);
        } else await res.body?.cancel();
      }
      assert.deepEqual(statuses, [200, 200, 200, 429]);
    });
    await t.step("a 20 KiB form on /connect → 413 before anything reads it", async () => {
      const res = await app.request("/connect", {
        method: "POST",
        headers: { "content-type": "application/x-www-form-urlencoded" },
        body: "client=" + "x".repeat(20 * 1024),
      });
      assert.equal(res.status, 413);
      await res.body?.cancel();
    });
  } finally {
    await app.close();
  }
});
