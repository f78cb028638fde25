/**
 * GET /api/admin/users as CONTRACT §5 Operator has it: ordered by 30-day cost, searchable by
 * e-mail or id, filterable by status (paused included, with what paused them), paginated by
 * cursor with a total — and every bad parameter refused with its name.
 */
import assert from "node:assert/strict";
import { recordUsage } from "../../../lib/usage/usage.ts";
import type { AdminUsersBody } from "../../../lib/api_types.ts";
import { bearer, clerkEnv, ClerkIssuer, json, testApp } from "../../support/helpers.ts";

const issuer = await ClerkIssuer.create();

Deno.test("the operator's users list: order, search, status filter, pages", async (t) => {
  const app = await testApp(clerkEnv(issuer, { ADMIN_USER_IDS: "user_boss" }));
  try {
    const { users, config } = app.services;
    const boss = bearer(await issuer.token("user_boss"));
    const now = Date.now();
    // 30 users, user_07 spending 7 × 1M prompt tokens of glm-4.6 ($0.60 each), and so on.
    const ids = Array.from({ length: 30 }, (_, i) => `user_${String(i).padStart(2, "0")}`);
    for (const [i, id] of ids.entries()) {
      await users.provision(id, {
        email: `Person.${i}@Example.org`,
        firstName: null,
        lastName: null,
      });
      if (i > 0) {
        await recordUsage(app.kv, config.pricing, {
          userId: id,
          model: "glm-4.6",
          promptTokens: i * 1_000_000,
          completionTokens: 0,
          at: now,
        });
      }
    }
    // Paused: user_05 by the day's tokens, user_06 by the month's budget; user_03 is disabled,
    // user_04 deleted (its usage stays on record).
    await users.setLimits("user_05", { tokensPerDay: 1_000 });
    await users.setLimits("user_06", { budgetUsdMonthly: 1 });
    await users.setLimits("user_08", { tokensPerDay: 100_000_000 }); // a limit not reached
    await users.setStatus("user_03", "disabled", "user_boss");
    await users.markDeleted("user_04");

    const list = async (query: string) => {
      const res = await app.request(`/api/admin/users${query}`, { headers: boss });
      assert.equal(res.status, 200, query);
      assert.match(res.headers.get("content-type") ?? "", /application\/json/);
      return await json<AdminUsersBody>(res);
    };

    await t.step("default page: 50 at most, by 30-day cost, highest first", async () => {
      const page = await list("");
      assert.equal(page.total, 30);
      assert.equal(page.next, null);
      assert.deepEqual(page.users.map((u) => u.userId), [...ids].reverse());
      const top = page.users[0];
      assert.equal(top.email, "Person.29@Example.org");
      assert.equal(top.status, "active");
      assert.equal(top.pausedBy, null);
      assert.equal(top.keys, 1);
      assert.match(String(top.keyPrefix), /^kw_/);
      assert.equal(top.lastActiveAt, new Date(now).toISOString().slice(0, 10));
      assert.deepEqual(top.usage30d, { requests: 1, totalTokens: 29_000_000, costUsd: 17.4 });
      const idle = page.users.at(-1)!;
      assert.equal(idle.userId, "user_00");
      assert.equal(idle.lastActiveAt, null);
      assert.equal(idle.keys, 1);
    });

    await t.step("paused users are paused, and say by what", async () => {
      const page = await list("?status=paused");
      assert.equal(page.total, 2);
      assert.deepEqual(
        page.users.map((u) => [u.userId, u.status, u.pausedBy]),
        [["user_06", "paused", "budget"], ["user_05", "paused", "tokens"]],
      );
      assert.ok(Date.parse(page.users[1].pausedUntil!) > now);
      const active = await list("?status=active&limit=200");
      assert.equal(active.total, 26);
      assert.ok(
        !active.users.some((u) =>
          ["user_03", "user_04", "user_05", "user_06"]
            .includes(u.userId)
        ),
      );
      assert.ok(active.users.some((u) => u.userId === "user_08"));
      assert.deepEqual((await list("?status=disabled")).users.map((u) => u.userId), ["user_03"]);
      const deleted = await list("?status=deleted");
      assert.deepEqual(deleted.users.map((u) => [u.userId, u.email, u.keys]), [
        ["user_04", null, 0],
      ]);
    });

    await t.step("search: e-mail or id, any case, a substring", async () => {
      assert.deepEqual((await list("?query=person.1")).users.map((u) => u.userId), [
        "user_19",
        "user_18",
        "user_17",
        "user_16",
        "user_15",
        "user_14",
        "user_13",
        "user_12",
        "user_11",
        "user_10",
        "user_01",
      ]);
      assert.deepEqual((await list("?query=EXAMPLE.ORG&limit=1")).total, 29);
      assert.deepEqual((await list("?query=USER_2")).total, 10);
      const none = await list("?query=nobody%40nowhere");
      assert.deepEqual([none.total, none.users, none.next], [0, [], null]);
      // Search and status together.
      assert.deepEqual((await list("?query=person.5&status=paused")).users.map((u) => u.userId), [
        "user_05",
      ]);
    });

    await t.step("pages: the cursor walks the whole order once, without gaps", async () => {
      const seen: string[] = [];
      let cursor: string | null = "";
      let pages = 0;
      while (cursor !== null) {
        const page: AdminUsersBody = await list(
          `?limit=7${cursor ? `&cursor=${encodeURIComponent(cursor)}` : ""}`,
        );
        assert.equal(page.total, 30);
        assert.ok(page.users.length <= 7);
        seen.push(...page.users.map((u) => u.userId));
        cursor = page.next;
        pages++;
      }
      assert.equal(pages, 5);
      assert.deepEqual(seen, [...ids].reverse());
      // A filtered list pages the same way.
      const first = await list("?status=active&limit=20");
      const second = await list(`?status=active&limit=20&cursor=${first.next}`);
      assert.equal(second.next, null);
      assert.equal(first.users.length + second.users.length, 26);
    });

    await t.step("bad parameters: 400 invalid_request naming the parameter", async () => {
      for (
        const [query, name] of [
          ["?limit=0", /^limit/],
          ["?limit=201", /^limit/],
          ["?limit=ten", /^limit/],
          ["?status=sleeping", /^status: must be one of "active", "paused", "disabled", "deleted"/],
          ["?cursor=not-a-cursor", /^cursor/],
          [`?query=${"x".repeat(201)}`, /^query/],
        ] as const
      ) {
        const res = await app.request(`/api/admin/users${query}`, { headers: boss });
        assert.equal(res.status, 400, query);
        const body = await json<{ error: { code: string; message: string } }>(res);
        assert.equal(body.error.code, "invalid_request");
        assert.match(body.error.message, name, query);
      }
    });
  } finally {
    await app.close();
  }
});
