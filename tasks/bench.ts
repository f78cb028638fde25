/**
 * `deno task bench` (CONTRACT §9): starts on loopback a fake GLM upstream, the app (temp KV,
 * test Clerk issuer), a bare hello server, a bare pass-through proxy and the peers (Portkey's
 * gateway with Node, LiteLLM's proxy with Python) — each in its own process — and, where denokv
 * is installed, the app over KV Connect against a denokv server; drives each with wrk for a
 * fixed time at a fixed concurrency, times one durable KV commit, and prints a table (or, with
 * --json, the contract's JSON).
 */
import { z } from "zod";
import { flagIssue, parseFlags, UsageError, wholeNumber } from "../lib/core/cli.ts";
import { ClerkIssuer } from "../testing/fakes/clerk_issuer.ts";
import { DENOKV_INSTALL, DENOKV_TOKEN, DenoKvServer, findDenokv } from "../testing/denokv.ts";
import { LITELLM_MASTER_KEY, LITELLM_VERSION, startLitellm } from "./bench_litellm.ts";
import { commitLatency, countingKvProxy, type KvCallCounts } from "./bench_kv.ts";

const HELP = `deno task bench [--seconds N] [--connections N] [--json]

  --seconds N       measuring time per scenario (default 10)
  --connections N   concurrent connections for the throughput runs (default 32)
  --json            print the CONTRACT §9 JSON document instead of a table
  --help            this text`;

const flagsSchema = z.object({
  seconds: wholeNumber("--seconds", 1, 600).default(10),
  connections: wholeNumber("--connections", 1, 1000).default(32),
  json: z.boolean().default(false),
});

/** The bench's flags; null for --help. Throws UsageError naming the bad flag. */
export function parseBenchFlags(args: string[]) {
  const raw = parseFlags(args, {
    seconds: "string",
    connections: "string",
    json: "boolean",
    help: "boolean",
  });
  if (raw.help) return null;
  const parsed = flagsSchema.safeParse({ ...raw, json: raw.json === true });
  if (!parsed.success) throw new UsageError(flagIssue(parsed.error.issues[0]));
  return parsed.data;
}

export interface Result {
  rps: number;
  p50Ms: number;
  p99Ms: number;
  errors: number;
  requests: number;
}

export interface Proc {
  child: Deno.ChildProcess;
  port: number;
}

export const CHAT_BODY = JSON.stringify({
  model: "glm-4.6",
  messages: [{ role: "user", content: "Say hello in five words." }],
});
export const MESSAGES_BODY = JSON.stringify({
  model: "glm-4.6",
  max_tokens: 64,
  messages: [{ role: "user", content: "Say hello in five words." }],
});
export const STREAM_BODY = JSON.stringify({
  model: "glm-4.6",
  stream: true,
  messages: [{ role: "user", content: "Say hello in five words." }],
});

export const progress = (msg: string) =>
  Deno.stderr.writeSync(new TextEncoder().encode(msg + "\n"));

/** Starts a process and waits for the first stdout line that tells its port; drains the rest. */
export async function spawn(
  args: string[],
  env: Record<string, string>,
  portOf: (line: string) => number | null,
): Promise<Proc> {
  const child = new Deno.Command(Deno.execPath(), {
    args,
    env,
    stdout: "piped",
    stderr: "inherit",
  }).spawn();
  const lines = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
  let buffered = "";
  const deadline = Date.now() + 30_000;
  while (Date.now() < deadline) {
    const { value, done } = await lines.read();
    if (done) break;
    buffered += value;
    for (const line of buffered.split("\n")) {
      const port = portOf(line);
      if (port) {
        // Keep draining so the child never blocks on a full pipe.
        (async () => {
          try {
            while (!(await lines.read()).done) { /* discard */ }
          } catch { /* closed */ }
        })();
        return { child, port };
      }
    }
  }
  child.kill("SIGKILL");
  throw new Error(`process ${args.join(" ")} did not report a port`);
}

export const helperPort = (line: string) => {
  try {
    const port = JSON.parse(line).port;
    return typeof port === "number" ? port : null;
  } catch {
    return null;
  }
};

/**
 * Starts the app on a free port with its stdout (one JSON log line per request) going to
 * /dev/null: the app still formats and writes every line, but no process of the bench's burns
 * the shared cores reading them. Ready once /health answers.
 */
export async function spawnApp(args: string[], env: Record<string, string>): Promise<Proc> {
  const probe = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = probe.addr.port;
  probe.close();
  const child = new Deno.Command(Deno.execPath(), {
    args,
    env: { ...env, PORT: String(port) },
    stdout: "null",
    stderr: "inherit",
  }).spawn();
  let exited = false;
  child.status.then(() => exited = true);
  const deadline = Date.now() + 30_000;
  while (Date.now() < deadline && !exited) {
    try {
      const res = await fetch(`http://127.0.0.1:${port}/health`);
      await res.body?.cancel();
      if (res.ok) return { child, port };
    } catch { /* not listening yet */ }
    await new Promise((r) => setTimeout(r, 100));
  }
  if (!exited) child.kill("SIGKILL");
  throw new Error(
    `the app did not answer /health on port ${port} (${exited ? "it exited" : "30 s"})`,
  );
}

export function luaScript(
  opts: { method: string; body?: string; auth: string[]; headers?: Record<string, string> },
): string {
  const q = (s: string) => JSON.stringify(s); // JSON strings are valid Lua strings here
  const extra = Object.entries(opts.headers ?? {})
    .map(([name, value]) => `headers[${q(name)}] = ${q(value)}`).join("\n  ");
  return `
local auth = { ${opts.auth.map(q).join(", ")} }
local i = 0
wrk.method = ${q(opts.method)}
${opts.body ? `wrk.body = ${q(opts.body)}` : ""}
request = function()
  i = i + 1
  local headers = { ["Content-Type"] = "application/json" }
  ${extra}
  if #auth > 0 then headers["Authorization"] = "Bearer " .. auth[(i % #auth) + 1] end
  return wrk.format(nil, nil, headers, nil)
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %d %d %d %d %d\\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.status + e.timeout))
end
`;
}

export async function wrk(
  url: string,
  seconds: number,
  connections: number,
  script: string,
): Promise<Result> {
  const file = await Deno.makeTempFile({ suffix: ".lua" });
  await Deno.writeTextFile(file, script);
  try {
    const out = await new Deno.Command("wrk", {
      args: [
        "-t1",
        `-c${connections}`,
        `-d${seconds}s`,
        "--timeout",
        "10s",
        "-s",
        file,
        url,
      ],
      stdout: "piped",
      stderr: "piped",
    }).output();
    const text = new TextDecoder().decode(out.stdout);
    const m = text.match(/RESULT (\d+) (\d+) (\d+) (\d+) (\d+)/);
    if (!out.success || !m) {
      throw new Error(`wrk failed: ${new TextDecoder().decode(out.stderr)}${text}`);
    }
    const [requests, durationUs, p50Us, p99Us, errors] = m.slice(1).map(Number);
    return {
      rps: Math.round(requests / (durationUs / 1e6)),
      p50Ms: p50Us / 1000,
      p99Ms: p99Us / 1000,
      errors,
      requests,
    };
  } finally {
    await Deno.remove(file);
  }
}

export async function ensureWrk() {
  try {
    await new Deno.Command("wrk", { args: ["--version"], stdout: "null", stderr: "null" })
      .output();
    return;
  } catch {
    // fall through
  }
  if (Deno.uid?.() !== 0) {
    throw new Error("wrk is missing: install it with `sudo apt-get install -y wrk`");
  }
  progress("bench: installing wrk (Debian package)…");
  for (const args of [["update"], ["install", "-y", "--no-install-recommends", "wrk"]]) {
    const { success } = await new Deno.Command("apt-get", {
      args,
      stdout: "null",
      stderr: "inherit",
      env: { DEBIAN_FRONTEND: "noninteractive" },
    }).output();
    if (!success) throw new Error(`apt-get ${args.join(" ")} failed: wrk is needed`);
  }
}

const SCENARIO_ORDER = [
  "bare",
  "key",
  "direct",
  "passthrough",
  "floor",
  "peer",
  "litellm",
  "proxy",
  "proxyStream",
  "messages",
  "proxyManyUsers",
  "proxyRemoteKv",
];

/** Users whose keys rotate in the many-users scenario (the key cache and per-user state churn). */
export const MANY_USERS = 5_000;

/** The peer: Portkey's open-source gateway from npm, run with Node (CONTRACT §9). */
const PEER_PACKAGE = "@portkey-ai/gateway@1.15.2";

/**
 * Installs the peer into a temp folder (never into the project) and starts it; null with the
 * reason when Node or npm is missing or the install fails.
 */
async function startPeer(dir: string): Promise<{ proc: Proc } | { missing: string }> {
  for (const tool of ["node", "npm"]) {
    try {
      await new Deno.Command(tool, { args: ["--version"], stdout: "null", stderr: "null" })
        .output();
    } catch {
      return { missing: `${tool} is not installed` };
    }
  }
  progress(`bench: installing the peer (${PEER_PACKAGE}, npm) into a temp folder…`);
  const install = await new Deno.Command("npm", {
    args: ["install", "--prefix", dir, "--no-audit", "--no-fund", "--silent", PEER_PACKAGE],
    stdout: "null",
    stderr: "piped",
  }).output();
  if (!install.success) {
    return {
      missing: `npm install ${PEER_PACKAGE} failed: ${
        new TextDecoder().decode(install.stderr).trim().split("\n").at(-1)
      }`,
    };
  }
  const probe = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = probe.addr.port;
  probe.close();
  const child = new Deno.Command("node", {
    args: [
      `${dir}/node_modules/@portkey-ai/gateway/build/start-server.js`,
      `--port=${port}`,
      "--headless",
    ],
    env: { NODE_ENV: "production" },
    stdout: "null",
    stderr: "null",
  }).spawn();
  const deadline = Date.now() + 30_000;
  while (Date.now() < deadline) {
    try {
      await (await fetch(`http://127.0.0.1:${port}/`)).body?.cancel();
      return { proc: { child, port } };
    } catch {
      await new Promise((r) => setTimeout(r, 100));
    }
  }
  child.kill("SIGKILL");
  return { missing: "the peer did not start within 30 s" };
}

/** The app runs exactly as `deno task start` runs it (same flags), from deno.json. */
export async function startTaskArgs(root: string): Promise<string[]> {
  const config = JSON.parse(await Deno.readTextFile(`${root}deno.json`));
  // A task is a command string or (with a description) an object holding one.
  const start = config.tasks?.start;
  const command = typeof start === "object" && start !== null ? start.command : start;
  const words = String(command ?? "").split(/\s+/).filter(Boolean);
  if (words[0] !== "deno" || words.at(-1) !== "main.ts") {
    throw new Error(`deno.json's start task is not "deno … main.ts": ${words.join(" ")}`);
  }
  return [...words.slice(1, -1), `${root}main.ts`];
}

/** CPU time (user + system, ms) a process has used so far; null where /proc is missing. */
export async function cpuMs(pid: number): Promise<number | null> {
  try {
    // Fields after the command name (which may hold spaces): utime and stime are the 12th and
    // 13th, in clock ticks of 10 ms on Linux.
    const stat = await Deno.readTextFile(`/proc/${pid}/stat`);
    const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    return (Number(fields[11]) + Number(fields[12])) * 10;
  } catch {
    return null;
  }
}

/**
 * CPU time (ms) per thread kind of a process: the JS main thread, KV's SQLite writer, V8's
 * helpers (GC, compiler), the rest (Tokio's workers: fetch, sockets). Empty where /proc is
 * missing.
 */
export async function cpuMsByThread(pid: number): Promise<Record<string, number>> {
  const out: Record<string, number> = {};
  try {
    for await (const t of Deno.readDir(`/proc/${pid}/task`)) {
      try {
        const stat = await Deno.readTextFile(`/proc/${pid}/task/${t.name}/stat`);
        const name = stat.slice(stat.indexOf("(") + 1, stat.lastIndexOf(")"));
        const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
        const kind = Number(t.name) === pid
          ? "main"
          : /^sw-/.test(name)
          ? "kvWriter"
          : /^V8 /.test(name)
          ? "v8Helpers"
          : "other";
        out[kind] = (out[kind] ?? 0) + (Number(fields[11]) + Number(fields[12])) * 10;
      } catch {
        // The thread ended between the listing and the read.
      }
    }
  } catch {
    // No /proc.
  }
  return out;
}

async function peakRssMb(pid: number): Promise<number> {
  try {
    const status = await Deno.readTextFile(`/proc/${pid}/status`);
    const kb = Number(status.match(/VmHWM:\s+(\d+) kB/)?.[1] ?? 0);
    return Math.round(kb / 1024);
  } catch {
    return 0;
  }
}

async function machine(): Promise<string> {
  let cpu = "";
  try {
    cpu = (await Deno.readTextFile("/proc/cpuinfo")).match(/model name\s*:\s*(.+)/)?.[1] ?? "";
  } catch { /* not Linux */ }
  return `${Deno.build.os}/${Deno.build.arch}, ${navigator.hardwareConcurrency} cores${
    cpu ? ` (${cpu.trim()})` : ""
  }, deno ${Deno.version.deno}`;
}

/**
 * Chunk-by-chunk relay: the upstream sends its SSE chunks 15 ms apart, so a relay that streams
 * delivers them in as many reads (7), and one that buffers delivers them in one.
 */
async function sseReads(url: string, key: string): Promise<number> {
  const res = await fetch(url, {
    method: "POST",
    headers: { authorization: `Bearer ${key}`, "content-type": "application/json" },
    body: JSON.stringify({ ...JSON.parse(STREAM_BODY), bench_gaps: true }),
  });
  let reads = 0;
  for await (const _ of res.body!) reads++;
  return reads;
}

/** Provisions one user per connection through `appUrl`; their sessions and keys. */
export async function provisionUsers(issuer: ClerkIssuer, appUrl: string, users: number) {
  const tokens: string[] = new Array(users);
  const keys: string[] = new Array(users);
  let next = 0;
  let done = 0;
  const one = async (i: number) => {
    // As long as Clerk's ids ("user_" and 27 characters): a user id is in most keys a request
    // writes, so its length is part of what a commit weighs.
    const token = await issuer.token(`user_2bench${String(i).padStart(21, "0")}`, {
      ttlSeconds: 3600,
    });
    const res = await fetch(`${appUrl}/api/key`, { headers: { authorization: `Bearer ${token}` } });
    if (!res.ok) throw new Error(`provisioning failed: ${res.status} ${await res.text()}`);
    keys[i] = (await res.json()).apiKey;
    tokens[i] = token;
    if (++done % 1000 === 0 && users > 1000) {
      progress(
        `bench: provisioned ${done.toLocaleString("en-US")} of ${
          users.toLocaleString("en-US")
        } users`,
      );
    }
  };
  // A few at a time: provisioning thousands of users one by one takes long.
  await Promise.all(Array.from({ length: Math.min(8, users) }, async () => {
    while (next < users) await one(next++);
  }));
  return { tokens, keys };
}

export async function runBench(opts: { seconds: number; connections: number }) {
  await ensureWrk();
  const kvDir = await Deno.makeTempDir({ prefix: "keyway-bench-" });
  const peerDir = await Deno.makeTempDir({ prefix: "keyway-bench-peer-" });
  const procs: Proc[] = [];
  let denokv: DenoKvServer | null = null;
  let counter: ReturnType<typeof countingKvProxy> | null = null;
  const here = new URL(".", import.meta.url).pathname;
  const script = `${here}bench_servers.ts`;
  try {
    progress("bench: starting fake upstream, bare server, pass-through proxy and the app…");
    const upstream = await spawn(["run", "-A", script, "upstream"], {}, helperPort);
    procs.push(upstream);
    const upstreamUrl = `http://127.0.0.1:${upstream.port}`;
    const bare = await spawn(["run", "-A", script, "bare"], {}, helperPort);
    procs.push(bare);
    const pass = await spawn(["run", "-A", script, "passthrough", upstreamUrl], {}, helperPort);
    procs.push(pass);
    const floor = await spawn(
      ["run", "-A", "--unstable-kv", script, "floor", upstreamUrl, `${kvDir}/floor.sqlite3`],
      {},
      helperPort,
    );
    procs.push(floor);
    const notRun: Record<string, string> = {};
    const peer = await startPeer(peerDir);
    if ("proc" in peer) procs.push(peer.proc);
    else progress(`bench: no peer row: ${notRun.peer = peer.missing}`);
    const litellm = await startLitellm(upstreamUrl, peerDir, progress);
    if ("proc" in litellm) procs.push(litellm.proc);
    else progress(`bench: no litellm row: ${notRun.litellm = litellm.missing}`);

    const issuer = await ClerkIssuer.create();
    const appArgs = await startTaskArgs(`${here}../`);
    const appEnv = {
      PUBLIC_URL: "http://localhost:8000",
      CLERK_JWT_KEY: issuer.publicKeyPem,
      KEY_ENCRYPTION_SECRET: "bench-encryption-secret-0123456789abcdef",
      GLM_API_KEY: "bench-master-key-0123456789",
      GLM_BASE_URL: upstreamUrl,
      RATE_LIMIT_RPM: "1000000",
      RATE_LIMIT_RPD: "100000000",
      NO_COLOR: "1",
    };
    const kvFile = `${kvDir}/bench.sqlite3`;
    const app = await spawnApp(appArgs, { ...appEnv, DENO_KV_PATH: kvFile });
    procs.push(app);
    const appUrl = `http://127.0.0.1:${app.port}`;
    // The same app over KV Connect, against a denokv server on loopback, where denokv is installed.
    const denokvBin = findDenokv();
    let remoteApp: Proc | null = null;
    if (denokvBin) {
      progress("bench: starting denokv on loopback and the app over KV Connect…");
      denokv = await DenoKvServer.start(denokvBin, kvDir);
      remoteApp = await spawnApp(appArgs, { ...appEnv, ...denokv.env });
      procs.push(remoteApp);
    } else {
      notRun.proxyRemoteKv = `denokv is not installed (${DENOKV_INSTALL})`;
      progress(`bench: no proxyRemoteKv row: ${notRun.proxyRemoteKv}`);
    }
    const remoteUrl = remoteApp ? `http://127.0.0.1:${remoteApp.port}` : "";

    // One user per connection, as in real traffic: many people, each with their own key.
    const users = Math.max(1, Math.min(opts.connections, 64));
    const { tokens, keys } = await provisionUsers(issuer, appUrl, users);
    const remoteKeys = remoteApp ? (await provisionUsers(issuer, remoteUrl, users)).keys : [];

    const { seconds, connections } = opts;
    const warm = Math.max(1, Math.min(3, Math.round(seconds / 3)));
    const scenarios: Record<string, Result> = {};
    // Each scenario with the process under test, whose CPU time per request is measured too: it
    // shows where a ratio comes from.
    const scenario = (name: string) => plan.find((p) => p[0] === name)!;
    const chatTo = (auth: string[], headers?: Record<string, string>) =>
      luaScript({ method: "POST", body: CHAT_BODY, auth, headers });
    const plan: Array<[string, string, string, Proc]> = [
      ["bare", `http://127.0.0.1:${bare.port}/`, luaScript({ method: "GET", auth: [] }), bare],
      ["key", `${appUrl}/api/key`, luaScript({ method: "GET", auth: tokens }), app],
      ["direct", `${upstreamUrl}/chat/completions`, chatTo(["master"]), upstream],
      ["passthrough", `http://127.0.0.1:${pass.port}/chat/completions`, chatTo([]), pass],
      ["floor", `http://127.0.0.1:${floor.port}/chat/completions`, chatTo(keys), floor],
    ];
    if ("proc" in peer) {
      plan.push([
        "peer",
        `http://127.0.0.1:${peer.proc.port}/v1/chat/completions`,
        chatTo(["master"], {
          "x-portkey-provider": "openai",
          "x-portkey-custom-host": upstreamUrl,
        }),
        peer.proc,
      ]);
    }
    if ("proc" in litellm) {
      plan.push([
        "litellm",
        `http://127.0.0.1:${litellm.proc.port}/v1/chat/completions`,
        chatTo([LITELLM_MASTER_KEY]),
        litellm.proc,
      ]);
    }
    plan.push(
      ["proxy", `${appUrl}/v1/chat/completions`, chatTo(keys), app],
      [
        "proxyStream",
        `${appUrl}/v1/chat/completions`,
        luaScript({ method: "POST", body: STREAM_BODY, auth: keys }),
        app,
      ],
      [
        "messages",
        `${appUrl}/v1/messages`,
        luaScript({ method: "POST", body: MESSAGES_BODY, auth: keys }),
        app,
      ],
    );
    if (remoteApp) {
      plan.push([
        "proxyRemoteKv",
        `${remoteUrl}/v1/chat/completions`,
        chatTo(remoteKeys),
        remoteApp,
      ]);
    }
    const cpuUsPerRequest: Record<string, number | null> = {};
    /** The gateway's CPU per request by thread (JSON through the gateway). */
    const cpuUsByThread: Record<string, Record<string, number>> = {};
    let denokvCpuUsPerRequest: number | null = null;
    const run = async (name: string, url: string, lua: string, proc: Proc) => {
      progress(`bench: ${name} — warm-up ${warm}s, then ${seconds}s at ${connections} connections`);
      await wrk(url, warm, connections, lua);
      const before = await cpuMs(proc.child.pid);
      const threadsBefore = await cpuMsByThread(proc.child.pid);
      const kvBefore = name === "proxyRemoteKv" ? await cpuMs(denokv!.pid!) : null;
      scenarios[name] = await wrk(url, seconds, connections, lua);
      const after = await cpuMs(proc.child.pid);
      const threadsAfter = await cpuMsByThread(proc.child.pid);
      const { requests } = scenarios[name];
      if (requests && proc === app) {
        cpuUsByThread[name] = Object.fromEntries(
          Object.entries(threadsAfter).map((
            [k, v],
          ) => [k, Math.round((v - (threadsBefore[k] ?? 0)) * 1000 / requests)]),
        );
      }
      cpuUsPerRequest[name] = before === null || after === null || !requests
        ? null
        : Math.round((after - before) * 1000 / requests);
      if (kvBefore !== null && requests) {
        const kvAfter = await cpuMs(denokv!.pid!);
        if (kvAfter !== null) {
          denokvCpuUsPerRequest = Math.round((kvAfter - kvBefore) * 1000 / requests);
        }
      }
    };
    for (const [name, url, lua, proc] of plan) await run(name, url, lua, proc);
    progress(`bench: added latency — pass-through and gateway at 1 connection, ${seconds}s each`);
    const single: Record<string, Result> = {
      passthrough: await wrk(scenario("passthrough")[1], seconds, 1, scenario("passthrough")[2]),
      proxy: await wrk(scenario("proxy")[1], seconds, 1, scenario("proxy")[2]),
      floor: await wrk(scenario("floor")[1], seconds, 1, scenario("floor")[2]),
    };
    if (remoteApp) {
      single.proxyRemoteKv = await wrk(
        scenario("proxyRemoteKv")[1],
        seconds,
        1,
        scenario("proxyRemoteKv")[2],
      );
    }
    const chunks = await sseReads(`${appUrl}/v1/chat/completions`, keys[0]);
    const rss = await peakRssMb(app.child.pid);
    // Last, so the peak RSS above is the 32 users' (5,000 users' keys and state fill the caches).
    progress(`bench: provisioning ${MANY_USERS.toLocaleString("en-US")} users for proxyManyUsers…`);
    const manyKeys = (await provisionUsers(issuer, appUrl, MANY_USERS)).keys;
    await run("proxyManyUsers", `${appUrl}/v1/chat/completions`, chatTo(manyKeys), app);
    const rssManyUsers = await peakRssMb(app.child.pid);

    progress("bench: one durable commit at a time on the app's KV file (and on denokv)…");
    const localKv = await Deno.openKv(kvFile);
    const kvCommitMs = await commitLatency(localKv).finally(() => localKv.close());
    let remoteKv: Record<string, unknown> | null = null;
    if (denokv && remoteApp) {
      const kv = await denokv.open();
      const remoteCommitMs = await commitLatency(kv).finally(() => kv.close());
      // KV Connect calls per gateway request, counted on the wire: one more app, whose KV is a
      // counting pass-through in front of the same denokv.
      progress("bench: counting KV Connect calls per gateway request…");
      counter = countingKvProxy(denokv.url);
      const counted = await spawnApp(appArgs, {
        ...appEnv,
        DENO_KV_PATH: counter.url,
        DENO_KV_ACCESS_TOKEN: DENOKV_TOKEN,
      });
      procs.push(counted);
      const countedUrl = `http://127.0.0.1:${counted.port}/v1/chat/completions`;
      const countedKeys = (await provisionUsers(issuer, `http://127.0.0.1:${counted.port}`, users))
        .keys;
      const perRequest: Record<
        string,
        Omit<KvCallCounts, "writeBytes"> & { bytesPerWrite: number; requests: number }
      > = {};
      for (const c of [connections, 1]) {
        await wrk(countedUrl, 1, c, chatTo(countedKeys)); // caches warm, users known
        counter.reset();
        const { requests } = await wrk(
          countedUrl,
          Math.min(seconds, 3),
          c,
          chatTo(countedKeys),
        );
        const per = (n: number) => Math.round(n / requests * 100) / 100;
        perRequest[`at${c}Connection${c === 1 ? "" : "s"}`] = {
          writes: per(counter.counts.writes),
          reads: per(counter.counts.reads),
          watches: per(counter.counts.watches),
          bytesPerWrite: Math.round(counter.counts.writeBytes / Math.max(1, counter.counts.writes)),
          requests,
        };
      }
      remoteKv = {
        kvCommitMs: remoteCommitMs,
        kvCallsPerRequest: perRequest,
        denokvCpuUsPerRequest,
      };
    }

    const r3 = (n: number) => Math.round(n * 1000) / 1000;
    const ratio = (a?: Result, b?: Result) => a && b?.rps ? r3(a.rps / b.rps) : null;
    return {
      machine: await machine(),
      seconds,
      connections,
      // CONTRACT §9: a scenario that could not run is null (the reason is in `details.notRun`).
      scenarios: Object.fromEntries(
        SCENARIO_ORDER.map((k) => {
          const v = scenarios[k];
          return [
            k,
            v
              ? { rps: v.rps, p50Ms: v.p50Ms, p99Ms: v.p99Ms, cpuUsPerRequest: cpuUsPerRequest[k] }
              : null,
          ];
        }),
      ),
      ratios: {
        proxyOverPassthroughRps: r3(scenarios.proxy.rps / scenarios.passthrough.rps),
        proxyOverPeerRps: ratio(scenarios.proxy, scenarios.peer),
        proxyOverLitellmRps: ratio(scenarios.proxy, scenarios.litellm),
        keyOverBareRps: r3(scenarios.key.rps / scenarios.bare.rps),
        proxyCpuOverPassthroughCpu: cpuUsPerRequest.proxy && cpuUsPerRequest.passthrough
          ? r3(cpuUsPerRequest.proxy / cpuUsPerRequest.passthrough)
          : null,
        proxyCpuOverFloorCpu: cpuUsPerRequest.proxy && cpuUsPerRequest.floor
          ? r3(cpuUsPerRequest.proxy / cpuUsPerRequest.floor)
          : null,
        floorCpuOverPassthroughCpu: cpuUsPerRequest.floor && cpuUsPerRequest.passthrough
          ? r3(cpuUsPerRequest.floor / cpuUsPerRequest.passthrough)
          : null,
        messagesOverProxyRps: r3(scenarios.messages.rps / scenarios.proxy.rps),
        manyUsersOverProxyRps: r3(scenarios.proxyManyUsers.rps / scenarios.proxy.rps),
        proxyRemoteKvOverProxyRps: ratio(scenarios.proxyRemoteKv, scenarios.proxy),
      },
      addedLatencyMs: {
        p50: r3(single.proxy.p50Ms - single.passthrough.p50Ms),
        p99: r3(single.proxy.p99Ms - single.passthrough.p99Ms),
      },
      kvCommitMs,
      peakRssMb: rss,
      // Beyond the contract's fields: what a reader needs to trust the numbers.
      details: {
        errors: Object.fromEntries(Object.entries(scenarios).map(([k, v]) => [k, v.errors])),
        singleConnection: single,
        cpuUsByThread,
        sseReadsPerAnswer: chunks,
        peer: "proc" in peer ? PEER_PACKAGE : null,
        litellm: "proc" in litellm ? `litellm[proxy]==${LITELLM_VERSION}` : null,
        notRun,
        /** The gateway over KV Connect (a denokv server on loopback), where denokv is installed. */
        remoteKv,
        users,
        /** Peak RSS once the 5,000 users' scenario has run (the 32 users' is peakRssMb). */
        peakRssManyUsersMb: rssManyUsers,
      },
    };
  } finally {
    for (const p of procs) {
      try {
        p.child.kill("SIGTERM");
        await p.child.status;
      } catch { /* already gone */ }
    }
    await counter?.close();
    await denokv?.stop("SIGTERM");
    await Deno.remove(kvDir, { recursive: true }).catch(() => {});
    await Deno.remove(peerDir, { recursive: true }).catch(() => {});
  }
}

function table(report: Awaited<ReturnType<typeof runBench>>): string {
  const rows = [["scenario", "req/s", "p50 ms", "p99 ms", "CPU µs/req", "errors"]];
  for (const [name, r] of Object.entries(report.scenarios)) {
    if (r === null) {
      rows.push([name, "–", "–", "–", "–", `not run: ${report.details.notRun[name] ?? "?"}`]);
      continue;
    }
    const cpu = r.cpuUsPerRequest;
    rows.push([
      name,
      r.rps.toLocaleString("en-US"),
      r.p50Ms.toFixed(3),
      r.p99Ms.toFixed(3),
      cpu === null || cpu === undefined ? "–" : String(cpu),
      String(report.details.errors[name] ?? 0),
    ]);
  }
  const widths = rows[0].map((_, i) =>
    Math.max(...rows.filter((r) => !r[5].startsWith("not run")).map((r) => r[i].length))
  );
  const fmt = (r: string[]) =>
    r.map((c, i) => (i === 0 ? c.padEnd(widths[i]) : c.padStart(widths[i]))).join("  ");
  const { ratios, addedLatencyMs, kvCommitMs } = report;
  const remote = report.details.remoteKv as
    | null
    | {
      kvCommitMs: { p50: number; p99: number };
      kvCallsPerRequest: Record<string, { writes: number; reads: number; bytesPerWrite: number }>;
      denokvCpuUsPerRequest: number | null;
    };
  const single = report.details.singleConnection;
  const orNone = (n: number | null, what: string, target = "") =>
    n === null ? `– (${what})` : `${n.toFixed(3)}${target}`;
  return [
    `Keyway benchmark — ${report.machine}`,
    `${report.seconds}s per scenario, ${report.connections} connections, ${report.details.users} users`,
    "",
    fmt(rows[0]),
    ...rows.slice(1).map(fmt),
    "",
    `gateway / pass-through throughput  ${
      ratios.proxyOverPassthroughRps.toFixed(3)
    }  (target ≥ 0.5)`,
    `/api/key / bare hello throughput   ${ratios.keyOverBareRps.toFixed(3)}  (target ≥ 0.3)`,
    `gateway / Portkey throughput       ${
      orNone(ratios.proxyOverPeerRps, "no peer row", "  (target ≥ 5)")
    }`,
    `gateway / LiteLLM throughput       ${orNone(ratios.proxyOverLitellmRps, "no litellm row")}`,
    `gateway / pass-through CPU         ${orNone(ratios.proxyCpuOverPassthroughCpu, "no /proc")}`,
    `floor / pass-through CPU           ${
      orNone(ratios.floorCpuOverPassthroughCpu, "no /proc")
    }  (the least the contract's work costs: bench_servers.ts floor)`,
    `gateway / floor CPU                ${orNone(ratios.proxyCpuOverFloorCpu, "no /proc")}`,
    `/v1/messages / chat completions    ${
      ratios.messagesOverProxyRps.toFixed(3)
    }  (target within 10%)`,
    `${`${MANY_USERS.toLocaleString("en-US")} users / ${report.details.users} users`.padEnd(35)}${
      ratios.manyUsersOverProxyRps.toFixed(3)
    }  throughput (gateway JSON, every key in rotation)`,
    `added latency at 1 connection      p50 ${
      addedLatencyMs.p50.toFixed(3)
    } ms (target ≤ commit p50 + 0.25), p99 ${
      addedLatencyMs.p99.toFixed(3)
    } ms (target ≤ commit p99 + 1); the floor's p50 ${
      (single.floor.p50Ms - single.passthrough.p50Ms).toFixed(3)
    } ms, p99 ${(single.floor.p99Ms - single.passthrough.p99Ms).toFixed(3)} ms`,
    `one durable commit, KV file        p50 ${kvCommitMs.p50.toFixed(3)} ms, p99 ${
      kvCommitMs.p99.toFixed(3)
    } ms`,
    ...(remote
      ? [
        `one durable commit, denokv         p50 ${remote.kvCommitMs.p50.toFixed(3)} ms, p99 ${
          remote.kvCommitMs.p99.toFixed(3)
        } ms`,
        `gateway over denokv / KV file      ${
          orNone(ratios.proxyRemoteKvOverProxyRps, "")
        } throughput; at 1 connection p50 ${single.proxyRemoteKv.p50Ms.toFixed(3)} ms vs ${
          single.proxy.p50Ms.toFixed(3)
        } ms`,
        `KV Connect calls per request       ${
          Object.entries(remote.kvCallsPerRequest).map(([k, v]) =>
            `${k}: ${v.writes} writes of ${v.bytesPerWrite} B, ${v.reads} reads`
          ).join("; ")
        }`,
        `denokv CPU per gateway request     ${remote.denokvCpuUsPerRequest ?? "–"} µs`,
      ]
      : [`gateway over denokv                – (${report.details.notRun.proxyRemoteKv})`]),
    `app peak RSS                       ${report.peakRssMb} MB (target ≤ 200); after ${
      MANY_USERS.toLocaleString("en-US")
    } users ${report.details.peakRssManyUsersMb} MB`,
    `gateway CPU µs/req by thread       ${
      Object.entries(report.details.cpuUsByThread.proxy ?? {}).map(([k, v]) => `${k} ${v}`)
        .join(", ") || "– (no /proc)"
    } (JSON)`,
    `SSE answer of 7 spaced chunks      relayed in ${report.details.sseReadsPerAnswer} reads (7 = chunk by chunk)`,
  ].join("\n");
}

if (import.meta.main) {
  let flags;
  try {
    flags = parseBenchFlags(Deno.args);
  } catch (err) {
    console.error(`bench: ${(err as Error).message}`);
    Deno.exit(2);
  }
  if (!flags) {
    console.log(HELP);
    Deno.exit(0);
  }
  const report = await runBench(flags);
  console.log(flags.json ? JSON.stringify(report, null, 2) : table(report));
}
