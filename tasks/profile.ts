/**
 * `deno task profile`: where the gateway spends its CPU under the bench's load. Starts the fake
 * GLM upstream and the app (as `deno task start` runs it, plus `--inspect` on loopback), drives
 * one scenario with wrk, and records a V8 CPU profile through the inspector while it runs; then
 * prints the functions with the most self time, and the same by file. `--out` keeps the
 * `.cpuprofile` for Chrome DevTools.
 */
import { z } from "zod";
import { flagIssue, parseFlags, UsageError, wholeNumber } from "../lib/core/cli.ts";
import { ClerkIssuer } from "../testing/fakes/clerk_issuer.ts";
import {
  CHAT_BODY,
  cpuMs,
  ensureWrk,
  helperPort,
  luaScript,
  MESSAGES_BODY,
  type Proc,
  progress,
  provisionUsers,
  spawn,
  spawnApp,
  startTaskArgs,
  STREAM_BODY,
  wrk,
} from "./bench.ts";

const HELP =
  `deno task profile [--scenario NAME] [--seconds N] [--connections N] [--users N] [--top N] [--out FILE]

  --scenario NAME   proxy (JSON chat completions), proxyStream (SSE), messages (/v1/messages)
                    or key (GET /api/key); default proxy
  --seconds N       profiling time (default 10; a 3 s warm-up comes first)
  --connections N   concurrent connections (default 32)
  --users N         distinct users' keys in rotation (default: one per connection)
  --top N           rows to print (default 25)
  --out FILE        also write the V8 CPU profile (open it in Chrome DevTools)
  --help            this text`;

const SCENARIOS = ["proxy", "proxyStream", "messages", "key"] as const;

const flagsSchema = z.object({
  scenario: z.enum(SCENARIOS, { message: `--scenario must be one of ${SCENARIOS.join(", ")}` })
    .default("proxy"),
  seconds: wholeNumber("--seconds", 1, 600).default(10),
  connections: wholeNumber("--connections", 1, 1000).default(32),
  users: wholeNumber("--users", 1, 100_000).optional(),
  top: wholeNumber("--top", 1, 500).default(25),
  out: z.string().min(1, { message: "--out needs a file name" }).optional(),
});

export function parseProfileFlags(args: string[]) {
  const raw = parseFlags(args, {
    scenario: "string",
    seconds: "string",
    connections: "string",
    users: "string",
    top: "string",
    out: "string",
    help: "boolean",
  });
  if (raw.help) return null;
  const parsed = flagsSchema.safeParse(raw);
  if (!parsed.success) throw new UsageError(flagIssue(parsed.error.issues[0]));
  return parsed.data;
}

interface ProfileNode {
  id: number;
  callFrame: { functionName: string; url: string; lineNumber: number; columnNumber: number };
  hitCount?: number;
  children?: number[];
}
interface CpuProfile {
  nodes: ProfileNode[];
  startTime: number;
  endTime: number;
  samples?: number[];
  timeDeltas?: number[];
}

/** A minimal Chrome DevTools Protocol client over the inspector's WebSocket. */
class Inspector {
  private next = 1;
  private readonly pending = new Map<number, (v: { result?: unknown; error?: unknown }) => void>();
  private constructor(private readonly ws: WebSocket) {
    ws.onmessage = (e) => {
      const msg = JSON.parse(String(e.data));
      if (typeof msg.id === "number") this.pending.get(msg.id)?.(msg);
    };
  }

  static async connect(port: number): Promise<Inspector> {
    const deadline = Date.now() + 10_000;
    for (;;) {
      try {
        const list = await (await fetch(`http://127.0.0.1:${port}/json/list`)).json();
        const ws = new WebSocket(list[0].webSocketDebuggerUrl);
        await new Promise((resolve, reject) => {
          ws.onopen = resolve;
          ws.onerror = () => reject(new Error("the inspector refused the WebSocket"));
        });
        return new Inspector(ws);
      } catch (err) {
        if (Date.now() > deadline) throw err;
        await new Promise((r) => setTimeout(r, 100));
      }
    }
  }

  call<T>(method: string, params: Record<string, unknown> = {}): Promise<T> {
    const id = this.next++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, (msg) => {
        this.pending.delete(id);
        if (msg.error) reject(new Error(`${method}: ${JSON.stringify(msg.error)}`));
        else resolve(msg.result as T);
      });
      this.ws.send(JSON.stringify({ id, method, params }));
    });
  }

  close() {
    this.ws.close();
  }
}

interface Row {
  name: string;
  where: string;
  selfMs: number;
}

/** Self time per function (and per file), from the sample counts and the time between samples. */
export function selfTimes(profile: CpuProfile, root: string) {
  const byId = new Map(profile.nodes.map((n) => [n.id, n]));
  const selfUs = new Map<number, number>();
  const samples = profile.samples ?? [];
  const deltas = profile.timeDeltas ?? [];
  for (let i = 0; i < samples.length; i++) {
    // Each sample's time is the gap to the next one (the last gets the mean).
    const us = deltas[i + 1] ?? (profile.endTime - profile.startTime) / Math.max(1, samples.length);
    selfUs.set(samples[i], (selfUs.get(samples[i]) ?? 0) + us);
  }
  let total = 0;
  let idleMs = 0;
  let inspectorMs = 0;
  const fns = new Map<string, Row>();
  const files = new Map<string, Row>();
  for (const [id, us] of selfUs) {
    const { callFrame: f } = byId.get(id)!;
    const file = shortUrl(f.url, root);
    const name = f.functionName || (file ? "(anonymous)" : "(native)");
    // Not the app's work: waiting, and what the inspector itself costs while attached (Deno
    // reports every fetch to it).
    if (name === "(idle)") {
      idleMs += us / 1000;
      continue;
    }
    if (INSPECTOR_COST.test(name) || INSPECTOR_COST.test(file)) {
      inspectorMs += us / 1000;
      continue;
    }
    total += us;
    const where = file ? `${file}:${f.lineNumber + 1}` : "";
    const key = `${name}\u0000${where}`;
    const row = fns.get(key) ?? { name, where, selfMs: 0 };
    row.selfMs += us / 1000;
    fns.set(key, row);
    const fileKey = file || name;
    const fileRow = files.get(fileKey) ?? { name: fileKey, where: "", selfMs: 0 };
    fileRow.selfMs += us / 1000;
    files.set(fileKey, fileRow);
  }
  const sorted = (m: Map<string, Row>) => [...m.values()].sort((a, b) => b.selfMs - a.selfMs);
  return {
    totalMs: total / 1000,
    idleMs,
    inspectorMs,
    functions: sorted(fns),
    files: sorted(files),
  };
}

const INSPECTOR_COST = /^op_inspector_|inspector_network_bridge|^joinHeaderValuesForCdp$/;

/** Our files relative to the checkout; npm packages by name; runtime internals by their module. */
function shortUrl(url: string, root: string): string {
  if (!url) return "";
  const path = url.replace(/^file:\/\//, "");
  if (path.startsWith(root)) return path.slice(root.length);
  const npm = path.match(/registry\.npmjs\.org\/((?:@[^/]+\/)?[^/]+)\/[^/]+\/(.+)$/);
  if (npm) return `npm:${npm[1]}/${npm[2]}`;
  return path.replace(/^ext:/, "ext:");
}

function printRows(title: string, rows: Row[], totalMs: number, top: number) {
  const shown = rows.slice(0, top);
  const pct = (ms: number) => `${(ms / totalMs * 100).toFixed(1)}%`;
  const width = Math.max(...shown.map((r) => r.name.length), 8);
  console.log(`\n${title}`);
  console.log(`${"self".padStart(7)}  ${"ms".padStart(8)}  ${"function".padEnd(width)}  where`);
  for (const r of shown) {
    console.log(
      `${pct(r.selfMs).padStart(7)}  ${r.selfMs.toFixed(0).padStart(8)}  ${
        r.name.padEnd(width)
      }  ${r.where}`,
    );
  }
}

export async function runProfile(flags: NonNullable<ReturnType<typeof parseProfileFlags>>) {
  await ensureWrk();
  const here = new URL(".", import.meta.url).pathname;
  const root = new URL("../", import.meta.url).pathname;
  const kvDir = await Deno.makeTempDir({ prefix: "keyway-profile-" });
  const procs: Proc[] = [];
  let inspector: Inspector | null = null;
  try {
    progress("profile: starting the fake upstream and the app with --inspect…");
    const upstream = await spawn(
      ["run", "-A", `${here}bench_servers.ts`, "upstream"],
      {},
      helperPort,
    );
    procs.push(upstream);
    const probe = Deno.listen({ hostname: "127.0.0.1", port: 0 });
    const inspectPort = probe.addr.port;
    probe.close();
    const args = await startTaskArgs(root);
    const issuer = await ClerkIssuer.create();
    const app = await spawnApp([args[0], `--inspect=127.0.0.1:${inspectPort}`, ...args.slice(1)], {
      PUBLIC_URL: "http://localhost:8000",
      CLERK_JWT_KEY: issuer.publicKeyPem,
      KEY_ENCRYPTION_SECRET: "bench-encryption-secret-0123456789abcdef",
      GLM_API_KEY: "bench-master-key-0123456789",
      GLM_BASE_URL: `http://127.0.0.1:${upstream.port}`,
      RATE_LIMIT_RPM: "1000000",
      RATE_LIMIT_RPD: "100000000",
      DENO_KV_PATH: `${kvDir}/profile.sqlite3`,
      NO_COLOR: "1",
    });
    procs.push(app);
    const appUrl = `http://127.0.0.1:${app.port}`;
    const users = flags.users ?? Math.max(1, Math.min(flags.connections, 64));
    progress(`profile: provisioning ${users.toLocaleString("en-US")} users…`);
    const { tokens, keys } = await provisionUsers(issuer, appUrl, users);
    const [url, lua] = {
      proxy: [
        `${appUrl}/v1/chat/completions`,
        luaScript({ method: "POST", body: CHAT_BODY, auth: keys }),
      ],
      proxyStream: [
        `${appUrl}/v1/chat/completions`,
        luaScript({ method: "POST", body: STREAM_BODY, auth: keys }),
      ],
      messages: [
        `${appUrl}/v1/messages`,
        luaScript({ method: "POST", body: MESSAGES_BODY, auth: keys }),
      ],
      key: [`${appUrl}/api/key`, luaScript({ method: "GET", auth: tokens })],
    }[flags.scenario];

    progress(`profile: ${flags.scenario} — warm-up 3s, then ${flags.seconds}s profiled`);
    await wrk(url, 3, flags.connections, lua);
    inspector = await Inspector.connect(inspectPort);
    await inspector.call("Profiler.enable");
    await inspector.call("Profiler.setSamplingInterval", { interval: 100 });
    await inspector.call("Profiler.start");
    const cpuBefore = await cpuMs(app.child.pid);
    const result = await wrk(url, flags.seconds, flags.connections, lua);
    const cpuAfter = await cpuMs(app.child.pid);
    const { profile } = await inspector.call<{ profile: CpuProfile }>("Profiler.stop");
    if (flags.out) {
      await Deno.writeTextFile(flags.out, JSON.stringify(profile));
      progress(`profile: wrote ${flags.out}`);
    }
    const times = selfTimes(profile, root);
    const cpuPerRequest = cpuBefore !== null && cpuAfter !== null && result.requests
      ? Math.round((cpuAfter - cpuBefore) * 1000 / result.requests)
      : null;
    console.log(
      `Keyway CPU profile — ${flags.scenario}, ${flags.seconds}s at ${flags.connections} connections, ` +
        `${users.toLocaleString("en-US")} users: ${result.rps.toLocaleString("en-US")} req/s, ` +
        `${cpuPerRequest ?? "–"} µs CPU per request (with the profiler on), ` +
        `${times.totalMs.toFixed(0)} ms of work sampled on the main thread ` +
        `(not counted: ${times.idleMs.toFixed(0)} ms idle, ${
          times.inspectorMs.toFixed(0)
        } ms the inspector's own reporting)`,
    );
    printRows("by function (self time)", times.functions, times.totalMs, flags.top);
    printRows("by file (self time)", times.files, times.totalMs, Math.min(flags.top, 15));
  } finally {
    inspector?.close();
    for (const p of procs) {
      try {
        p.child.kill("SIGTERM");
        await p.child.status;
      } catch { /* already gone */ }
    }
    await Deno.remove(kvDir, { recursive: true }).catch(() => {});
  }
}

if (import.meta.main) {
  let flags;
  try {
    flags = parseProfileFlags(Deno.args);
  } catch (err) {
    console.error(`profile: ${(err as Error).message}`);
    Deno.exit(2);
  }
  if (!flags) {
    console.log(HELP);
    Deno.exit(0);
  }
  await runProfile(flags);
}
