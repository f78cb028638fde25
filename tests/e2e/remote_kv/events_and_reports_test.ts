/**
 * CONTRACT §7, §8 over a self-hosted denokv: the events outbox, polled by two processes, delivers
 * each event once (retried by whichever process claims it); the cost summary the cron runs and
 * `deno task report` agree with the live counters, before and after the summary is written.
 */
import assert from "node:assert/strict";
import { bearer, eventually, processEnv, runReport } from "../../support/helpers.ts";
import { chat, todayUsage } from "../../support/app_clients.ts";
import { DenoKvServer, remoteKvTest } from "../../support/denokv.ts";
import { type RunningMain, startMain } from "../../support/subprocess.ts";
import { ClerkIssuer } from "../../../testing/fakes/clerk_issuer.ts";
import { FakeGlm } from "../../../testing/fakes/glm.ts";
import { EVENTS_SECRET, Receiver } from "../../../testing/fakes/events_receiver.ts";
import { signedDelivery, userCreated, WEBHOOK_SECRET } from "../../../testing/fakes/svix.ts";

const issuer = await ClerkIssuer.create();

/** `deno task summarize` (the cron's code) as a process on the server's KV. */
async function summarize(env: Record<string, string>) {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", new URL("../../../tasks/summarize.ts", import.meta.url).pathname],
    env: { NO_COLOR: "1", ...env },
    stdout: "piped",
    stderr: "piped",
  }).output();
  const dec = new TextDecoder();
  return { code: out.code, stdout: dec.decode(out.stdout), stderr: dec.decode(out.stderr) };
}

remoteKvTest(
  "remote KV: each event delivered once by two processes; summary and report agree with live counters",
  async (bin) => {
    const dir = await Deno.makeTempDir();
    const server = await DenoKvServer.start(bin, dir);
    const glm = new FakeGlm();
    const receiver = new Receiver();
    receiver.failFirst = 1; // every event's first attempt fails: a retry, by either process
    const apps: RunningMain[] = [];
    try {
      const env = processEnv(server.url, glm, issuer, {
        ...server.env,
        CLERK_WEBHOOK_SECRET: WEBHOOK_SECRET,
        EVENTS_WEBHOOK_URL: receiver.url,
        EVENTS_WEBHOOK_SECRET: EVENTS_SECRET,
      });
      apps.push(await startMain(env, dir), await startMain(env, dir));
      const users = ["user_ev0", "user_ev1", "user_ev2", "user_ev3"];
      // Provisioned by Clerk's webhook, through either process (the e-mail comes with it).
      for (const [i, id] of users.entries()) {
        const res = await fetch(
          `${apps[i % 2].url}/api/webhooks/clerk`,
          signedDelivery(userCreated(id)),
        );
        assert.equal(res.status, 200);
        await res.body?.cancel();
      }
      const keys: string[] = [];
      for (const [i, id] of users.entries()) {
        const session = bearer(await issuer.token(id, { ttlSeconds: 600 }));
        const res = await fetch(`${apps[(i + 1) % 2].url}/api/key/rotate`, {
          method: "POST",
          headers: session,
        });
        assert.equal(res.status, 200);
        keys.push((await res.json()).apiKey);
      }
      const expected = users.length * 2; // user.provisioned and key.rotated for each
      await eventually(() => receiver.deliveries.length >= expected, 30_000, () => ({
        delivered: receiver.deliveries.map((d) => d.body.type),
        attempts: [...receiver.attempts.values()],
      }));

      // Some traffic meanwhile, through both processes: 1 + 2 + 3 + 4 requests.
      for (const [i, key] of keys.entries()) {
        for (let n = 0; n <= i; n++) {
          const res = await chat(apps[n % 2], key);
          assert.equal(res.status, 200);
          await res.body?.cancel();
        }
      }

      // Settle: a moment for any stray retry to show up, then each event once, none lost.
      const kv = await server.open();
      try {
        await eventually(async () => {
          for await (const _ of kv.list({ prefix: ["event_outbox"] })) return false;
          return true;
        }, 10_000);
      } finally {
        kv.close();
      }
      assert.equal(receiver.rejected, 0);
      const ids = receiver.deliveries.map((d) => d.id);
      assert.equal(new Set(ids).size, ids.length, "no event delivered twice");
      assert.equal(ids.length, expected);
      for (const id of users) {
        for (const type of ["user.provisioned", "key.rotated"]) {
          const got = receiver.ofType(type).filter((d) => d.body.userId === id);
          assert.equal(got.length, 1, `${type} for ${id}`);
          assert.equal(receiver.attempts.get(got[0].id), 2, "one failed attempt, one delivery");
        }
      }

      // The report agrees with the live counters, before and after the summary is written.
      const live = await Promise.all(keys.map((k, i) => todayUsage(apps[i % 2], k)));
      assert.deepEqual(live.map((u) => u.requests), [1, 2, 3, 4]);
      const totals = (report: { users: Array<Record<string, unknown>> }) =>
        users.map((id) => {
          const row = report.users.find((u) => u.userId === id);
          return {
            requests: row?.requests,
            promptTokens: row?.promptTokens,
            completionTokens: row?.completionTokens,
          };
        });
      const before = await runReport(["--format", "json"], server.url, server.env);
      assert.equal(before.code, 0, before.stderr);
      assert.deepEqual(totals(JSON.parse(before.stdout)), live);
      const summary = await summarize(server.env);
      assert.equal(summary.code, 0, summary.stderr);
      assert.match(summary.stdout, /^Summarized 1 UTC day\b/);
      assert.match(summary.stdout, /^Total\s+10\s+[\d,]+\s+(\$[\d,]+\.\d\d|<\$0\.01)$/m);
      const after = await runReport(["--format", "json"], server.url, server.env);
      assert.equal(after.code, 0, after.stderr);
      assert.deepEqual(JSON.parse(after.stdout), JSON.parse(before.stdout));
    } finally {
      await Promise.all(apps.map((app) => app.stop()));
      await receiver.close();
      await glm.close();
      await server.stop();
      await Deno.remove(dir, { recursive: true });
    }
  },
);
