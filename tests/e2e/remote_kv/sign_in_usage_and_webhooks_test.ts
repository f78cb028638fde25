/**
 * CONTRACT §8 over a real KV Connect connection: two app processes sharing a self-hosted denokv.
 * A session gets its key from either process; gateway answers (JSON, SSE, Anthropic) count in
 * the usage the other process reports as soon as they end; Clerk webhooks are idempotent
 * whichever process a delivery reaches.
 */
import assert from "node:assert/strict";
import { bearer, processEnv } from "../../support/helpers.ts";
import { todayUsage } from "../../support/app_clients.ts";
import { DenoKvServer, remoteKvTest } from "../../support/denokv.ts";
import { type RunningMain, startMain } from "../../support/subprocess.ts";
import { ClerkIssuer } from "../../../testing/fakes/clerk_issuer.ts";
import { FakeGlm } from "../../../testing/fakes/glm.ts";
import { signedDelivery, userCreated, WEBHOOK_SECRET } from "../../../testing/fakes/svix.ts";

const issuer = await ClerkIssuer.create();

remoteKvTest(
  "remote KV: sign-in → key, answers counted at once across processes, webhooks once",
  async (bin) => {
    const dir = await Deno.makeTempDir();
    const kv = await DenoKvServer.start(bin, dir);
    const glm = new FakeGlm();
    const apps: RunningMain[] = [];
    try {
      const env = processEnv(kv.url, glm, issuer, {
        ...kv.env,
        CLERK_WEBHOOK_SECRET: WEBHOOK_SECRET,
      });
      apps.push(await startMain(env, dir), await startMain(env, dir));
      const [a, b] = apps;

      // Sign-in → key: the first call creates it (201), the other process returns the same one.
      const session = bearer(await issuer.token("user_remote", { ttlSeconds: 600 }));
      const created = await fetch(`${a.url}/api/key`, { method: "POST", headers: session });
      assert.equal(created.status, 201);
      const { apiKey } = await created.json();
      assert.match(apiKey, /^kw_/);
      const again = await fetch(`${b.url}/api/key`, { method: "POST", headers: session });
      assert.equal(again.status, 200);
      assert.equal((await again.json()).apiKey, apiKey);

      // Each answer, through either process, is in the other's usage the moment it has ended.
      const calls: Array<[RunningMain, string, Record<string, unknown>, "json" | "sse"]> = [
        [a, "/v1/chat/completions", { messages: [{ role: "user", content: "hi" }] }, "json"],
        [b, "/v1/chat/completions", {
          messages: [{ role: "user", content: "hi" }],
          stream: true,
        }, "sse"],
        [a, "/v1/messages", {
          max_tokens: 64,
          messages: [{ role: "user", content: "hi" }],
          stream: true,
        }, "sse"],
        [
          b,
          "/v1/messages",
          { max_tokens: 64, messages: [{ role: "user", content: "hi" }] },
          "json",
        ],
      ];
      let n = 0;
      for (const [app, path, body, mode] of calls) {
        glm.mode = mode;
        const res = await fetch(`${app.url}${path}`, {
          method: "POST",
          headers: { ...bearer(apiKey), "content-type": "application/json" },
          body: JSON.stringify({ model: "glm-4.6", ...body }),
        });
        assert.equal(res.status, 200, `${path} (${mode})`);
        assert.match(
          res.headers.get("content-type") ?? "",
          mode === "sse" ? /text\/event-stream/ : /application\/json/,
        );
        const text = await res.text();
        assert.ok(text.length > 0);
        n++;
        const other = app === a ? b : a;
        assert.deepEqual(await todayUsage(other, apiKey), {
          requests: n,
          promptTokens: 11 * n,
          completionTokens: 7 * n,
        }, `after ${path} (${mode}) through one process, the other counts it`);
      }

      // A Clerk delivery retried to both processes: one effect, the repeat answered as such.
      const delivery = signedDelivery(userCreated("user_from_clerk"));
      const first = await fetch(`${a.url}/api/webhooks/clerk`, delivery);
      assert.equal(first.status, 200);
      assert.deepEqual(await first.json(), { ok: true });
      const repeat = await fetch(`${b.url}/api/webhooks/clerk`, delivery);
      assert.equal(repeat.status, 200);
      assert.deepEqual(await repeat.json(), { ok: true, duplicate: true });
      // The user it provisioned has one key, whichever process is asked.
      const clerkSession = bearer(await issuer.token("user_from_clerk", { ttlSeconds: 600 }));
      const keys = await Promise.all(apps.map(async (app) => {
        const res = await fetch(`${app.url}/api/key`, { headers: clerkSession });
        assert.equal(res.status, 200);
        return (await res.json()).apiKey;
      }));
      assert.equal(keys[0], keys[1]);
    } finally {
      await Promise.all(apps.map((app) => app.stop()));
      await glm.close();
      await kv.stop();
      await Deno.remove(dir, { recursive: true });
    }
  },
);
