/** Provisioning stays idempotent when sessions and webhooks race for the same users. */
import assert from "node:assert/strict";
import { bearer, clerkEnv, ClerkIssuer, json, testApp } from "../support/helpers.ts";
import { signedDelivery, userCreated, WEBHOOK_SECRET } from "../../testing/fakes/svix.ts";

const issuer = await ClerkIssuer.create();

Deno.test("200 concurrent provisioning calls and webhooks for 20 users: 20 users, 20 keys", async () => {
  const app = await testApp(clerkEnv(issuer, { CLERK_WEBHOOK_SECRET: WEBHOOK_SECRET }));
  try {
    const ids = Array.from({ length: 20 }, (_, i) => `user_race_${i}`);
    const tokens = new Map(
      await Promise.all(ids.map(async (id) => [id, await issuer.token(id)] as const)),
    );
    // Per user: 7 session calls (GET/POST, both paths) and 3 webhook deliveries (distinct ids).
    const calls: Array<
      { userId: string; kind: "session" | "webhook"; run: () => Promise<Response> }
    > = [];
    for (const id of ids) {
      const paths = ["/api/key", "/api/auth/provision-user"];
      for (let i = 0; i < 7; i++) {
        const method = i % 2 ? "GET" : "POST";
        calls.push({
          userId: id,
          kind: "session",
          run: () => app.request(paths[i % 2], { method, headers: bearer(tokens.get(id)!) }),
        });
      }
      for (let i = 0; i < 3; i++) {
        calls.push({
          userId: id,
          kind: "webhook",
          run: () => app.request("/api/webhooks/clerk", signedDelivery(userCreated(id))),
        });
      }
    }
    // Shuffle so sessions and webhooks interleave differently for every user.
    for (let i = calls.length - 1; i > 0; i--) {
      const j = Math.floor(Math.random() * (i + 1));
      [calls[i], calls[j]] = [calls[j], calls[i]];
    }
    assert.equal(calls.length, 200);
    const responses = await Promise.all(calls.map((c) => c.run()));

    const seen = new Map<string, Set<string>>();
    let created = 0;
    for (const [i, res] of responses.entries()) {
      const call = calls[i];
      assert.ok(res.status === 200 || res.status === 201, `${call.kind} ${res.status}`);
      const body = await json(res);
      if (call.kind === "webhook") {
        assert.equal(body.ok, true);
        continue;
      }
      if (res.status === 201) created++;
      assert.equal(body.userId, call.userId);
      const set = seen.get(call.userId) ?? new Set();
      set.add(String(body.apiKey));
      seen.set(call.userId, set);
    }
    let users = 0;
    for await (const _ of app.kv.list({ prefix: ["users"] })) users++;
    let indexed = 0;
    for await (const _ of app.kv.list({ prefix: ["keys_by_hash"] })) indexed++;
    assert.equal(users, 20);
    assert.equal(indexed, 20);
    assert.ok(created <= 20, `at most one 201 per user, got ${created}`);
    for (const id of ids) {
      const keys = seen.get(id)!;
      assert.equal(keys.size, 1, `${id} saw ${keys.size} different keys`);
      const stored = await app.services.users.get(id);
      assert.equal(await app.services.users.revealKey(stored!), [...keys][0]);
      assert.equal(stored!.email, `${id}@example.com`, "the webhook's profile is kept");
    }
  } finally {
    await app.close();
  }
});
