/**
 * CONTRACT §8: the self-hosted denokv stops in the middle of traffic and comes back. Meanwhile
 * requests fail clearly (a 5xx JSON error within seconds, never a hang); nothing is half-written
 * (every charged request carries its metered usage once, every slot comes back); and service
 * resumes on its own once the server is back.
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

interface Outcome {
  status: number;
  code: string | null;
  ms: number;
  phase: "before" | "down" | "after";
}

remoteKvTest(
  "remote KV: denokv stopped and restarted mid-traffic — clear 5xx meanwhile, nothing half-written, service resumes",
  async (bin) => {
    const dir = await Deno.makeTempDir();
    const server = await DenoKvServer.start(bin, dir);
    const glm = new FakeGlm();
    glm.jsonDelayMs = 20;
    let app: RunningMain | undefined;
    let stop = false;
    let workers: Promise<void>[] = [];
    try {
      const env = processEnv(server.url, glm, issuer, { ...server.env, RATE_LIMIT_RPM: "100000" });
      app = await startMain(env, dir);
      const running = app;
      const users = ["user_r0", "user_r1", "user_r2", "user_r3"];
      const keyOf = new Map<string, string>();
      for (const u of users) keyOf.set(u, await provision(running, issuer, u));

      let phase: Outcome["phase"] = "before";
      const outcomes = new Map<string, Outcome[]>(users.map((u) => [u, []]));
      // One worker per user, requests back to back; bounded by `stop` and by a count.
      workers = users.map(async (u) => {
        for (let n = 0; n < 2000 && !stop; n++) {
          const at = phase;
          const started = performance.now();
          let res: Response;
          try {
            res = await chat(running, keyOf.get(u)!);
          } catch (err) {
            // The app stopped answering: the test fails below, with the app's log.
            outcomes.get(u)!.push({ status: 0, code: String(err), ms: 0, phase: at });
            stop = true;
            return;
          }
          const body = await res.text();
          let code: string | null = null;
          if (res.status !== 200) {
            assert.match(res.headers.get("content-type") ?? "", /application\/json/, body);
            code = JSON.parse(body).error.code;
          }
          outcomes.get(u)!.push({
            status: res.status,
            code,
            ms: performance.now() - started,
            phase: at,
          });
          if (res.status !== 200) await new Promise((r) => setTimeout(r, 100));
        }
      });
      const all = () => {
        const seen = [...outcomes.values()].flat();
        const lost = seen.find((o) => o.status === 0);
        if (lost) throw new Error(`the app stopped answering: ${lost.code}`);
        return seen;
      };
      await eventually(() => all().filter((o) => o.status === 200).length >= 20, 15_000);

      await server.stop("SIGKILL");
      phase = "down";
      // While it is down every request fails, with a 5xx JSON error, within seconds.
      await eventually(
        () => all().filter((o) => o.phase === "down" && o.status >= 500).length >= 8,
        30_000,
        () => all().filter((o) => o.phase === "down"),
      );
      await server.restart();
      phase = "after";
      // Service resumes once the writes given up on during the outage have finished: each waits
      // out the KV Connect client's own retry back-off, which grows with the outage (tens of
      // seconds on a loaded machine), so this waits longer than the outage checks above.
      await eventually(
        () => all().filter((o) => o.phase === "after" && o.status === 200).length >= 20,
        90_000,
        () => all().filter((o) => o.phase === "after").slice(-5),
      );
      stop = true;
      await Promise.all(workers);

      const down = all().filter((o) => o.phase === "down");
      for (const o of down) {
        assert.ok(o.status >= 500 || o.status === 200, `while down: ${JSON.stringify(o)}`);
        assert.ok(o.ms < 15_000, `answered within 15 s: ${JSON.stringify(o)}`);
      }
      console.log(
        `  while denokv was down: ${down.length} answers, statuses ${
          [
            ...new Set(down.map((o) => `${o.status} ${o.code ?? ""}`.trim())),
          ].join(", ")
        }, slowest ${Math.max(...down.map((o) => o.ms)).toFixed(0)} ms`,
      );

      // Nothing half-written: once the requests caught in the outage are settled (their
      // settlements are retried in the background), no slot or reservation is left held, and each
      // user's charged requests carry the fake's usage exactly once each.
      const kv = await server.open();
      try {
        for (const u of users) {
          await eventually(
            async () => u64((await kv.get(keys.leaseHeld(u, "count"))).value) === 0,
            30_000,
          );
          assert.equal(u64((await kv.get(keys.leaseHeld(u, "tokens"))).value), 0);
          const usage = await todayUsage(running, keyOf.get(u)!);
          const ok = outcomes.get(u)!.filter((o) => o.status === 200).length;
          const failed = outcomes.get(u)!.filter((o) => o.status >= 500).length;
          assert.ok(
            usage.requests >= ok && usage.requests <= ok + failed,
            `${u}: charged ${usage.requests}, answered ${ok}, failed ${failed}`,
          );
          assert.equal(usage.promptTokens, usage.requests * glm.usage.prompt_tokens, u);
          assert.equal(usage.completionTokens, usage.requests * glm.usage.completion_tokens, u);
        }
        let leases = 0;
        for await (const _ of kv.list({ prefix: ["leases"] })) leases++;
        assert.equal(leases, 0, "no lease left behind");
      } finally {
        kv.close();
      }
    } catch (err) {
      const log = app?.output().stderr.split("\n")
        .filter((l) => !l.includes("KV Connect failed to call")).slice(-20).join("\n");
      throw new Error(`${err}\napp log:\n${log}\ndenokv log:\n${server.log()}`);
    } finally {
      stop = true;
      await Promise.all(workers);
      await app?.stop();
      await glm.close();
      await server.stop();
      await Deno.remove(dir, { recursive: true });
    }
  },
);
