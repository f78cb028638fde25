/**
 * Pages without a browser: the 404 page and JSON 404s, inline sign-in errors, the
 * per-user operator page, and the formatter every page and the report use.
 */
import assert from "node:assert/strict";
import {
  formatCompact,
  formatDate,
  formatDateTime,
  formatDay,
  formatInt,
  formatLimit,
  formatUsd,
  formatUsdFixed,
  formatWait,
} from "../../lib/core/format.ts";
import { localUserId } from "../../lib/identity/sessions.ts";
import { json, testApp } from "../support/helpers.ts";

const LOCAL = { origin: "http://localhost:8000" };

Deno.test("404: an HTML page in the layout; JSON under /api and /v1", async (t) => {
  const app = await testApp();
  try {
    await t.step("a page path", async () => {
      const res = await app.request("/nowhere?x=1");
      assert.equal(res.status, 404);
      assert.match(res.headers.get("content-type") ?? "", /text\/html/);
      const html = await res.text();
      assert.match(html, /<title>Not found · Keyway<\/title>/);
      assert.match(html, /class="site-header"/);
      assert.match(html, /href="\/"[^>]*>Go to the home page/);
      assert.match(res.headers.get("content-security-policy") ?? "", /default-src 'self'/);
    });
    await t.step("a path with markup in it is escaped", async () => {
      const res = await app.request("/%3Cscript%3Ealert(1)%3C%2Fscript%3E");
      assert.equal(res.status, 404);
      assert.ok(!(await res.text()).includes("<script>alert(1)"));
    });
    for (const path of ["/api/nowhere", "/v1/nowhere"]) {
      await t.step(path, async () => {
        const res = await app.request(path);
        assert.equal(res.status, 404);
        assert.match(res.headers.get("content-type") ?? "", /application\/json/);
        assert.equal((await json<{ error: { code: string } }>(res)).error.code, "not_found");
      });
    }
  } finally {
    await app.close();
  }
});

Deno.test("local sign-in: errors come back in the form, never as JSON", async (t) => {
  const app = await testApp();
  const post = (body: string, type = "application/x-www-form-urlencoded") =>
    app.request("/auth/local/sign-in", {
      method: "POST",
      headers: { "content-type": type, ...LOCAL },
      body,
    });
  try {
    for (
      const [label, email] of [
        ["no dot in the domain", "me@localhost"],
        ["not an address", "nope"],
        ["empty", ""],
        ["markup", '"><script>alert(1)</script>@x'],
      ]
    ) {
      await t.step(label, async () => {
        const from = label === "empty" ? "sign-up" : "sign-in";
        const res = await post(
          new URLSearchParams({ email, redirect: "/dashboard", from }).toString(),
        );
        assert.equal(res.status, 400);
        assert.match(res.headers.get("content-type") ?? "", /text\/html/);
        assert.equal(res.headers.get("set-cookie"), null, "no session");
        const html = await res.text();
        assert.match(html, /id="email-error" role="alert">Check the e-mail address: /);
        assert.match(html, /aria-invalid="true"/);
        assert.ok(!html.includes("<script>alert(1)"), "what was typed is escaped");
        assert.match(
          html,
          from === "sign-up" ? /Create your Keyway account/ : /Sign in to Keyway/,
        );
      });
    }
    await t.step("JSON clients still get the JSON error", async () => {
      const res = await post(JSON.stringify({ email: "me@localhost" }), "application/json");
      assert.equal(res.status, 400);
      const body = await json<{ error: { code: string; message: string } }>(res);
      assert.equal(body.error.code, "invalid_request");
      assert.match(body.error.message, /email/);
    });
    await t.step("a valid address signs in", async () => {
      const res = await post(new URLSearchParams({ email: "Ada@Example.com" }).toString());
      assert.equal(res.status, 303);
      assert.equal(res.headers.get("location"), "/dashboard");
      assert.match(res.headers.get("set-cookie") ?? "", /__session=/);
    });
    await t.step("the sign-in page no longer reflects ?error=", async () => {
      const html = await (await app.request("/sign-in?error=Your%20account%20was%20hacked")).text();
      assert.ok(!html.includes("hacked"));
      assert.match(html, /pattern="/, "the browser refuses me@localhost too");
    });
  } finally {
    await app.close();
  }
});

Deno.test("operator pages: /admin/users/:id for operators, 404 for unknown users", async (t) => {
  const admin = await testApp({ ADMIN_USER_IDS: await localUserId("op@example.com") });
  try {
    const opSession = await admin.services.sessions.issueLocal("op@example.com");
    const user = await admin.services.sessions.issueLocal("ann@example.com");
    await admin.services.users.provision(user.userId, {
      email: "ann@example.com",
      firstName: null,
      lastName: null,
    });
    await admin.services.users.setLimits(user.userId, { rpd: 5 });
    const page = (path: string, token: string) =>
      admin.request(path, { headers: { cookie: `__session=${token}` } });
    await t.step("the user's page", async () => {
      const res = await page(`/admin/users/${user.userId}`, opSession.token);
      assert.equal(res.status, 200);
      const html = await res.text();
      assert.match(html, /<h1 class="break">ann@example\.com<\/h1>/);
      assert.match(html, /data-island="UserActions"/);
      assert.match(html, /data-island="DailyChart"/);
      assert.match(html, /Requests \/ day: 5/);
    });
    await t.step("signed out: sign in first, then back to the same page", async () => {
      for (const path of ["/admin", `/admin/users/${user.userId}`]) {
        const res = await admin.request(path, { redirect: "manual" });
        assert.equal(res.status, 303);
        const location = new URL(res.headers.get("location")!, "http://localhost");
        assert.equal(location.pathname, "/sign-in");
        assert.equal(location.searchParams.get("redirect"), path);
      }
    });
    await t.step("an unknown user: the 404 page", async () => {
      const res = await page("/admin/users/user_nobody", opSession.token);
      assert.equal(res.status, 404);
      assert.match(await res.text(), /No such user/);
    });
    await t.step("not an operator: 403 page", async () => {
      const res = await page(`/admin/users/${user.userId}`, user.token);
      assert.equal(res.status, 403);
      assert.ok(!(await res.text()).includes("ann@example.com</h1>"));
    });
  } finally {
    await admin.close();
  }
});

Deno.test("format: one way to write numbers, money and dates", () => {
  assert.equal(formatInt(3977), "3,977");
  assert.equal(formatInt(16_300), "16,300");
  assert.equal(formatCompact(16_300), "16.3K");
  assert.equal(formatCompact(9_999), "9,999");
  assert.equal(formatUsd(1234.56), "$1,234.56");
  assert.equal(formatUsd(0.03), "$0.03");
  assert.equal(formatUsd(0.0036), "<$0.01");
  assert.equal(formatUsd(0.005), "<$0.01", "below a cent, never rounded up to one");
  assert.equal(formatUsd(0.01), "$0.01");
  assert.equal(formatUsd(0), "$0.00");
  assert.equal(formatUsdFixed(1.50028, 5), "$1.50028");
  assert.equal(formatUsdFixed(1234.5, 2), "$1,234.50");
  assert.equal(formatLimit(null), "Unlimited");
  assert.equal(formatLimit(1000), "1,000");
  assert.equal(formatLimit(5, formatUsd), "$5.00");
  const t = Date.UTC(2026, 10, 26, 5, 45);
  assert.equal(formatDay("2026-11-26"), "Nov 26");
  assert.equal(formatDate(new Date(t).toISOString()), "Nov 26, 2026");
  assert.equal(formatDateTime(t), "Nov 26, 2026, 05:45 UTC");
  assert.equal(formatDateTime(Date.UTC(2026, 11, 1)), "Dec 1, 2026, 00:00 UTC");
  assert.equal(formatWait(45 * 60_000), "45 min");
  assert.equal(formatWait(3 * 3_600_000 + 5 * 60_000), "3 h 5 min");
  assert.equal(formatWait(5 * 86_400_000), "5 days");
});
