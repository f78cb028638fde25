/**
 * Device-flow starts are limited per client address (CONTRACT §5 Connecting an editor), well
 * under the instance-wide cap: one address that floods POST /api/connect/device is refused, and
 * an editor at another address can still start. A real server on a dual-stack socket, so the
 * client address is the connection's own: 127.0.0.1 and ::1 are two clients.
 */
import assert from "node:assert/strict";
import { createApp } from "../../routes/mod.ts";
import { formPost, testApp } from "../support/helpers.ts";

Deno.test("connect: 650 device starts from one address limit that address, not another", async () => {
  // The flood must not straddle a clock minute (the counts are per minute): time stands still.
  const at = Date.now();
  const app = await testApp({}, { connect: { now: () => at } });
  const server = Deno.serve(
    { hostname: "::", port: 0, onListen: () => {} },
    createApp(app.services).fetch,
  );
  const start = (host: string) =>
    fetch(`http://${host}:${server.addr.port}/api/connect/device`, {
      method: "POST",
      // Local mode answers only loopback Host names; the address is the connection's.
      headers: { "content-type": "application/json", host: "localhost" },
      body: JSON.stringify({ client: "Visual Studio Code" }),
    });
  try {
    const perAddress = app.services.connect.deviceStartsPerAddress;
    assert.ok(perAddress * 10 <= app.services.connect.deviceStartsPerMinute);
    const statuses: number[] = [];
    let retryAfter = "";
    // 650 starts, 50 at a time, as fast as the address can send them.
    for (let sent = 0; sent < 650; sent += 50) {
      const batch = await Promise.all(Array.from({ length: 50 }, () => start("127.0.0.1")));
      for (const res of batch) {
        statuses.push(res.status);
        if (res.status === 429) {
          const body = await res.json();
          assert.equal(body.error.code, "rate_limit_exceeded");
          assert.match(body.error.message, /from your address/);
          retryAfter = res.headers.get("retry-after") ?? "";
        } else await res.body?.cancel();
      }
    }
    assert.equal(statuses.filter((s) => s === 200).length, perAddress);
    assert.equal(statuses.filter((s) => s === 429).length, 650 - perAddress);
    assert.match(retryAfter, /^\d+$/);

    // Another address: a real editor still starts, and its request records where it came from.
    const other = await start("[::1]");
    assert.equal(other.status, 200);
    const { userCode } = await other.json();
    const { token } = await app.services.sessions.issueLocal("dev@example.com");
    const page = await app.request(
      "/connect/device",
      formPost(token, { code: userCode, action: "lookup" }),
    );
    const html = await page.text();
    assert.match(html, /<code data-testid="device-address">::1<\/code>/);
    assert.match(html, /It says it is “Visual Studio Code”/);
    assert.match(html, /data-testid="device-requested">\d+ seconds? ago/);
  } finally {
    await server.shutdown();
    await app.close();
  }
});
