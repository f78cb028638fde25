/**
 * CONTRACT §5 "Limits are exact under concurrency" and "Upstream capacity is shared fairly", §8:
 * two app processes sharing a self-hosted denokv over KV Connect (milliseconds per commit, not
 * tenths) admit exactly what one would, and a slot freed in one process goes at once to a
 * request waiting in the other.
 */
import assert from "node:assert/strict";
import { keys, u64 } from "../../../lib/core/kv.ts";
import { bearer, eventually, processEnv } from "../../support/helpers.ts";
import { chat, provision, todayUsage } from "../../support/app_clients.ts";
import { DenoKvServer, remoteKvTest } from "../../support/denokv.ts";
import { type RunningMain, startMain } from "../../support/subprocess.ts";
import { ClerkIssuer } from "../../../testing/fakes/clerk_issuer.ts";
import { FakeGlm } from "../../../testing/fakes/glm.ts";

const issuer = await ClerkIssuer.create();

remoteKvTest(
  "remote KV: requests per minute and per-user concurrency are exact across two processes",
  async (bin) => {
    const dir = await Deno.makeTempDir();
    const server = await DenoKvServer.start(bin, dir);
    const glm = new FakeGlm();
    // Answers take a moment, as GLM's do (a call begun while its admission committed, then
    // refused by a concurrent admission elsewhere, is cancelled).
    glm.jsonDelayMs = 150;
    const apps: RunningMain[] = [];
    const held: Response[] = [];
    try {
      const env = processEnv(server.url, glm, issuer, {
        ...server.env,
        RATE_LIMIT_RPM: "1000",
        CONCURRENCY_LIMIT: "8",
        ADMIN_USER_IDS: "user_operator",
      });
      apps.push(await startMain(env, dir), await startMain(env, dir));

      // 30 at once against 7 a minute (the operator's limit for this user), half through each
      // process: exactly 7 admitted.
      const rpmKey = await provision(apps[0], issuer, "user_rpm");
      await provision(apps[0], issuer, "user_operator");
      const limited = await fetch(`${apps[1].url}/api/admin/users/user_rpm/limits`, {
        method: "PUT",
        headers: {
          ...bearer(await issuer.token("user_operator", { ttlSeconds: 600 })),
          "content-type": "application/json",
        },
        body: JSON.stringify({ rpm: 7 }),
      });
      assert.equal(limited.status, 200, await limited.clone().text());
      await limited.body?.cancel();
      const responses = await Promise.all(
        Array.from({ length: 30 }, (_, i) => chat(apps[i % 2], rpmKey)),
      );
      const statuses = responses.map((r) => r.status);
      const bodies = await Promise.all(responses.map((r) => r.json()));
      assert.equal(statuses.filter((s) => s === 200).length, 7, String(statuses));
      assert.equal(statuses.filter((s) => s === 429).length, 23, String(statuses));
      for (const [i, body] of bodies.entries()) {
        if (statuses[i] === 429) assert.equal(body.error.code, "rate_limit_exceeded");
      }
      await eventually(() => glm.count - glm.requestsAborted === 7, 5000, () => glm);
      assert.deepEqual(await todayUsage(apps[1], rpmKey), {
        requests: 7,
        promptTokens: 77,
        completionTokens: 49,
      });

      // Twelve streams at once against 8 in flight, through both processes: exactly 8 admitted.
      glm.mode = "sse";
      glm.holdAfterFirstChunk = true;
      const slotKey = await provision(apps[1], issuer, "user_slots");
      const streams = await Promise.all(
        Array.from({ length: 12 }, (_, i) => chat(apps[i % 2], slotKey, { stream: true })),
      );
      held.push(...streams.filter((r) => r.status === 200));
      const refused = streams.filter((r) => r.status === 429);
      assert.equal(held.length, 8, streams.map((r) => r.status).join(","));
      for (const r of refused) {
        assert.equal((await r.json()).error.code, "concurrency_limit_exceeded");
        assert.equal(r.headers.get("retry-after"), "1");
      }
      glm.release();
      for (const r of held.splice(0)) assert.match(await r.text(), /\[DONE\]/);
      // Every slot came back: nothing held in the shared KV.
      const kv = await server.open();
      try {
        await eventually(async () =>
          u64((await kv.get(keys.leaseHeld("user_slots", "count"))).value) === 0
        );
      } finally {
        kv.close();
      }
      assert.equal((await todayUsage(apps[0], slotKey)).requests, 8);
    } finally {
      glm.holdAfterFirstChunk = false;
      glm.release();
      await Promise.all(held.map((r) => r.body?.cancel()));
      await Promise.all(apps.map((a) => a.stop()));
      await glm.close();
      await server.stop();
      await Deno.remove(dir, { recursive: true });
    }
  },
);

remoteKvTest(
  "remote KV: an upstream slot freed in one process wakes the requests waiting in the other",
  async (bin) => {
    const dir = await Deno.makeTempDir();
    const server = await DenoKvServer.start(bin, dir);
    const glm = new FakeGlm();
    glm.mode = "sse";
    glm.holdAfterFirstChunk = true;
    glm.concurrencyCap = 1;
    const apps: RunningMain[] = [];
    const answers: Promise<string>[] = [];
    try {
      const env = processEnv(server.url, glm, issuer, {
        ...server.env,
        UPSTREAM_CONCURRENCY: "1",
        UPSTREAM_QUEUE_MS: "30000",
      });
      apps.push(await startMain(env, dir), await startMain(env, dir));
      const [a, b] = apps;
      const users = ["user_w0", "user_w1", "user_w2", "user_w3"];
      const keyOf = new Map<string, string>();
      for (const u of users) keyOf.set(u, await provision(a, issuer, u));

      // w0 holds the one slot through A; w1 (through B), w2 (A) and w3 (B) wait in line.
      const send = (app: RunningMain, user: string) =>
        answers.push(
          chat(app, keyOf.get(user)!, { stream: true, content: user }).then(async (res) => {
            assert.equal(res.status, 200, user);
            return await res.text();
          }),
        );
      send(a, "user_w0");
      await eventually(() => glm.count === 1);
      for (const [i, u] of users.slice(1).entries()) {
        send(i % 2 ? a : b, u);
        // Each one in line before the next (the order they are served in).
        const kv = await server.open();
        try {
          await eventually(async () => {
            let waiting = 0;
            for await (const _ of kv.list({ prefix: keys.upstreamTickets("glm-4.6") })) waiting++;
            return waiting === i + 1;
          }, 10_000);
        } finally {
          kv.close();
        }
      }
      assert.equal(glm.count, 1, "the others wait for the slot");

      // Each release ends the answer holding the slot; the next in line, in whichever process it
      // waits, is sent upstream at once — well within the wait's patience.
      const served: string[] = [];
      for (let n = 1; n < users.length; n++) {
        const since = performance.now();
        glm.release();
        await eventually(() => glm.count === n + 1, 10_000, () => glm.count);
        served.push(JSON.parse(glm.requests[n].body).messages[0].content);
        const ms = performance.now() - since;
        assert.ok(ms < 5000, `woken after ${ms.toFixed(0)} ms`);
      }
      assert.deepEqual(served, users.slice(1), "served in the order they waited");
      glm.release();
      for (const text of await Promise.all(answers)) assert.match(text, /\[DONE\]/);
      assert.equal(glm.maxInFlight, 1);
      assert.equal(glm.rejectedOverCap, 0);
    } finally {
      glm.holdAfterFirstChunk = false;
      glm.release();
      await Promise.allSettled(answers);
      await Promise.all(apps.map((app) => app.stop()));
      await glm.close();
    }
    const kv = await server.open();
    try {
      assert.equal(u64((await kv.get(keys.upstreamHeld("glm-4.6"))).value), 0, "the slot is free");
    } finally {
      kv.close();
      await server.stop();
      await Deno.remove(dir, { recursive: true });
    }
  },
);
