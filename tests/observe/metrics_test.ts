/**
 * GET /metrics (CONTRACT §10): a 404 without METRICS_TOKEN or with a wrong one; Prometheus' text
 * format with the contract's metric names, parsed here and checked by `promtool check metrics`
 * (Debian's `prometheus` package); counters that move with traffic; upstream slots and waiting
 * requests read across processes from KV; no user id, e-mail or key in any label.
 */
import assert from "node:assert/strict";
import { bearer, eventually, MASTER_KEY, serveGateway, testApp } from "../support/helpers.ts";
import { CHAT, post } from "../support/gateway_setup.ts";
import { FakeGlm } from "../../testing/fakes/glm.ts";
import { createApp } from "../../routes/mod.ts";

const TOKEN = "scrape-token-0123456789abcdef";
const CI = /^(1|true)$/i.test(Deno.env.get("CI") ?? "");

const CONTRACT_METRICS: Record<string, string> = {
  keyway_requests_total: "counter",
  keyway_request_duration_seconds: "histogram",
  keyway_upstream_ttfb_seconds: "histogram",
  keyway_tokens_total: "counter",
  keyway_cost_usd_total: "counter",
  keyway_refusals_total: "counter",
  keyway_upstream_inflight: "gauge",
  keyway_upstream_waiting: "gauge",
  keyway_upstream_wait_seconds: "histogram",
  keyway_kv_commit_seconds: "histogram",
  keyway_leases_active: "gauge",
};

interface Sample {
  name: string;
  labels: Record<string, string>;
  value: number;
}

/** Prometheus' text format (0.0.4): the TYPE of each metric and every sample. */
function parse(text: string): { types: Map<string, string>; samples: Sample[] } {
  const types = new Map<string, string>();
  const samples: Sample[] = [];
  for (const line of text.split("\n")) {
    if (line === "" || line.startsWith("# HELP ")) continue;
    const type = line.match(/^# TYPE ([a-zA-Z_:][a-zA-Z0-9_:]*) (counter|gauge|histogram)$/);
    if (type) {
      types.set(type[1], type[2]);
      continue;
    }
    const m = line.match(/^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$/);
    assert.ok(m, `not a sample line: ${line}`);
    const labels: Record<string, string> = {};
    for (const l of (m[2] ?? "").matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)",?/g)) {
      labels[l[1]] = l[2];
    }
    const value = m[3] === "+Inf" ? Infinity : Number(m[3]);
    assert.ok(!Number.isNaN(value), `not a number: ${line}`);
    samples.push({ name: m[1], labels, value });
  }
  return { types, samples };
}

/** The value of one sample (0 when absent: a counter not yet moved). */
function value(samples: Sample[], name: string, labels: Record<string, string> = {}): number {
  return samples.filter((s) =>
    s.name === name && Object.entries(labels).every(([k, v]) => s.labels[k] === v)
  ).reduce((n, s) => n + s.value, 0);
}

async function scrape(url: string, token = TOKEN) {
  const res = await fetch(`${url}/metrics`, { headers: bearer(token) });
  assert.equal(res.status, 200);
  assert.equal(res.headers.get("content-type"), "text/plain; version=0.0.4; charset=utf-8");
  const text = await res.text();
  return { text, ...parse(text) };
}

Deno.test("/metrics is a 404 without METRICS_TOKEN, and with a missing or wrong token", async () => {
  const off = await serveGateway({}, "user_nometrics");
  try {
    const res = await fetch(`${off.url}/metrics`, { headers: bearer(TOKEN) });
    assert.equal(res.status, 404);
    assert.match(res.headers.get("content-type") ?? "", /text\/html/, "the site's 404 page");
    await res.text();
  } finally {
    await off.close();
  }
  const on = await serveGateway({ METRICS_TOKEN: TOKEN }, "user_metrics404");
  try {
    for (
      const headers of [{}, bearer("wrong-token-0123456789"), bearer(TOKEN + "x"), {
        authorization: TOKEN,
      }]
    ) {
      const res = await fetch(`${on.url}/metrics`, { headers });
      assert.equal(res.status, 404);
      assert.doesNotMatch(await res.text(), /keyway_/);
    }
    assert.equal((await fetch(`${on.url}/metrics`, { headers: bearer(TOKEN) })).status, 200);
  } finally {
    await on.close();
  }
});

Deno.test("/metrics: the contract's names, counters that move with traffic, slots and waits across processes, no user id or key in a label", async () => {
  const s = await serveGateway(
    { METRICS_TOKEN: TOKEN, UPSTREAM_CONCURRENCY: "1", UPSTREAM_USER_SHARE: "1" },
    "user_metrics",
  );
  try {
    const before = await scrape(s.url);
    for (const [name, type] of Object.entries(CONTRACT_METRICS)) {
      assert.equal(before.types.get(name), type, `${name} is a ${type}`);
    }
    const ok = { endpoint: "/v1/chat/completions", model: "glm-4.6", status: "200", code: "" };
    assert.equal(value(before.samples, "keyway_requests_total", ok), 0);

    // Traffic: one JSON answer, one refusal, one bad key.
    let res = await post(s.url, s.apiKey);
    assert.equal(res.status, 200);
    await res.text();
    res = await post(s.url, s.apiKey, { ...CHAT, model: "no-such-model" });
    assert.equal(res.status, 400);
    await res.text();
    res = await post(s.url, "kw_" + "B".repeat(43));
    assert.equal(res.status, 401);
    await res.text();

    // One stream holds the only upstream slot; a second request waits for it.
    s.fake.mode = "sse";
    s.fake.holdAfterFirstChunk = true;
    const held = await post(s.url, s.apiKey, { ...CHAT, stream: true });
    const reader = held.body!.getReader();
    await reader.read();
    const waiting = post(s.url, s.apiKey);
    const during = await eventually(async () => {
      const m = await scrape(s.url);
      return value(m.samples, "keyway_upstream_waiting", { model: "glm-4.6" }) === 1
        ? m
        : undefined;
    });
    assert.equal(
      value(during.samples, "keyway_upstream_inflight", {
        model: "glm-4.6",
        key: MASTER_KEY.slice(-4),
      }),
      1,
    );
    assert.equal(value(during.samples, "keyway_leases_active"), 2, "the stream and the waiter");
    s.fake.holdAfterFirstChunk = false;
    s.fake.release();
    while (!(await reader.read()).done) { /* to the end */ }
    s.fake.mode = "json";
    const second = await waiting;
    assert.equal(second.status, 200);
    await second.text();

    const after = await eventually(async () => {
      const m = await scrape(s.url);
      return value(m.samples, "keyway_requests_total", ok) === 3 ? m : undefined;
    });
    const v = (name: string, labels: Record<string, string> = {}) =>
      value(after.samples, name, labels);
    assert.equal(v("keyway_tokens_total", { model: "glm-4.6", kind: "prompt" }), 3 * 11);
    assert.equal(v("keyway_tokens_total", { model: "glm-4.6", kind: "completion" }), 3 * 7);
    assert.ok(v("keyway_cost_usd_total", { model: "glm-4.6" }) > 0);
    assert.equal(v("keyway_refusals_total", { code: "model_not_allowed" }), 1);
    assert.equal(v("keyway_refusals_total", { code: "invalid_api_key" }), 1);
    assert.equal(
      v("keyway_requests_total", {
        endpoint: "/v1/chat/completions",
        model: "",
        status: "400",
        code: "model_not_allowed",
      }),
      1,
    );
    assert.ok(
      after.samples.every((x) => !Object.values(x.labels).includes("no-such-model")),
      "a model nobody configured is not a label value",
    );
    assert.equal(
      v("keyway_request_duration_seconds_count", { endpoint: "/v1/chat/completions" }),
      3,
    );
    assert.equal(v("keyway_upstream_ttfb_seconds_count", { endpoint: "/v1/chat/completions" }), 3);
    assert.equal(v("keyway_upstream_wait_seconds_count"), 3, "each took its slot (capped model)");
    assert.ok(v("keyway_kv_commit_seconds_count") >= 6, "admissions and settlements");
    assert.equal(v("keyway_upstream_inflight"), 0, "every slot given back");
    assert.equal(v("keyway_leases_active"), 0);

    const user = await s.app.services.users.get("user_metrics");
    const secrets = [
      "user_metrics",
      s.apiKey,
      s.apiKey.slice(0, 7),
      MASTER_KEY,
      TOKEN,
      ...(user?.email ? [user.email] : []),
    ];
    for (const sample of [...during.samples, ...after.samples]) {
      for (const label of Object.values(sample.labels)) {
        for (const secret of secrets) {
          assert.ok(!label.includes(secret), `${sample.name} has ${secret} in a label`);
        }
      }
    }
    assert.ok(!after.text.includes(s.apiKey) && !after.text.includes(MASTER_KEY));
  } finally {
    s.fake.release();
    await s.close();
  }
});

/** `promtool check metrics`' exit code and output, or null when promtool is not installed. */
async function promtool(text: string): Promise<{ code: number; output: string } | null> {
  let child: Deno.ChildProcess;
  try {
    child = new Deno.Command("promtool", {
      args: ["check", "metrics"],
      stdin: "piped",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
  } catch (err) {
    if (err instanceof Deno.errors.NotFound) return null;
    throw err;
  }
  const writer = child.stdin.getWriter();
  await writer.write(new TextEncoder().encode(text));
  await writer.close();
  const out = await child.output();
  const dec = new TextDecoder();
  return { code: out.code, output: dec.decode(out.stdout) + dec.decode(out.stderr) };
}

Deno.test("promtool check metrics passes on a scrape after traffic", async (t) => {
  const s = await serveGateway({ METRICS_TOKEN: TOKEN, UPSTREAM_CONCURRENCY: "2" }, "user_prom");
  try {
    for (const body of [CHAT, { ...CHAT, stream: true }, { ...CHAT, model: "nope" }]) {
      const res = await post(s.url, s.apiKey, body);
      await res.text();
    }
    const { text } = await scrape(s.url);
    const checked = await promtool(text);
    if (!checked) {
      if (CI) throw new Error("promtool is not installed, and CI must run this test (.ci/run)");
      console.warn(
        "promtool check skipped: promtool is not installed (apt-get install -y prometheus)",
      );
      await t.step({ name: "promtool", ignore: true, fn: () => {} });
      return;
    }
    assert.equal(checked.code, 0, checked.output);
    assert.equal(checked.output.trim(), "", "no lint problem");
  } finally {
    await s.close();
  }
});

Deno.test("/metrics of one process counts the upstream slots and waiting requests of another sharing its KV", async () => {
  const dir = await Deno.makeTempDir({ prefix: "keyway_metrics_" });
  const fake = new FakeGlm();
  const env = {
    DENO_KV_PATH: `${dir}/kv.sqlite3`,
    GLM_BASE_URL: fake.baseUrl,
    METRICS_TOKEN: TOKEN,
    UPSTREAM_CONCURRENCY: "1",
    UPSTREAM_USER_SHARE: "1",
  };
  const serving = await testApp(env);
  const scraped = await testApp(env);
  const server = Deno.serve(
    { hostname: "127.0.0.1", port: 0, onListen: () => {} },
    createApp(serving.services).fetch,
  );
  const url = `http://127.0.0.1:${server.addr.port}`;
  try {
    const { apiKey } = await serving.services.users.provision("user_elsewhere");
    fake.mode = "sse";
    fake.holdAfterFirstChunk = true;
    const held = await post(url, apiKey, { ...CHAT, stream: true });
    const reader = held.body!.getReader();
    await reader.read();
    const waiting = post(url, apiKey);
    const other = async () => {
      const res = await scraped.request("/metrics", { headers: bearer(TOKEN) });
      assert.equal(res.status, 200);
      return parse(await res.text()).samples;
    };
    const seen = await eventually(async () => {
      const samples = await other();
      return value(samples, "keyway_upstream_waiting", { model: "glm-4.6" }) === 1
        ? samples
        : undefined;
    });
    assert.equal(
      value(seen, "keyway_upstream_inflight", { model: "glm-4.6", key: MASTER_KEY.slice(-4) }),
      1,
    );
    assert.equal(value(seen, "keyway_leases_active"), 0, "this process holds none itself");
    assert.equal(value(seen, "keyway_requests_total"), 0, "its own traffic: none");
    fake.holdAfterFirstChunk = false;
    fake.release();
    while (!(await reader.read()).done) { /* to the end */ }
    fake.mode = "json";
    await (await waiting).text();
    const after = await other();
    assert.equal(value(after, "keyway_upstream_inflight"), 0);
    assert.equal(value(after, "keyway_upstream_waiting"), 0);
  } finally {
    fake.release();
    await server.shutdown();
    await fake.close();
    await serving.close();
    await scraped.close();
    await Deno.remove(dir, { recursive: true });
  }
});
