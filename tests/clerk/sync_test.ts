import assert from "node:assert/strict";
import { FakeClerkApi } from "../../testing/fakes/clerk_api.ts";
import {
  bearer,
  clerkEnv,
  ClerkIssuer,
  eventually,
  json,
  type TestApp,
  testApp,
} from "../support/helpers.ts";

const issuer = await ClerkIssuer.create();
const SECRET_KEY = "sk_test_fakeClerkSecretKey0123456789";

/** An app in Clerk mode whose Backend API is the fake, with short retry delays. */
async function syncApp(fake: FakeClerkApi, extra: Record<string, string> = {}) {
  const app = await testApp(
    clerkEnv(issuer, { CLERK_SECRET_KEY: SECRET_KEY, CLERK_API_URL: fake.url, ...extra }),
  );
  const sync = app.services.clerkSync;
  sync.retryDelaysMs = [20, 20, 20];
  sync.outbox.pollMs = 20;
  return {
    app,
    async close() {
      await sync.idle();
      await app.close();
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
  } finally {
    await close();
    await fake.close();
  }
});

Deno.test("clerk sync: failures are retried through the KV outbox until they succeed", async () => {
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
    assert.equal(app.services.clerkSync.enabled, false);
    assert.equal(await app.services.clerkSync.outbox.pending(), 0, "no sync stored");
  } finally {
    await app.close();
  }
});

Deno.test("clerk sync: a retry left by a process that stopped is run by another process on the same KV (no KV queue needed)", async () => {
  const dir = await Deno.makeTempDir();
  const fake = FakeClerkApi.start({ secretKey: SECRET_KEY });
  const shared = { DENO_KV_PATH: `${dir}/kv.sqlite3` };
  try {
    fake.addUser({ id: "user_handover", email: "h@example.com", firstName: "Hal", lastName: null });
    fake.failNext(1);
    const a = await syncApp(fake, shared);
    // Long enough for A to stop first on a loaded machine; B runs it once it falls due.
    a.app.services.clerkSync.retryDelaysMs = [1500];
    const key = await provision(a.app, "user_handover");
    await eventually(() =>
      a.app.logs.some((l) => l.includes("clerk sync failed, will retry")) || undefined
    );
    await a.app.close(); // stops before the retry is due; the job stays in KV
    assert.equal(fake.succeeded("PATCH /v1/users/user_handover/metadata").length, 0);

    const b = await syncApp(fake, shared);
    try {
      await b.app.services.clerkSync.idle();
      assert.equal(fake.succeeded("PATCH /v1/users/user_handover/metadata").length, 1);
      assert.deepEqual(fake.users.get("user_handover")?.public_metadata, {
        keyway: { provisioned: true, keyPrefix: key.keyPrefix, mode: "proxy" },
      });
      assert.equal((await b.app.services.users.get("user_handover"))?.email, "h@example.com");
      assert.ok(b.app.logs.some((l) => l.includes("clerk sync succeeded on retry")));
    } finally {
      await b.close();
    }
  } finally {
    await fake.close();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("clerk sync: a Backend API call that never answers is given up on and tried again", async () => {
  const fake = FakeClerkApi.start({ secretKey: SECRET_KEY });
  const { app, close } = await syncApp(fake);
  try {
    app.services.clerkSync.timeoutMs = 200;
    fake.addUser({ id: "user_hang", email: "hang@example.com" });
    fake.hangNext(1);
    const key = await provision(app, "user_hang");
    await app.services.clerkSync.idle();
    assert.deepEqual(fake.users.get("user_hang")?.public_metadata, {
      keyway: { provisioned: true, keyPrefix: key.keyPrefix, mode: "proxy" },
    });
    assert.ok(
      app.logs.some((l) =>
        l.includes("clerk sync failed, will retry") && l.includes("did not answer within 200 ms")
      ),
    );
  } finally {
    await close();
    await fake.close();
  }
});
