import assert from "node:assert/strict";
import { Events } from "../../lib/alerts/deliver.ts";
import { loadConfig } from "../../lib/core/config.ts";
import { captureLogger } from "../support/helpers.ts";

Deno.test("Events: an alert's once-per-hour claim and the 24-hour alert log follow the injected clock", async () => {
  const kv = await Deno.openKv(":memory:");
  try {
    const config = loadConfig({ DENO_KV_PATH: ":memory:" });
    const { log } = captureLogger([]);
    let now = Date.UTC(2031, 0, 1, 10, 0, 0);
    const events = new Events(config, kv, log, () => now);
    const fields = { model: "glm-4.6", status: 429, upstreamCode: "1305", upstreamMessage: "busy" };

    assert.equal(await events.alert("upstream.throttled", fields), true);
    now += 30 * 60_000;
    assert.equal(await events.alert("upstream.throttled", fields), false, "same clock hour");
    now += 30 * 60_000;
    assert.equal(await events.alert("upstream.throttled", fields), true, "the next clock hour");
    assert.equal((await events.recentAlerts()).length, 2);

    now += 25 * 3_600_000;
    assert.deepEqual(await events.recentAlerts(), [], "older than 24 hours on the injected clock");
    await events.close();
  } finally {
    kv.close();
  }
});
