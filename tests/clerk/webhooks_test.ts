import assert from "node:assert/strict";
import { Webhook } from "svix";
import { bearer, clerkEnv, ClerkIssuer, json, type TestApp, testApp } from "../support/helpers.ts";
import { signedDelivery } from "../../testing/fakes/svix.ts";

const issuer = await ClerkIssuer.create();

function newSecret(): string {
  return "whsec_" + btoa(String.fromCharCode(...crypto.getRandomValues(new Uint8Array(24))));
}
const SECRET_A = newSecret();
const SECRET_B = newSecret();
const PATH = "/api/webhooks/clerk";

interface Delivery {
  id?: string;
  secret?: string;
  at?: Date;
  headers?: Record<string, string>;
  /** Sent instead of the signed payload (for tampering). */
  body?: string;
}

/** Signs a payload the way Svix does and posts it. */
async function deliver(app: TestApp, payload: unknown, opts: Delivery = {}): Promise<Response> {
  const init = signedDelivery(payload, {
    secret: opts.secret ?? SECRET_A,
    id: opts.id,
    at: opts.at,
  });
  return await app.request(PATH, {
    ...init,
    headers: { ...init.headers, ...opts.headers },
    body: opts.body ?? init.body,
  });
}

function clerkUser(id: string, email: string, first: string | null, last: string | null) {
  return {
    object: "user",
    id,
    first_name: first,
    last_name: last,
    primary_email_address_id: `idn_${id}_2`,
    email_addresses: [
      { object: "email_address", id: `idn_${id}_1`, email_address: `other-${email}` },
      { object: "email_address", id: `idn_${id}_2`, email_address: email },
    ],
    public_metadata: {},
    created_at: Date.now(),
    updated_at: Date.now(),
  };
}

const event = (type: string, data: unknown) => ({
  object: "event",
  type,
  data,
  timestamp: Date.now(),
});

async function expectError(res: Response, status: number, code: string) {
  assert.equal(res.status, status);
  assert.match(res.headers.get("content-type") ?? "", /application\/json/);
  const body = await json<{ error: { code: string; message: string } }>(res);
  assert.equal(body.error.code, code);
  assert.equal(typeof body.error.message, "string");
}

async function expectOk(res: Response, expected: Record<string, unknown> = { ok: true }) {
  assert.equal(res.status, 200);
  assert.match(res.headers.get("content-type") ?? "", /application\/json/);
  assert.deepEqual(await res.json(), expected);
}

Deno.test("webhooks: signature verification", async (t) => {
  const app = await testApp(clerkEnv(issuer, { CLERK_WEBHOOK_SECRET: `${SECRET_A} ${SECRET_B}` }));
  const payload = event("user.created", clerkUser("user_sig", "sig@example.com", "S", "G"));
  try {
    await t.step("unsigned → 400 invalid_signature", async () => {
      const res = await app.request(PATH, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify(payload),
      });
      await expectError(res, 400, "invalid_signature");
    });
    await t.step("signed with an unknown secret → 400", async () => {
      await expectError(
        await deliver(app, payload, { secret: newSecret() }),
        400,
        "invalid_signature",
      );
    });
    await t.step("timestamp 6 minutes old or ahead → 400", async () => {
      for (const offset of [-6 * 60_000, 6 * 60_000]) {
        const res = await deliver(app, payload, { at: new Date(Date.now() + offset) });
        await expectError(res, 400, "invalid_signature");
      }
    });
    await t.step("tampered body → 400", async () => {
      const tampered = JSON.stringify(
        event("user.created", clerkUser("user_evil", "sig@example.com", "S", "G")),
      );
      await expectError(await deliver(app, payload, { body: tampered }), 400, "invalid_signature");
    });
    await t.step("signature valid but svix-id swapped → 400", async () => {
      const res = await deliver(app, payload, { headers: { "svix-id": "msg_other" } });
      await expectError(res, 400, "invalid_signature");
    });
    assert.equal(await app.services.users.get("user_sig"), null);
    assert.equal(await app.services.users.get("user_evil"), null);

    await t.step("either secret verifies during rotation", async () => {
      await expectOk(await deliver(app, payload, { secret: SECRET_B }));
      const second = event("user.created", clerkUser("user_sig2", "s2@example.com", null, null));
      await expectOk(await deliver(app, second, { secret: SECRET_A }));
      assert.equal((await app.services.users.get("user_sig"))?.email, "sig@example.com");
      assert.equal((await app.services.users.get("user_sig2"))?.email, "s2@example.com");
    });
    await t.step("a signature header listing several signatures verifies", async () => {
      const id = "msg_multi";
      const at = new Date();
      const text = JSON.stringify(event("session.created", { id: "sess_1" }));
      const sigs = `${new Webhook(newSecret()).sign(id, at, text)} ${
        new Webhook(SECRET_B).sign(id, at, text)
      }`;
      const res = await deliver(app, text, { id, at, headers: { "svix-signature": sigs } });
      await expectOk(res, { ok: true, ignored: true });
    });
  } finally {
    await app.close();
  }
});

Deno.test("webhooks: not configured → 503; oversized → 413; malformed → 400", async (t) => {
  await t.step("no CLERK_WEBHOOK_SECRET → 503 not_configured", async () => {
    const app = await testApp(clerkEnv(issuer));
    try {
      await expectError(await deliver(app, event("user.created", {})), 503, "not_configured");
    } finally {
      await app.close();
    }
  });
  const app = await testApp(clerkEnv(issuer, { CLERK_WEBHOOK_SECRET: SECRET_A }));
  try {
    await t.step("a signed body over 256 KiB → 413 payload_too_large", async () => {
      const big = event("user.updated", {
        ...clerkUser("user_big", "big@example.com", "B", "G"),
        padding: "x".repeat(256 * 1024),
      });
      await expectError(await deliver(app, big), 413, "payload_too_large");
      assert.equal(await app.services.users.get("user_big"), null);
    });
    await t.step("an oversized stream without content-length → 413", async () => {
      const chunk = new TextEncoder().encode("x".repeat(64 * 1024));
      let sent = 0;
      const body = new ReadableStream<Uint8Array>({
        pull(controller) {
          if (sent++ < 6) controller.enqueue(chunk);
          else controller.close();
        },
      });
      const res = await app.request(PATH, { method: "POST", body });
      await expectError(res, 413, "payload_too_large");
    });
    await t.step("just under the limit is read and verified", async () => {
      const base = JSON.stringify(event("user.updated", clerkUser("u", "e@x.io", null, null)));
      const padded = base.slice(0, -1) + `,"pad":"${"x".repeat(256 * 1024 - base.length - 10)}"}`;
      assert.ok(padded.length < 256 * 1024);
      await expectOk(await deliver(app, padded));
    });
    await t.step("signed but not JSON → 400 invalid_request", async () => {
      await expectError(await deliver(app, "not json"), 400, "invalid_request");
    });
    await t.step("signed user.created without data.id → 400 naming the field", async () => {
      const res = await deliver(app, event("user.created", { first_name: "x" }));
      assert.equal(res.status, 400);
      const body = await json<{ error: { code: string; message: string } }>(res);
      assert.equal(body.error.code, "invalid_request");
      assert.match(body.error.message, /data\.id/);
    });
  } finally {
    await app.close();
  }
});

Deno.test("webhooks: events, duplicates and deletion", async (t) => {
  const app = await testApp(clerkEnv(issuer, { CLERK_WEBHOOK_SECRET: SECRET_A }));
  try {
    await t.step("unknown event type → ignored", async () => {
      await expectOk(await deliver(app, event("session.created", { id: "sess_1" })), {
        ok: true,
        ignored: true,
      });
    });

    let webhookKey = "";
    await t.step("user.created provisions with the primary e-mail and names", async () => {
      const res = await deliver(
        app,
        event("user.created", clerkUser("user_c", "c@example.com", "Cy", "Cole")),
      );
      await expectOk(res);
      const user = await app.services.users.get("user_c");
      assert.equal(user?.status, "active");
      assert.equal(user?.email, "c@example.com");
      assert.equal(user?.firstName, "Cy");
      assert.equal(user?.lastName, "Cole");
      assert.equal(user?.profileKnown, true);
      assert.ok(user?.key);
      // The session sees the same key the webhook created.
      const key = await app.request("/api/key", {
        method: "POST",
        headers: bearer(await issuer.token("user_c")),
      });
      assert.equal(key.status, 200);
      webhookKey = (await json<{ apiKey: string }>(key)).apiKey;
      assert.equal((await app.services.users.resolveKey(webhookKey))?.id, "user_c");
    });

    await t.step("user.created after a session provisioned stores the profile", async () => {
      const res = await app.request("/api/key", {
        method: "POST",
        headers: bearer(await issuer.token("user_first")),
      });
      assert.equal(res.status, 201);
      const { apiKey } = await json<{ apiKey: string }>(res);
      assert.equal((await app.services.users.get("user_first"))?.profileKnown, false);
      await expectOk(
        await deliver(
          app,
          event("user.created", clerkUser("user_first", "f@example.com", "F", null)),
        ),
      );
      const user = await app.services.users.get("user_first");
      assert.equal(user?.email, "f@example.com");
      assert.equal(user?.profileKnown, true);
      assert.equal(await app.services.users.revealKey(user!), apiKey);
    });

    await t.step("user.updated refreshes e-mail and names", async () => {
      await expectOk(
        await deliver(
          app,
          event("user.updated", clerkUser("user_c", "new@example.com", "Cyd", null)),
          {
            id: "msg_update_1",
          },
        ),
      );
      const user = await app.services.users.get("user_c");
      assert.equal(user?.email, "new@example.com");
      assert.equal(user?.firstName, "Cyd");
      assert.equal(user?.lastName, null);
    });

    await t.step(
      "a repeated svix-id is acknowledged as duplicate with no second effect",
      async () => {
        await expectOk(
          await deliver(
            app,
            event("user.updated", clerkUser("user_c", "latest@example.com", "L", "L")),
            {
              id: "msg_update_2",
            },
          ),
        );
        // Svix redelivers the older message: it must not roll the profile back.
        const replay = await deliver(
          app,
          event("user.updated", clerkUser("user_c", "new@example.com", "Cyd", null)),
          { id: "msg_update_1" },
        );
        await expectOk(replay, { ok: true, duplicate: true });
        assert.equal((await app.services.users.get("user_c"))?.email, "latest@example.com");
      },
    );

    await t.step(
      "updates delivered out of order: the newest profile (Clerk's updated_at) wins",
      async () => {
        const at = (updatedAt: number, email: string) => ({
          ...clerkUser("user_order", email, null, null),
          updated_at: updatedAt,
        });
        await expectOk(await deliver(app, event("user.created", at(1_000, "v1@example.com"))));
        await expectOk(await deliver(app, event("user.updated", at(3_000, "v3@example.com"))));
        // v2 was sent before v3 but arrives after it: acknowledged, and nothing rolls back.
        await expectOk(await deliver(app, event("user.updated", at(2_000, "v2@example.com"))));
        assert.equal((await app.services.users.get("user_order"))?.email, "v3@example.com");
        await expectOk(await deliver(app, event("user.updated", at(3_000, "v3b@example.com"))));
        assert.equal((await app.services.users.get("user_order"))?.email, "v3b@example.com");
        await expectOk(await deliver(app, event("user.updated", at(4_000, "v4@example.com"))));
        const user = await app.services.users.get("user_order");
        assert.equal(user?.email, "v4@example.com");
        assert.equal(user?.clerkUpdatedAt, 4_000);
      },
    );

    await t.step(
      "a user.updated that arrives before its user.created: the newer profile stays",
      async () => {
        const at = (updatedAt: number, email: string) => ({
          ...clerkUser("user_early", email, null, null),
          updated_at: updatedAt,
        });
        await expectOk(await deliver(app, event("user.updated", at(2_000, "new@example.com"))));
        const early = await app.services.users.get("user_early");
        assert.equal(early?.email, "new@example.com", "provisioned from the update");
        assert.ok(early?.key, "with a key, as user.created would");
        await expectOk(await deliver(app, event("user.created", at(1_000, "old@example.com"))));
        const user = await app.services.users.get("user_early");
        assert.equal(user?.email, "new@example.com");
        assert.equal(user?.key?.prefix, early?.key?.prefix, "one key");
      },
    );

    await t.step("20 concurrent deliveries of one id: exactly one is applied", async () => {
      const payload = event("user.created", clerkUser("user_burst", "b@example.com", "B", null));
      const results = await Promise.all(
        Array.from({ length: 20 }, () => deliver(app, payload, { id: "msg_burst" })),
      );
      const bodies = await Promise.all(results.map((r) => r.json()));
      assert.ok(results.every((r) => r.status === 200));
      assert.equal(bodies.filter((b) => b.duplicate === true).length, 19);
      assert.equal(bodies.filter((b) => b.ok === true && !b.duplicate).length, 1);
      assert.equal((await app.services.users.get("user_burst"))?.email, "b@example.com");
    });

    await t.step("a delivery whose processing fails can be retried with the same id", async () => {
      const users = app.services.users;
      const original = users.provision;
      users.provision = () => Promise.reject(new Error("KV is down"));
      const payload = event("user.created", clerkUser("user_retry", "r@example.com", null, null));
      try {
        const res = await deliver(app, payload, { id: "msg_retry" });
        await expectError(res, 500, "internal_error");
      } finally {
        users.provision = original;
      }
      assert.equal(await users.get("user_retry"), null);
      await expectOk(await deliver(app, payload, { id: "msg_retry" }));
      assert.equal((await users.get("user_retry"))?.email, "r@example.com");
      await expectOk(await deliver(app, payload, { id: "msg_retry" }), {
        ok: true,
        duplicate: true,
      });
    });

    await t.step("user.deleted revokes the key and drops the profile", async () => {
      await expectOk(
        await deliver(app, event("user.deleted", { object: "user", id: "user_c", deleted: true })),
      );
      const user = await app.services.users.get("user_c");
      assert.equal(user?.status, "deleted");
      assert.equal(user?.email, null);
      assert.equal(user?.firstName, null);
      assert.equal(user?.key, null);
      assert.equal(await app.services.users.resolveKey(webhookKey), null);
    });

    await t.step(
      "a late user.created is acknowledged but does not bring the user back",
      async () => {
        const late = event("user.created", clerkUser("user_c", "c@example.com", "Cy", "Cole"));
        await expectOk(await deliver(app, late));
        const user = await app.services.users.get("user_c");
        assert.equal(user?.status, "deleted");
        assert.equal(user?.email, null);
        const res = await app.request("/api/key", {
          method: "POST",
          headers: bearer(await issuer.token("user_c")),
        });
        await expectError(res, 403, "user_deleted");
        const update = event("user.updated", clerkUser("user_c", "c@example.com", "Cy", "Cole"));
        await expectOk(await deliver(app, update));
        assert.equal((await app.services.users.get("user_c"))?.email, null);
      },
    );

    await t.step("user.deleted for a never-seen id blocks a later user.created", async () => {
      await expectOk(
        await deliver(app, event("user.deleted", { id: "user_early", deleted: true })),
      );
      await expectOk(
        await deliver(
          app,
          event("user.created", clerkUser("user_early", "e@example.com", "E", null)),
        ),
      );
      assert.equal((await app.services.users.get("user_early"))?.status, "deleted");
    });

    await t.step("logs carry no e-mail addresses", () => {
      assert.ok(app.logs.every((l) => !l.includes("@example.com")));
    });
  } finally {
    await app.close();
  }
});
