/**
 * Operator events (CONTRACT §7 Events): signed deliveries to a receiver on loopback that verifies
 * them with svix, retries, exactly-once lifecycle events under races, hourly alert de-duplication
 * and budget thresholds across processes.
 */
import assert from "node:assert/strict";
import { Events } from "../../lib/alerts/deliver.ts";
import { ConfigError, loadConfig } from "../../lib/core/config.ts";
import { createServices, type Services } from "../../lib/core/services.ts";
import { checkBudget } from "../../lib/reports/budget_alerts.ts";
import { costSummaryJob } from "../../lib/reports/summary.ts";
import { recordUsage } from "../../lib/usage/usage.ts";
import {
  bearer,
  captureLogger,
  clerkEnv,
  ClerkIssuer,
  eventually,
  interceptCommits,
  json,
  MASTER_KEY,
  PUBLIC_URL,
  type TestApp,
  testApp,
} from "../support/helpers.ts";
import { signedDelivery, userCreated, WEBHOOK_SECRET } from "../../testing/fakes/svix.ts";
import { type RunningMain, startMain } from "../support/subprocess.ts";
import { FakeGlm } from "../../testing/fakes/glm.ts";
import { EVENTS_SECRET, Receiver } from "../../testing/fakes/events_receiver.ts";

const issuer = await ClerkIssuer.create();
/** Test-speed timings: the production back-off starts at 1 s and polls every second. */
function quick(events: Events) {
  events.outbox.pollMs = 20;
  events.retryBaseMs = 20;
  events.profileWaitMs = 100;
}

function eventsEnv(receiver: Receiver, extra: Record<string, string> = {}) {
  return clerkEnv(issuer, {
    EVENTS_WEBHOOK_URL: receiver.url,
    EVENTS_WEBHOOK_SECRET: EVENTS_SECRET,
    CLERK_WEBHOOK_SECRET: WEBHOOK_SECRET,
    ADMIN_USER_IDS: "user_operator",
    ...extra,
  });
}

async function outboxSize(kv: Deno.Kv): Promise<number> {
  let n = 0;
  for await (const _ of kv.list({ prefix: ["event_outbox"] })) n++;
  return n;
}

/** Waits until every stored event has been delivered (the outbox is empty). */
async function drained(app: { kv: Deno.Kv }, timeoutMs = 5000) {
  await eventually(async () => (await outboxSize(app.kv)) === 0, timeoutMs, async () => {
    const left = [];
    for await (const e of app.kv.list({ prefix: ["event_outbox"] })) left.push(e.key, e.value);
    return left;
  });
}

async function withApp(
  receiver: Receiver,
  run: (app: TestApp) => Promise<void>,
  extra: Record<string, string> = {},
) {
  const app = await testApp(eventsEnv(receiver, extra));
  quick(app.services.events);
  try {
    await run(app);
  } finally {
    await app.close();
  }
}

Deno.test("events: alerts are signed, delivered after failures with one id, once per hour", async () => {
  const receiver = new Receiver();
  receiver.failFirst = 2;
  try {
    await withApp(receiver, async (app) => {
      const { events } = app.services;
      const balance = {
        model: "glm-4.6",
        status: 429,
        upstreamCode: "1113",
        upstreamMessage: "余额不足或无可用资源包,请充值。",
      };
      // GLM echoing the master key must not put it in the operator's inbox.
      const rejected = {
        model: "glm-4.6",
        status: 401,
        upstreamCode: null,
        upstreamMessage: `Authorization failed for key ${MASTER_KEY}`,
      };
      assert.equal(await events.alert("upstream.balance_exhausted", balance, "glm"), true);
      assert.equal(await events.alert("upstream.key_rejected", rejected, "glm"), true);
      // The same alerts again within the hour, from any number of callers: nothing more.
      const again = await Promise.all([
        events.alert("upstream.balance_exhausted", balance, "glm"),
        events.alert("upstream.balance_exhausted", balance, "glm"),
        events.alert("upstream.key_rejected", rejected, "glm"),
      ]);
      assert.deepEqual(again, [false, false, false]);

      await eventually(() => receiver.deliveries.length === 2, 5000, () => receiver.attempts);
      await drained(app);
      assert.equal(receiver.rejected, 0, "every delivery verifies with the svix verifier");
      assert.equal(receiver.deliveries.length, 2);
      for (const d of receiver.deliveries) {
        assert.match(d.id, /^evt_[0-9a-f]{32}$/);
        assert.equal(d.signed, true);
        // Two refusals and the third attempt, all under the same webhook-id.
        assert.equal(receiver.attempts.get(d.id), 3);
        assert.equal(typeof d.body.message, "string");
        assert.ok(!Number.isNaN(Date.parse(String(d.body.at))));
      }
      const [exhausted] = receiver.ofType("upstream.balance_exhausted");
      assert.equal(exhausted.body.upstreamCode, "1113");
      assert.equal(exhausted.body.model, "glm-4.6");
      assert.equal(exhausted.body.status, 429);
      const [refused] = receiver.ofType("upstream.key_rejected");
      assert.equal(refused.body.status, 401);
      assert.ok(!refused.raw.includes(MASTER_KEY), "the master key is never sent");
      assert.match(String(refused.body.upstreamMessage), /\[redacted\]/);
      assert.ok(
        app.logs.some((l) => l.includes("event delivery failed, will retry")),
        "failed attempts are logged",
      );
      assert.ok(!app.logs.some((l) => l.includes(MASTER_KEY)));

      // /admin's list: the last 24 h, newest first.
      const recent = await events.recentAlerts();
      assert.deepEqual(recent.map((a) => a.type), [
        "upstream.key_rejected",
        "upstream.balance_exhausted",
      ]);
      assert.deepEqual(recent.map((a) => a.id), [refused.id, exhausted.id]);
      // Another subject is another alert.
      assert.equal(
        await events.alert("upstream.throttled", { ...balance, upstreamCode: "1302" }, "glm-4.6"),
        true,
      );
      assert.equal(
        await events.alert("upstream.throttled", { ...balance, upstreamCode: "1302" }, "glm-4.5"),
        true,
      );
      await eventually(() => receiver.ofType("upstream.throttled").length === 2);
    });
  } finally {
    await receiver.close();
  }
});

Deno.test("events: API and Clerk webhook racing for a user send one user.provisioned, never the key", async () => {
  const receiver = new Receiver();
  try {
    await withApp(receiver, async (app) => {
      const ids = ["user_race_a", "user_race_b", "user_race_c"];
      const calls: Array<Promise<Response>> = [];
      for (const id of ids) {
        const token = await issuer.token(id);
        for (let i = 0; i < 6; i++) {
          calls.push(app.request("/api/key", { method: "POST", headers: bearer(token) }));
        }
        for (let i = 0; i < 3; i++) {
          calls.push(app.request("/api/webhooks/clerk", signedDelivery(userCreated(id))));
        }
      }
      const responses = await Promise.all(calls);
      const apiKeys = new Map<string, string>();
      for (const res of responses) {
        assert.ok(res.status === 200 || res.status === 201, `status ${res.status}`);
        const body = await json(res);
        if (typeof body.apiKey === "string") apiKeys.set(String(body.userId), body.apiKey);
      }
      assert.equal(apiKeys.size, 3);

      await drained(app);
      const provisioned = receiver.ofType("user.provisioned");
      assert.equal(provisioned.length, 3, "one user.provisioned per user");
      assert.deepEqual(provisioned.map((d) => d.body.userId).sort(), ids);
      for (const d of provisioned) {
        const apiKey = apiKeys.get(String(d.body.userId))!;
        assert.equal(d.body.keyPrefix, apiKey.slice(0, 7));
        assert.equal(d.body.mode, "proxy");
        // Whichever came first, the session (no e-mail) or the webhook: the e-mail is there.
        assert.equal(d.body.email, `${d.body.userId}@example.com`);
        assert.match(String(d.body.message), /@example\.com signed up/);
        assert.ok("firstName" in d.body && "lastName" in d.body);
        assert.ok(!d.raw.includes(apiKey), "the key is never in an event");
        assert.ok(!d.raw.includes(apiKey.slice(3)), "not even without its prefix");
      }
      assert.equal(new Set(receiver.deliveries.map((d) => d.id)).size, receiver.deliveries.length);

      // Provisioning again (cached or not) is no news.
      const again = await app.request("/api/key", {
        method: "POST",
        headers: bearer(await issuer.token(ids[0])),
      });
      assert.equal(again.status, 200);
      await app.request("/api/webhooks/clerk", signedDelivery(userCreated(ids[1])));
      await drained(app);
      assert.equal(receiver.ofType("user.provisioned").length, 3);
    });
  } finally {
    await receiver.close();
  }
});

Deno.test("events: rotation, disable/enable and deletion", async (t) => {
  const receiver = new Receiver();
  try {
    await withApp(receiver, async (app) => {
      const alice = bearer(await issuer.token("user_alice"));
      const operator = bearer(await issuer.token("user_operator"));
      const first = await json<{ apiKey: string }>(
        await app.request("/api/key", { method: "POST", headers: alice }),
      );

      await t.step("rotation → key.rotated with the new prefix, no key", async () => {
        const res = await app.request("/api/key/rotate", { method: "POST", headers: alice });
        assert.equal(res.status, 200);
        const rotated = await json<{ apiKey: string; keyPrefix: string }>(res);
        await eventually(() => receiver.ofType("key.rotated").length === 1);
        const [event] = receiver.ofType("key.rotated");
        assert.equal(event.body.userId, "user_alice");
        assert.equal(event.body.keyPrefix, rotated.apiKey.slice(0, 7));
        assert.ok(!event.raw.includes(rotated.apiKey) && !event.raw.includes(first.apiKey));
        assert.match(String(event.body.message), /rotated/);
      });

      await t.step(
        "admin disable/enable → user.disabled/user.enabled with the operator",
        async () => {
          const disable = () =>
            app.request("/api/admin/users/user_alice/disable", {
              method: "POST",
              headers: operator,
            });
          assert.equal((await disable()).status, 200);
          // Disabling a disabled user changes nothing and reports nothing.
          assert.equal((await disable()).status, 200);
          const enable = await app.request("/api/admin/users/user_alice/enable", {
            method: "POST",
            headers: operator,
          });
          assert.equal(enable.status, 200);
          await drained(app);
          const disabled = receiver.ofType("user.disabled");
          const enabled = receiver.ofType("user.enabled");
          assert.equal(disabled.length, 1);
          assert.equal(enabled.length, 1);
          assert.deepEqual(
            [disabled[0].body.userId, disabled[0].body.by],
            ["user_alice", "user_operator"],
          );
          assert.deepEqual([enabled[0].body.userId, enabled[0].body.by], [
            "user_alice",
            "user_operator",
          ]);
        },
      );

      await t.step("Clerk user.deleted → user.deleted, once", async () => {
        const deleted = {
          type: "user.deleted",
          object: "event",
          data: { id: "user_alice", object: "user", deleted: true },
        };
        for (const _ of [1, 2]) {
          const res = await app.request("/api/webhooks/clerk", signedDelivery(deleted));
          assert.equal(res.status, 200);
        }
        // An id Keyway never provisioned gets a tombstone but is no news to the backend.
        const stranger = { ...deleted, data: { ...deleted.data, id: "user_stranger" } };
        assert.equal(
          (await app.request("/api/webhooks/clerk", signedDelivery(stranger))).status,
          200,
        );
        await drained(app);
        const events = receiver.ofType("user.deleted");
        assert.equal(events.length, 1);
        assert.equal(events[0].body.userId, "user_alice");
        assert.ok(!events[0].raw.includes("@"), "no personal data in the deletion event");
      });
      assert.equal(receiver.rejected, 0);
    });
  } finally {
    await receiver.close();
  }
});

Deno.test("events: a receiver that hangs never slows or fails a request", async () => {
  // Accepts connections and never answers.
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const conns: Deno.Conn[] = [];
  const accepting = (async () => {
    for await (const conn of listener) conns.push(conn);
  })();
  const app = await testApp(clerkEnv(issuer, {
    EVENTS_WEBHOOK_URL: `http://127.0.0.1:${listener.addr.port}/`,
    EVENTS_WEBHOOK_SECRET: EVENTS_SECRET,
  }));
  quick(app.services.events);
  app.services.events.timeoutMs = 2_000;
  try {
    const token = bearer(await issuer.token("user_patient"));
    const created = await app.request("/api/key", { method: "POST", headers: token });
    assert.equal(created.status, 201);
    // Its user.provisioned is now stuck on the receiver…
    await eventually(() => conns.length > 0);
    // …and the next request does not wait for it.
    const started = performance.now();
    const rotated = await app.request("/api/key/rotate", { method: "POST", headers: token });
    assert.equal(rotated.status, 200);
    const ms = performance.now() - started;
    assert.ok(ms < 1_500, `rotation took ${ms.toFixed(0)} ms with the receiver hanging`);
    assert.ok(!app.logs.some((l) => l.includes("no answer within")), "still hanging meanwhile");
    await eventually(() =>
      app.logs.find((l) => l.includes("event delivery failed") && l.includes("no answer within"))
    );
    // Both events are still waiting for the receiver.
    assert.equal(await outboxSize(app.kv), 2);
  } finally {
    await app.close();
    listener.close();
    await accepting.catch(() => {});
    for (const conn of conns) conn.close();
  }
});

Deno.test("events: an event undelivered past giveUpAfterMs is dropped with an error line", async () => {
  const receiver = new Receiver();
  receiver.failFirst = 1_000;
  try {
    await withApp(receiver, async (app) => {
      app.services.events.giveUpAfterMs = 150;
      await app.request("/api/key", {
        method: "POST",
        headers: bearer(await issuer.token("user_unlucky")),
      });
      const line = await eventually(() =>
        app.logs.find((l) => l.includes("event delivery gave up"))
      );
      assert.match(line, /"type":"user.provisioned"/);
      assert.ok((receiver.attempts.values().next().value ?? 0) >= 2, "retried before giving up");
      await drained(app);
    });
  } finally {
    await receiver.close();
  }
});

Deno.test("events: without EVENTS_WEBHOOK_URL nothing is stored, alerts are still kept", async () => {
  const app = await testApp(clerkEnv(issuer));
  try {
    assert.equal(app.services.events.enabled, false);
    const token = bearer(await issuer.token("user_quiet"));
    assert.equal((await app.request("/api/key", { method: "POST", headers: token })).status, 201);
    assert.equal(
      (await app.request("/api/key/rotate", { method: "POST", headers: token })).status,
      200,
    );
    assert.equal(await outboxSize(app.kv), 0);
    const fields = { model: "glm-4.6", status: 401, upstreamCode: null, upstreamMessage: "no" };
    assert.equal(await app.services.events.alert("upstream.key_rejected", fields), true);
    assert.equal(await app.services.events.alert("upstream.key_rejected", fields), false);
    assert.equal(await outboxSize(app.kv), 0);
    assert.deepEqual((await app.services.events.recentAlerts()).map((a) => a.type), [
      "upstream.key_rejected",
    ]);
    assert.ok(app.logs.some((l) => l.includes('"msg":"alert upstream.key_rejected"')));
  } finally {
    await app.close();
  }
});

Deno.test("events: configuration", async (t) => {
  await t.step("a bad URL or secret stops start-up naming the variable", () => {
    for (
      const [env, name] of [
        [{ EVENTS_WEBHOOK_URL: "ftp://backend.example/hook" }, "EVENTS_WEBHOOK_URL"],
        [{ EVENTS_WEBHOOK_URL: "not a url" }, "EVENTS_WEBHOOK_URL"],
        [{ EVENTS_WEBHOOK_SECRET: "hunter2-not-a-whsec" }, "EVENTS_WEBHOOK_SECRET"],
      ] as const
    ) {
      assert.throws(() => loadConfig({ DENO_KV_PATH: ":memory:", ...env }), (err) => {
        assert.ok(err instanceof ConfigError);
        assert.match(err.problems.join("\n"), new RegExp(name));
        assert.ok(!err.message.includes("hunter2"), "the value is not echoed");
        return true;
      });
    }
    const config = loadConfig({
      EVENTS_WEBHOOK_URL: "https://backend.example/hooks/keyway?source=kw",
      EVENTS_WEBHOOK_SECRET: EVENTS_SECRET,
    });
    assert.equal(config.events.webhookUrl, "https://backend.example/hooks/keyway?source=kw");
    assert.equal(config.events.webhookSecret, EVENTS_SECRET);
  });

  await t.step("a URL without a secret: unsigned deliveries and a start-up warning", async () => {
    const receiver = new Receiver(null);
    try {
      const app = await testApp(clerkEnv(issuer, { EVENTS_WEBHOOK_URL: receiver.url }));
      quick(app.services.events);
      try {
        assert.ok(app.logs.some((l) => l.includes("without EVENTS_WEBHOOK_SECRET")));
        await app.request("/api/key", {
          method: "POST",
          headers: bearer(await issuer.token("user_unsigned")),
        });
        await eventually(() => receiver.deliveries.length === 1);
        assert.equal(receiver.deliveries[0].signed, false);
        assert.match(receiver.deliveries[0].id, /^evt_/);
      } finally {
        await app.close();
      }
    } finally {
      await receiver.close();
    }
  });
});

Deno.test("events: budget thresholds at 80% and 100%, once each, across two processes", async () => {
  const receiver = new Receiver();
  const dir = await Deno.makeTempDir({ prefix: "keyway_events_" });
  const path = `${dir}/kv.sqlite3`;
  const config = loadConfig({
    DENO_KV_PATH: path,
    PUBLIC_URL,
    GLM_API_KEY: MASTER_KEY,
    EVENTS_WEBHOOK_URL: receiver.url,
    EVENTS_WEBHOOK_SECRET: EVENTS_SECRET,
  });
  // Two processes' worth of services: each its own KV handle, logger and delivery loop.
  const processes: Array<{ kv: Deno.Kv; services: Services }> = [];
  for (const _ of [1, 2]) {
    const kv = await Deno.openKv(path);
    const { log } = captureLogger([MASTER_KEY]);
    const services = await createServices(config, kv, { log });
    quick(services.events);
    processes.push({ kv, services });
  }
  const user = { id: "user_spender" };
  const month = "2026-11";
  // Every settlement of both processes checks; many land past a threshold at once.
  const burst = (spentUsd: number, m = month) =>
    Promise.all(
      processes.flatMap(({ services }) =>
        Array.from({ length: 8 }, () => checkBudget(services.events, user, spentUsd, 10, m))
      ),
    );
  try {
    assert.deepEqual((await burst(7.99)).flat(), [], "79.9% is below every threshold");
    assert.deepEqual((await burst(8)).flat(), [80], "80% exactly: one alert from all 16 checks");
    assert.deepEqual((await burst(9.5)).flat(), []);
    assert.deepEqual((await burst(12)).flat(), [100]);
    assert.deepEqual((await burst(15)).flat(), []);
    // A new month starts over; a jump past both thresholds sends both.
    assert.deepEqual((await burst(11, "2026-12")).flat().sort(), [100, 80]);
    // Unlimited budget: nothing.
    assert.deepEqual(await checkBudget(processes[0].services.events, user, 1e6, 0, month), []);

    await eventually(() => receiver.deliveries.length === 4, 5000, () => receiver.deliveries);
    await drained(processes[0]);
    assert.equal(receiver.deliveries.length, 4, "each alert delivered once by one process");
    assert.equal(receiver.rejected, 0);
    const seen = receiver.ofType("budget.threshold").map((d) =>
      `${d.body.month} ${d.body.percent}% ${d.body.spentUsd}/${d.body.budgetUsd} ${d.body.userId}`
    ).sort();
    assert.deepEqual(seen, [
      "2026-11 100% 12/10 user_spender",
      "2026-11 80% 8/10 user_spender",
      "2026-12 100% 11/10 user_spender",
      "2026-12 80% 11/10 user_spender",
    ]);
  } finally {
    for (const { kv, services } of processes) {
      await services.close();
      kv.close();
    }
    await receiver.close();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("events: the cost-summary job sends budget.threshold through the same once-only claim", async () => {
  const receiver = new Receiver();
  try {
    await withApp(receiver, async (app) => {
      const { services } = app;
      await recordUsage(app.kv, services.config.pricing, {
        userId: "user_big_spender",
        model: "glm-4.6",
        promptTokens: 1_000_000,
        completionTokens: 1_000_000,
      });
      await costSummaryJob(services)();
      await eventually(() => receiver.ofType("budget.threshold").length === 2);
      const percents = receiver.ofType("budget.threshold").map((d) => d.body.percent).sort();
      assert.deepEqual(percents, [100, 80]);
      const [event] = receiver.ofType("budget.threshold");
      assert.equal(event.body.userId, "user_big_spender");
      assert.equal(event.body.budgetUsd, 1);
      assert.ok(Number(event.body.spentUsd) > 1);
      // A settlement seeing the same spend afterwards sends nothing more.
      assert.deepEqual(
        await checkBudget(services.events, { id: "user_big_spender" }, 5, 1),
        [],
      );
      await drained(app);
      assert.equal(receiver.ofType("budget.threshold").length, 2);
    }, { BUDGET_USD_MONTHLY: "1" });
  } finally {
    await receiver.close();
  }
});

Deno.test("events: an Events that was not started only stores; flush() sends what is due", async () => {
  const receiver = new Receiver();
  const kv = await Deno.openKv(":memory:");
  try {
    const config = loadConfig({
      DENO_KV_PATH: ":memory:",
      EVENTS_WEBHOOK_URL: receiver.url,
      EVENTS_WEBHOOK_SECRET: EVENTS_SECRET,
    });
    // As `deno task summarize` builds it: its events wait in KV for a running server.
    const { log } = captureLogger([]);
    const events = new Events(config, kv, log);
    const fields = { model: "glm-4.6", status: 429, upstreamCode: "1305", upstreamMessage: "busy" };
    assert.equal(await events.alert("upstream.throttled", fields), true);
    assert.equal(await outboxSize(kv), 1);
    assert.equal(receiver.deliveries.length, 0);
    // The minute cron's nudge (main.ts) delivers it; no timer is left behind.
    await events.flush();
    assert.equal(receiver.deliveries.length, 1);
    assert.equal(receiver.deliveries[0].body.upstreamCode, "1305");
    assert.equal(await outboxSize(kv), 0);
    await events.close();
  } finally {
    kv.close();
    await receiver.close();
  }
});

Deno.test("events: a delivery that outlives its lease is taken over by another process, once", async () => {
  const receiver = new Receiver();
  receiver.stallFirst = 1;
  const dir = await Deno.makeTempDir({ prefix: "keyway_events_" });
  const path = `${dir}/kv.sqlite3`;
  const config = loadConfig({
    DENO_KV_PATH: path,
    PUBLIC_URL,
    GLM_API_KEY: MASTER_KEY,
    EVENTS_WEBHOOK_URL: receiver.url,
    EVENTS_WEBHOOK_SECRET: EVENTS_SECRET,
  });
  const open = async () => {
    const kv = await Deno.openKv(path);
    const { log, lines } = captureLogger([MASTER_KEY]);
    const services = await createServices(config, kv, { log });
    quick(services.events);
    return { kv, services, lines };
  };
  // Process A claims the event and stalls on the receiver past its lease (as if it froze or died).
  const a = await open();
  a.services.events.outbox.leaseMs = 300;
  let b: Awaited<ReturnType<typeof open>> | undefined;
  try {
    const fields = { model: "glm-4.6", status: 401, upstreamCode: null, upstreamMessage: "no" };
    assert.equal(await a.services.events.alert("upstream.key_rejected", fields), true);
    await eventually(() => receiver.stalls === 1);
    // Process B starts later and finds the expired lease.
    b = await open();
    await eventually(() => receiver.deliveries.length === 1, 5000);
    await drained(b);
    // A's late failure finds its lease gone: it neither retries nor sends the event again.
    await a.services.events.close();
    assert.ok(
      a.lines.some((l) => l.includes("another process has taken it over")),
      JSON.stringify(a.lines),
    );
    assert.equal(await outboxSize(b.kv), 0);
    assert.equal(receiver.deliveries.length, 1);
    assert.equal(receiver.attempts.size, 1, "one webhook-id for the event");
  } finally {
    for (const p of [a, b]) {
      if (!p) continue;
      await p.services.close();
      p.kv.close();
    }
    await receiver.close();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("events: an alert KV refuses is logged, never thrown, and tried again next time", async () => {
  const kv = await Deno.openKv(":memory:");
  try {
    const config = loadConfig({ DENO_KV_PATH: ":memory:", GLM_API_KEY: MASTER_KEY });
    let broken = true;
    const flaky = interceptCommits(kv, (commit) => {
      if (broken) return Promise.reject(new Error("KV is unreachable"));
      return commit();
    });
    const { log, lines } = captureLogger([MASTER_KEY]);
    const events = new Events(config, flaky, log);
    const fields = { model: "glm-4.6", status: 403, upstreamCode: null, upstreamMessage: "no" };
    assert.equal(await events.alert("upstream.key_rejected", fields), false);
    assert.deepEqual(await checkBudget(events, { id: "user_x" }, 9, 10, "2026-11"), []);
    assert.equal(lines.filter((l) => l.includes("alert could not be stored")).length, 2);
    broken = false;
    // Not remembered as sent: both go out once KV answers again.
    assert.equal(await events.alert("upstream.key_rejected", fields), true);
    assert.deepEqual(await checkBudget(events, { id: "user_x" }, 9, 10, "2026-11"), [80]);
    assert.deepEqual(await checkBudget(events, { id: "user_x" }, 9, 10, "2026-11"), []);
    await events.close();
  } finally {
    kv.close();
  }
});

Deno.test("events: two app processes racing to provision send one user.provisioned per user", async () => {
  const receiver = new Receiver();
  const dir = await Deno.makeTempDir({ prefix: "keyway_events_proc_" });
  const env = {
    DENO_KV_PATH: `${dir}/kv.sqlite3`,
    PUBLIC_URL,
    PORT: "0",
    GLM_API_KEY: MASTER_KEY,
    ...eventsEnv(receiver),
  };
  const processes: RunningMain[] = [];
  try {
    processes.push(await startMain(env, dir), await startMain(env, dir));
    const ids = ["user_proc_a", "user_proc_b", "user_proc_c"];
    const calls: Array<Promise<Response>> = [];
    for (const id of ids) {
      const token = await issuer.token(id);
      for (const { url } of processes) {
        for (let i = 0; i < 3; i++) {
          calls.push(fetch(`${url}/api/key`, { method: "POST", headers: bearer(token) }));
        }
        calls.push(fetch(`${url}/api/webhooks/clerk`, signedDelivery(userCreated(id))));
      }
    }
    for (const res of await Promise.all(calls)) {
      assert.ok(res.status === 200 || res.status === 201, `status ${res.status}`);
      await res.body?.cancel();
    }
    await eventually(() => receiver.ofType("user.provisioned").length >= 3 || undefined, 15_000);
    // Both processes poll the outbox (every second, retrying at 1 s, 2 s, 4 s…): wait until it
    // is empty, then count. A loaded machine (the whole suite in parallel) needs the margin.
    const kv = await Deno.openKv(env.DENO_KV_PATH);
    try {
      await drained({ kv }, 20_000);
    } finally {
      kv.close();
    }
    const provisioned = receiver.ofType("user.provisioned");
    assert.deepEqual(provisioned.map((d) => d.body.userId).sort(), ids);
    // Whichever came first, the session or the webhook, the event carries the e-mail.
    for (const d of provisioned) assert.equal(d.body.email, `${d.body.userId}@example.com`);
    assert.equal(receiver.rejected, 0);
    for (const p of processes) {
      await p.stop();
      const { stdout, stderr } = p.output();
      assert.ok(!`${stdout}${stderr}`.includes('"level":"error"'), stderr);
    }
  } finally {
    for (const p of processes) await p.stop();
    await receiver.close();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("events: the gateway's refusals and settlements reach the operator — GLM account alerts and budget thresholds, end to end", async (t) => {
  const receiver = new Receiver();
  receiver.failFirst = 2; // the receiver fails twice: the alert still arrives, once
  const glm = new FakeGlm();
  try {
    await withApp(receiver, async (app) => {
      const { apiKey } = await app.services.users.provision("user_alerts");
      // $10,000 per million tokens: an 18-token answer costs $0.18, a 13-token reservation $0.13.
      const chat = () =>
        app.request("/v1/chat/completions", {
          method: "POST",
          headers: { ...bearer(apiKey), "content-type": "application/json" },
          body: JSON.stringify({
            model: "glm-4.6",
            max_tokens: 7,
            messages: [{ role: "user", content: "hi" }],
          }),
        });
      // The one pool key is left out after a refusal (UPSTREAM_KEY_COOLDOWN_MS, here 1 s): the
      // requests after it are refused without reaching GLM, and it is back after the cool-down.
      const cooledDown = () => new Promise((r) => setTimeout(r, 1_100));
      await t.step("GLM 1113 → one upstream.balance_exhausted, however many refusals", async () => {
        glm.refusal = "balance";
        for (let i = 0; i < 3; i++) assert.equal((await chat()).status, 503);
        assert.equal(glm.count, 1, "the key is left out after the first refusal");
        await eventually(() => receiver.ofType("upstream.balance_exhausted").length === 1, 5000);
        const [d] = receiver.ofType("upstream.balance_exhausted");
        assert.equal(receiver.attempts.get(d.id), 3);
        assert.equal(d.body.upstreamCode, "1113");
        assert.equal(d.body.model, "glm-4.6");
      });
      await t.step("a refused master key → one upstream.key_rejected", async () => {
        await cooledDown();
        glm.refusal = "key_rejected";
        for (let i = 0; i < 2; i++) assert.equal((await chat()).status, 503);
        await eventually(() => receiver.ofType("upstream.key_rejected").length === 1, 5000);
        assert.equal(receiver.ofType("upstream.key_rejected")[0].body.status, 401);
      });
      await t.step("throttling is alerted once it is sustained (5 within a minute)", async () => {
        await cooledDown();
        glm.refusal = "concurrency";
        for (let i = 0; i < 4; i++) assert.equal((await chat()).status, 503);
        await new Promise((r) => setTimeout(r, 200));
        assert.equal(receiver.ofType("upstream.throttled").length, 0);
        assert.equal((await chat()).status, 503);
        await eventually(() => receiver.ofType("upstream.throttled").length === 1, 5000);
      });
      await t.step(
        "budget.threshold at 80 % and 100 %, once each, from real requests",
        async () => {
          glm.refusal = null;
          const statuses = [];
          for (let i = 0; i < 6; i++) {
            const res = await chat();
            await res.body?.cancel();
            statuses.push(res.status);
          }
          // $0.18 each against $0.85: the 4th passes 80 %, the 5th 100 %, the 6th is refused.
          assert.deepEqual(statuses, [200, 200, 200, 200, 200, 403]);
          await eventually(() => receiver.ofType("budget.threshold").length === 2, 5000);
          await drained(app);
          const sent = receiver.ofType("budget.threshold").map((d) => d.body);
          assert.deepEqual(sent.map((b) => b.percent).sort(), [100, 80]);
          const eighty = sent.find((b) => b.percent === 80)!;
          assert.equal(eighty.userId, "user_alerts");
          assert.equal(eighty.budgetUsd, 0.85);
          assert.equal(eighty.spentUsd, 0.72);
          assert.equal(sent.find((b) => b.percent === 100)!.spentUsd, 0.9);
          assert.equal(receiver.rejected, 0);
          assert.ok(!receiver.deliveries.some((d) => d.raw.includes(apiKey)));
        },
      );
    }, {
      GLM_BASE_URL: glm.baseUrl,
      UPSTREAM_KEY_COOLDOWN_MS: "1000",
      RATE_LIMIT_RPM: "1000",
      BUDGET_USD_MONTHLY: "0.85",
      PRICING: JSON.stringify({ "glm-4.6": { input: 10_000, output: 10_000 } }),
    });
  } finally {
    await receiver.close();
    await glm.close();
  }
});
