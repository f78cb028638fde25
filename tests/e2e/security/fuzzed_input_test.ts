/**
 * Table-driven bad input across every endpoint: malformed JSON, wrong types, huge strings, odd
 * unicode, header tricks and oversized bodies. Only 4xx with the contract's error shape (or a
 * normal success) may come back — never a 5xx — and the server keeps serving.
 */
import assert from "node:assert/strict";
import { bearer, clerkEnv, ClerkIssuer, json, testApp } from "../../support/helpers.ts";
import { signedDelivery, WEBHOOK_SECRET } from "../../../testing/fakes/svix.ts";

const issuer = await ClerkIssuer.create();

/** Deterministic PRNG so a failure can be replayed (the seed is in the test name). */
function mulberry32(seed: number) {
  return () => {
    seed = (seed + 0x6d2b79f5) | 0;
    let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

const ODD_STRINGS = [
  "",
  " ",
  "\u0000",
  "\ud800", // lone surrogate
  "\u202eevil\u202c", // right-to-left override
  "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 🔑 ключ 鍵",
  "a".repeat(5000),
  "../../etc/passwd",
  "<script>alert(1)</script>",
  "' OR 1=1 --",
  "%00%0d%0aSet-Cookie: x=1",
  "kw_" + "A".repeat(43),
  "__proto__",
];

const ODD_VALUES: unknown[] = [
  null,
  true,
  0,
  -1,
  1.5,
  1e308,
  -0,
  Number.MAX_SAFE_INTEGER + 2,
  [],
  {},
  [[[[[]]]]],
  { "__proto__": { admin: true } },
  ...ODD_STRINGS,
];

/** URL-encodes; a lone surrogate becomes its (invalid) UTF-8 bytes, which is fuzz too. */
function enc(s: string): string {
  try {
    return encodeURIComponent(s);
  } catch {
    return "%ED%A0%80";
  }
}

const MALFORMED_BODIES = [
  "{",
  "}",
  "[",
  "nul",
  '{"model": }',
  '{"model": "glm-4.6", "messages": [}',
  "\u0000\u0001\u0002",
  '{"a":1}{"b":2}',
  "\ufeff{}",
  "{" + '"a":'.repeat(2000) + "1" + "}".repeat(2000),
  "[".repeat(5000) + "]".repeat(5000),
];

Deno.test("fuzzed input across every endpoint: 4xx with the error shape, never 5xx", async () => {
  const upstream = Deno.serve(
    { port: 0, hostname: "127.0.0.1", onListen: () => {} },
    () =>
      Response.json({
        id: "x",
        object: "chat.completion",
        choices: [{ index: 0, message: { role: "assistant", content: "ok" } }],
        usage: { prompt_tokens: 1, completion_tokens: 1, total_tokens: 2 },
      }),
  );
  const app = await testApp(clerkEnv(issuer, {
    CLERK_WEBHOOK_SECRET: WEBHOOK_SECRET,
    ADMIN_USER_IDS: "user_admin",
    GLM_BASE_URL: `http://127.0.0.1:${upstream.addr.port}`,
    RATE_LIMIT_RPM: "100000",
    RATE_LIMIT_RPD: "1000000",
  }));
  const seed = Number(Deno.env.get("FUZZ_SEED") ?? Date.now() % 1_000_000);
  const random = mulberry32(seed);
  const pick = <T>(list: readonly T[]): T => list[Math.floor(random() * list.length)];
  try {
    const admin = bearer(await issuer.token("user_admin", { ttlSeconds: 600 }));
    const user = bearer(await issuer.token("user_fuzz", { ttlSeconds: 600 }));
    const keyRes = await app.request("/api/key", { method: "POST", headers: user });
    const apiKey = String((await json(keyRes)).apiKey);
    const kw = bearer(apiKey);

    const endpoints: Array<{ method: string; path: () => string; auth: HeadersInit }> = [
      { method: "POST", path: () => "/api/key", auth: user },
      { method: "GET", path: () => "/api/key", auth: user },
      { method: "POST", path: () => "/api/auth/provision-user", auth: user },
      {
        method: "GET",
        path: () => `/api/usage?days=${enc(pick(ODD_STRINGS))}`,
        auth: user,
      },
      {
        method: "GET",
        path: () => `/api/usage?days=${pick(["0", "91", "-5", "1e3", "30.5", "NaN"])}`,
        auth: kw,
      },
      { method: "POST", path: () => "/api/usage", auth: user },
      { method: "POST", path: () => "/api/webhooks/clerk", auth: {} },
      { method: "GET", path: () => "/api/admin/users", auth: user },
      {
        method: "POST",
        path: () => `/api/admin/users/${enc(pick(ODD_STRINGS) || "x")}/disable`,
        auth: admin,
      },
      { method: "PUT", path: () => "/api/admin/users/user_fuzz/limits", auth: admin },
      {
        method: "PUT",
        path: () => `/api/admin/users/${enc(pick(ODD_STRINGS) || "x")}/limits`,
        auth: admin,
      },
      { method: "POST", path: () => "/v1/chat/completions", auth: kw },
      { method: "GET", path: () => "/v1/models", auth: kw },
      { method: "DELETE", path: () => "/api/key", auth: user },
      { method: "GET", path: () => `/api/${enc(pick(ODD_STRINGS))}`, auth: user },
    ];

    const bodies: Array<() => BodyInit | undefined> = [
      () => pick(MALFORMED_BODIES),
      () => JSON.stringify(pick(ODD_VALUES)),
      () =>
        JSON.stringify({
          model: pick(ODD_VALUES),
          messages: pick([[], [{ role: "user", content: pick(ODD_STRINGS) }], pick(ODD_VALUES)]),
          promptTokens: pick(ODD_VALUES),
          completionTokens: pick(ODD_VALUES),
          rpm: pick(ODD_VALUES),
          tokensPerDay: pick(ODD_VALUES),
        }),
      () => "x".repeat(1024 * 1024 + pick([1, 1000, 300_000])), // over every limit
      () =>
        JSON.stringify({
          type: pick(["user.created", "user.deleted", "x"]),
          data: pick(ODD_VALUES),
        }),
      () => undefined,
    ];

    const headerTricks: Array<() => HeadersInit> = [
      () => ({}),
      () => ({
        "content-type": pick([
          "text/plain",
          "application/x-www-form-urlencoded",
          "application/json; charset=utf-16",
          "multipart/form-data; boundary=x",
        ]),
      }),
      () => ({
        authorization: pick([
          "Bearer",
          "Bearer  ",
          "Basic dTpw",
          "Bearer kw_",
          "Bearer " + "x".repeat(10_000),
          "bearer \u00ff\u00fe",
        ]),
      }),
      () => ({ origin: pick(["https://evil.example", "null", "http://localhost:8000"]) }),
      () => ({ cookie: `__session=${pick(["", "a.b.c", "x".repeat(5000), "%%%"])}` }),
      () => ({
        "svix-id": pick(ODD_STRINGS).slice(0, 200).replace(/[^\x20-\x7e]/g, "?"),
        "svix-timestamp": pick(["0", "-1", "999999999999", "abc"]),
        "svix-signature": "v1,AAAA",
      }),
      () => ({ "content-length": "5" }),
    ];

    const failures: string[] = [];
    const statuses = new Set<number>();
    const N = 400;
    for (let batch = 0; batch < N; batch += 20) {
      await Promise.all(Array.from({ length: 20 }, async () => {
        const ep = pick(endpoints);
        const path = ep.path();
        const body = ep.method === "GET" || ep.method === "DELETE" ? undefined : pick(bodies)();
        const trick = pick(headerTricks)();
        const headers = new Headers(ep.auth);
        for (const [k, v] of Object.entries(trick)) {
          try {
            headers.set(k, v);
          } catch { /* the Headers class itself refuses invalid values: fine */ }
        }
        let res: Response;
        try {
          res = await app.request(path, { method: ep.method, headers, body });
        } catch (err) {
          failures.push(`${ep.method} ${path}: threw ${err}`);
          return;
        }
        const text = await res.text();
        statuses.add(res.status);
        const what = `${ep.method} ${path.slice(0, 80)} [${
          JSON.stringify(trick).slice(0, 80)
        }] → ${res.status}`;
        if (res.status >= 500) failures.push(`${what}: ${text.slice(0, 200)}`);
        if (res.status >= 400) {
          let shape: { error?: { code?: unknown; message?: unknown } } = {};
          try {
            shape = JSON.parse(text);
          } catch { /* reported below */ }
          if (typeof shape.error?.code !== "string" || typeof shape.error?.message !== "string") {
            failures.push(`${what}: not the error shape: ${text.slice(0, 120)}`);
          }
        }
      }));
    }
    // Webhooks with a valid signature over nonsense payloads are acknowledged or refused, not 5xx.
    for (const value of ODD_VALUES) {
      const res = await app.request("/api/webhooks/clerk", signedDelivery(value));
      if (res.status >= 500) {
        failures.push(`signed webhook ${JSON.stringify(value)?.slice(0, 40)} → ${res.status}`);
      }
      await res.body?.cancel();
    }
    assert.deepEqual(failures, [], `seed ${seed}`);
    // The table really reached the validation paths, not just one refusal.
    for (const status of [400, 401, 404, 413]) {
      assert.ok(statuses.has(status), `no ${status} seen (seed ${seed}): ${[...statuses]}`);
    }

    const health = await app.request("/health");
    assert.equal(health.status, 200);
    const again = await app.request("/api/key", { headers: user });
    assert.equal(again.status, 200);
    assert.equal((await json(again)).apiKey, apiKey);
  } finally {
    await app.close();
    await upstream.shutdown();
  }
});
