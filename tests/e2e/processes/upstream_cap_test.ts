/**
 * GLM's concurrency cap over two real app processes on one KV file: the shared upstream slots
 * keep GLM's 1302 from any client and never more than the cap in flight.
 */
import assert from "node:assert/strict";
import { keys, u64 } from "../../../lib/core/kv.ts";
import { type RunningMain, startMain } from "../../support/subprocess.ts";
import { ClerkIssuer } from "../../../testing/fakes/clerk_issuer.ts";
import { FakeGlm } from "../../../testing/fakes/glm.ts";
import { bearer, processEnv } from "../../support/helpers.ts";
import { post } from "../../support/gateway_setup.ts";

const issuer = await ClerkIssuer.create();

Deno.test("100 concurrent requests over two processes against GLM's cap: no 1302 reaches a client, never more than the cap in flight", async () => {
  const dir = await Deno.makeTempDir();
  const glm = new FakeGlm();
  const CAP = 4;
  glm.concurrencyCap = CAP;
  glm.jsonDelayMs = 100;
  const apps: RunningMain[] = [];
  try {
    const kvPath = `${dir}/kv.sqlite3`;
    const extra = {
      UPSTREAM_CONCURRENCY: String(CAP),
      UPSTREAM_QUEUE_MS: "1500",
      CONCURRENCY_LIMIT: "64",
      RATE_LIMIT_RPM: "1000",
    };
    apps.push(
      await startMain(processEnv(kvPath, glm, issuer, extra), dir),
      await startMain(processEnv(kvPath, glm, issuer, extra), dir),
    );
    const keysOf: string[] = [];
    for (let u = 0; u < 5; u++) {
      const res = await fetch(`${apps[0].url}/api/key`, {
        headers: bearer(await issuer.token(`user_cap_${u}`, { ttlSeconds: 600 })),
      });
      keysOf.push((await res.json()).apiKey);
    }
    const results = await Promise.all(
      Array.from({ length: 100 }, async (_, i) => {
        const started = performance.now();
        const res = await post(apps[i % 2].url, keysOf[i % 5]);
        const body = await res.json();
        return { status: res.status, body, ms: performance.now() - started, res };
      }),
    );
    const ok = results.filter((r) => r.status === 200);
    const busy = results.filter((r) => r.status === 503);
    assert.equal(ok.length + busy.length, 100, results.map((r) => r.status).join(","));
    console.log(
      `  ${ok.length} answered, ${busy.length} × 503 upstream_busy; GLM saw at most ` +
        `${glm.maxInFlight} in flight, answered 1302 ${glm.rejectedOverCap} times`,
    );
    assert.equal(glm.rejectedOverCap, 0, "GLM never had to answer 1302");
    assert.ok(glm.maxInFlight <= CAP, `GLM saw ${glm.maxInFlight} in flight`);
    assert.equal(glm.maxInFlight, CAP, "the slots are used");
    for (const r of busy) {
      assert.equal(r.body.error.code, "upstream_busy");
      assert.match(r.res.headers.get("retry-after") ?? "", /^\d+$/);
      assert.ok(r.ms >= 1400, `503 only after the wait (${r.ms} ms)`);
    }
    // 100 ms answers, 4 at a time, 1.5 s of patience: some of each.
    assert.ok(ok.length >= 20 && busy.length >= 10, `${ok.length} ok, ${busy.length} busy`);
    assert.equal(glm.count, ok.length, "exactly the answered requests went upstream");
    // Only what was served is counted.
    let counted = 0;
    for (const key of keysOf) {
      const res = await fetch(`${apps[1].url}/api/usage?days=1`, { headers: bearer(key) });
      counted += (await res.json()).today.requests;
    }
    assert.equal(counted, ok.length);
  } finally {
    await Promise.all(apps.map((a) => a.stop()));
    await glm.close();
  }
  const kv = await Deno.openKv(`${dir}/kv.sqlite3`);
  try {
    assert.equal(u64((await kv.get(keys.upstreamHeld("glm-4.6"))).value), 0, "every slot freed");
  } finally {
    kv.close();
    await Deno.remove(dir, { recursive: true });
  }
});
