/**
 * CONTRACT §5 "slots held by a process that died are freed within 60 s", §8: over a self-hosted
 * denokv, the process that survives a SIGKILLed one frees the dead one's in-flight slots,
 * upstream slots and reservations, and charges its requests their estimate, once.
 */
import assert from "node:assert/strict";
import { keys, u64 } from "../../../lib/core/kv.ts";
import { eventually, processEnv } from "../../support/helpers.ts";
import { chat, provision, todayUsage } from "../../support/app_clients.ts";
import { DenoKvServer, remoteKvTest } from "../../support/denokv.ts";
import { type RunningMain, startMain } from "../../support/subprocess.ts";
import { ClerkIssuer } from "../../../testing/fakes/clerk_issuer.ts";
import { FakeGlm } from "../../../testing/fakes/glm.ts";

const issuer = await ClerkIssuer.create();

remoteKvTest(
  "remote KV: a SIGKILLed process's slots and reservations are recovered by the other, charged once",
  async (bin) => {
    const dir = await Deno.makeTempDir();
    const server = await DenoKvServer.start(bin, dir);
    const glm = new FakeGlm();
    glm.mode = "sse";
    glm.holdAfterFirstChunk = true; // admitted streams stay in flight until released
    const apps: RunningMain[] = [];
    const open: Response[] = [];
    try {
      const env = processEnv(server.url, glm, issuer, {
        ...server.env,
        CONCURRENCY_LIMIT: "2",
        UPSTREAM_CONCURRENCY: "2",
        UPSTREAM_USER_SHARE: "1",
        TOKEN_LIMIT_DAILY: "100000",
      });
      const [a, b] = [await startMain(env, dir), await startMain(env, dir)];
      apps.push(a, b);
      const key = await provision(a, issuer, "user_crash");

      // A holds both of the user's slots (and both upstream slots), each stream under way.
      for (let i = 0; i < 2; i++) {
        const res = await chat(a, key, { stream: true });
        assert.equal(res.status, 200);
        await res.body!.getReader().read(); // the first chunk: the upstream processed it
        open.push(res);
      }
      const refused = await chat(b, key, { stream: true });
      assert.equal(refused.status, 429, "B sees A's slots");
      assert.equal((await refused.json()).error.code, "concurrency_limit_exceeded");
      const kv = await server.open();
      try {
        assert.ok(u64((await kv.get(keys.leaseHeld("user_crash", "tokens"))).value) > 0);

        const killedAt = performance.now();
        await a.stop("SIGKILL");
        open.length = 0; // their connections died with A
        // B's reaper finds A's heartbeat expired: both requests charged their estimate (6 prompt
        // tokens each), their reservations and slots freed.
        const reaped = await eventually(async () => {
          const u = await todayUsage(b, key);
          return u.requests === 2 ? u : undefined;
        }, 60_000);
        const seconds = (performance.now() - killedAt) / 1000;
        assert.equal(reaped.promptTokens, 12);
        assert.ok(seconds < 60, `recovered after ${seconds.toFixed(1)} s`);
        for (const field of ["count", "tokens", "nano"] as const) {
          assert.equal(u64((await kv.get(keys.leaseHeld("user_crash", field))).value), 0, field);
        }
        assert.equal(u64((await kv.get(keys.upstreamHeld("glm-4.6"))).value), 0);

        // Both slots serve again, through B.
        const again = await Promise.all([
          chat(b, key, { stream: true }),
          chat(b, key, { stream: true }),
        ]);
        assert.deepEqual(again.map((r) => r.status), [200, 200]);
        glm.release();
        for (const r of again) assert.match(await r.text(), /\[DONE\]/);
        // A's requests were charged once: 2 estimated + 2 metered (11 prompt tokens each).
        const final = await todayUsage(b, key);
        assert.equal(final.requests, 4);
        assert.equal(final.promptTokens, 12 + 22);
        assert.equal(final.completionTokens, reaped.completionTokens + 14);
        let leases = 0;
        for await (const _ of kv.list({ prefix: ["leases"] })) leases++;
        assert.equal(leases, 0, "no lease left behind");
      } finally {
        kv.close();
      }
    } finally {
      glm.holdAfterFirstChunk = false;
      glm.release();
      await Promise.all(open.map((r) => r.body?.cancel().catch(() => {})));
      await Promise.all(apps.map((app) => app.stop()));
      await glm.close();
      await server.stop();
      await Deno.remove(dir, { recursive: true });
    }
  },
);
