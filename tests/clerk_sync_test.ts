import assert from "node:assert/strict";
import { FakeClerkApi } from "./fakes/clerk_api.ts";
import { bearer, clerkEnv, ClerkIssuer, json, type TestApp, testApp } from "./helpers.ts";

const issuer = await ClerkIssuer.create();
const SECRET_KEY = "sk_test_fakeClerkSecretKey0123456789";

/** An app in Clerk mode whose Backend API is the fake, with its KV queue listener running. */
async function syncApp(fake: FakeClerkApi, extra: Record<string, string> = {}) {
  const app = await testApp(
    clerkEnv(issuer, { CLERK_SECRET_KEY: SECRET_KEY, CLERK_API_URL: fake.url, ...extra }),
  );
  const sync = app.services.clerkSync;
  sync.retryDelaysMs = [20, 20, 20];
  sync.backoffSchedule = [20];
  const listening = app.kv.listenQueue(async (message) => {
    if (!(await sync.handleQueueMessage(message))) throw new Error("unexpected queue message");
  });
  return {
    app,
    async close() {
      await sync.idle();
      await app.close();
      await listening;
    },
  };
}

async function provision(app: TestApp, userId: string) {
  const res = await app.request("/api/key", {
    method: "POST",
    headers: bearer(await issuer.token(userId)),
  });
  assert.equal(res.status, 201);
  return await json<{ apiKey: string; keyPrefix: string }>(res);
}

Deno.test("clerk sync: metadata mirror and profile fetch", async (t) => {
  const fake = FakeClerkApi.start({ secretKey: SECRET_KEY });
  const { app, close } = await syncApp(fake);
  try {
    await t.step("a new key is mirrored into public_metadata, never the key itself", async () => {
      fake.addUser({ id: "user_m", email: "m@example.com", firstName: "Mia", lastName: "Moss" });
      const key = await provision(app, "user_m");
      await app.services.clerkSync.idle();
      const patches = fake.succeeded("PATCH /v1/users/user_m/metadata");
      assert.equal(patches.length, 1);
      assert.equal(patches[0].authorization, `Bearer ${SECRET_KEY}`);
      assert.deepEqual(patches[0].body, {
        public_metadata: { keyway: { provisioned: true, keyPrefix: key.keyPrefix, mode: "proxy" } },
      });
      assert.ok(!patches[0].rawBody.includes(key.apiKey));
      assert.ok(!patches[0].rawBody.includes(key.apiKey.slice(7)));
      assert.deepEqual(fake.users.get("user_m")?.public_metadata, {
        keyway: { provisioned: true, keyPrefix: key.keyPrefix, mode: "proxy" },
      });
    });

    await t.step("the profile of a session-provisioned user is fetched from Clerk", async () => {
      const user = await app.services.users.get("user_m");
      assert.equal(user?.profileKnown, true);
      assert.equal(user?.email, "m@example.com");
      assert.equal(user?.firstName, "Mia");
      assert.equal(user?.lastName, "Moss");
      assert.equal(fake.succeeded("GET /v1/users/user_m").length, 1);
    });

    await t.step(
      "rotation mirrors the new prefix; a known profile is not fetched again",
      async () => {
        const res = await app.request("/api/key/rotate", {
          method: "POST",
          headers: bearer(await issuer.token("user_m")),
        });
        assert.equal(res.status, 200);
        const rotated = await json<{ keyPrefix: string; apiKey: string }>(res);
        await app.services.clerkSync.idle();
        const meta = fake.users.get("user_m")?.public_metadata as Record<string, unknown>;
        assert.deepEqual(meta.keyway, {
          provisioned: true,
          keyPrefix: rotated.keyPrefix,
          mode: "proxy",
        });
        assert.equal(fake.succeeded("GET /v1/users/user_m").length, 1);
        assert.ok(fake.calls.every((c) => !c.rawBody.includes(rotated.apiKey)));
      },
    );

    await t.step("a user Clerk does not know (404) is not retried", async () => {
      await provision(app, "user_ghost");
      await app.services.clerkSync.idle();
      const ghostCalls = fake.calls.filter((c) => c.path.startsWith("/v1/users/user_ghost"));
      assert.equal(ghostCalls.length, 1);
      assert.equal(ghostCalls[0].status, 404);
      assert.ok(app.logs.some((l) => l.includes("clerk sync gave up") && l.includes("user_ghost")));
    });

    await t.step("queue messages that are not clerk_sync are not claimed", async () => {
      const sync = app.services.clerkSync;
      assert.equal(await sync.handleQueueMessage({ type: "budget_alert", userId: "x" }), false);
      assert.equal(await sync.handleQueueMessage("hello"), false);
      assert.equal(await sync.handleQueueMessage({ type: "clerk_sync", userId: 5 }), false);
    });
  } finally {
    await close();
    await fake.close();
  }
});

Deno.test("clerk sync: failures are retried through the KV queue until they succeed", async () => {
  const fake = FakeClerkApi.start({ secretKey: SECRET_KEY });
  const { app, close } = await syncApp(fake);
  try {
    fake.addUser({ id: "user_r", email: "r@example.com", firstName: "Rae", lastName: null });
    fake.failNext(3);
    const started = performance.now();
    const key = await provision(app, "user_r");
    // Provisioning answered without waiting for Clerk.
    assert.ok(performance.now() - started < 1000);
    await app.services.clerkSync.idle();
    const failed = fake.calls.filter((c) => c.status === 500);
    assert.equal(failed.length, 3);
    assert.equal(fake.succeeded("GET /v1/users/user_r").length, 1);
    assert.equal(fake.succeeded("PATCH /v1/users/user_r/metadata").length, 1);
    assert.deepEqual(fake.users.get("user_r")?.public_metadata, {
      keyway: { provisioned: true, keyPrefix: key.keyPrefix, mode: "proxy" },
    });
    const user = await app.services.users.get("user_r");
    assert.equal(user?.email, "r@example.com");
    assert.equal(user?.firstName, "Rae");
    assert.equal(user?.lastName, null);
    assert.equal(app.logs.filter((l) => l.includes("clerk sync failed, will retry")).length, 3);
    assert.ok(app.logs.some((l) => l.includes("clerk sync succeeded on retry")));
    assert.ok(app.logs.every((l) => !l.includes(SECRET_KEY)));
  } finally {
    await close();
    await fake.close();
  }
});

Deno.test("clerk sync: gives up after the last retry without touching provisioning", async () => {
  const fake = FakeClerkApi.start({ secretKey: SECRET_KEY });
  const { app, close } = await syncApp(fake);
  try {
    fake.addUser({ id: "user_down", email: "d@example.com" });
    fake.failNext(100);
    const key = await provision(app, "user_down");
    await app.services.clerkSync.idle();
    // The first try plus one per configured retry delay.
    assert.equal(fake.calls.length, 4);
    assert.ok(app.logs.some((l) => l.includes("clerk sync gave up")));
    assert.equal((await app.services.users.resolveKey(key.apiKey))?.id, "user_down");
  } finally {
    await close();
    await fake.close();
  }
});

Deno.test("clerk sync: does nothing without CLERK_SECRET_KEY", async () => {
  const app = await testApp(clerkEnv(issuer));
  try {
    await provision(app, "user_plain");
    await app.services.clerkSync.idle(100);
    const user = await app.services.users.get("user_plain");
    assert.equal(user?.profileKnown, false);
    assert.equal(await app.services.clerkSync.handleQueueMessage({ type: "other" }), false);
  } finally {
    await app.close();
  }
});
