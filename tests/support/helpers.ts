/** Test plumbing: an isolated app on its own :memory: KV, with captured logs. */
import { loadConfig } from "../../lib/core/config.ts";
import type { Logger } from "../../lib/core/log.ts";
import { createLogger } from "../../lib/core/log.ts";
import { createServices, type Services } from "../../lib/core/services.ts";
import type { ConnectOptions } from "../../lib/identity/connect.ts";
import { createApp } from "../../routes/mod.ts";
import { ClerkIssuer } from "../../testing/fakes/clerk_issuer.ts";
import { FakeGlm } from "../../testing/fakes/glm.ts";

export const MASTER_KEY = "glm-master-SECRET-0123456789abcdef.zzTopSecret";
export const ENCRYPTION_SECRET = "test-encryption-secret-0123456789-abcdef";
export const PUBLIC_URL = "http://localhost:8000";

export interface TestApp {
  services: Services;
  kv: Deno.Kv;
  logs: string[];
  request(path: string, init?: RequestInit): Promise<Response>;
  close(): Promise<void>;
}

/** A logger that keeps every line (after redaction) for assertions instead of printing. */
export function captureLogger(secrets: string[]): { log: Logger; lines: string[] } {
  const lines: string[] = [];
  const log = createLogger(secrets, { sink: (_level, line) => lines.push(line) });
  return { log, lines };
}

/** Builds an app in-process. `env` adds to a base environment (local mode unless Clerk is set). */
export async function testApp(
  env: Record<string, string> = {},
  /** Service options, e.g. shorter connect-flow lifetimes. */
  options: { connect?: ConnectOptions } = {},
): Promise<TestApp> {
  const config = loadConfig({
    DENO_KV_PATH: ":memory:",
    PUBLIC_URL,
    GLM_API_KEY: MASTER_KEY,
    ...env,
  });
  const kv = await Deno.openKv(config.kvPath ?? ":memory:");
  const { log, lines } = captureLogger([MASTER_KEY, ENCRYPTION_SECRET]);
  const services = await createServices(config, kv, { log, ...options });
  const app = createApp(services);
  return {
    services,
    kv,
    logs: lines,
    request: async (path, init) => await app.request(new URL(path, PUBLIC_URL).href, init),
    close: async () => {
      await services.close();
      kv.close();
    },
  };
}

/** Environment for Clerk mode with networkless verification against the given issuer. */
export function clerkEnv(issuer: ClerkIssuer, extra: Record<string, string> = {}) {
  return {
    CLERK_JWT_KEY: issuer.publicKeyPem,
    CLERK_PUBLISHABLE_KEY: "pk_test_Y2xlcmsua2V5d2F5LnRlc3Qk",
    KEY_ENCRYPTION_SECRET: ENCRYPTION_SECRET,
    ...extra,
  };
}

export { ClerkIssuer };

/** A browser's same-origin form POST carrying the Clerk session cookie (the connect pages). */
export function formPost(token: string, fields: Record<string, string>, origin = PUBLIC_URL) {
  return {
    method: "POST",
    redirect: "manual" as const,
    headers: {
      cookie: `__session=${token}`,
      origin,
      "content-type": "application/x-www-form-urlencoded",
    },
    body: new URLSearchParams(fields).toString(),
  } satisfies RequestInit;
}

export function bearer(token: string): HeadersInit {
  return { authorization: `Bearer ${token}` };
}

export async function json<T = Record<string, unknown>>(res: Response): Promise<T> {
  return await res.json() as T;
}

/** A user's usage counters summed over every model and every day, or one day (small KV stores). */
export async function usageTotalsOf(kv: Deno.Kv, userId: string, day?: string) {
  const totals = { requests: 0, prompt: 0, completion: 0 };
  for await (const { key, value } of kv.list<Deno.KvU64>({ prefix: ["usage_daily"] })) {
    if (key[2] !== userId || (day !== undefined && key[1] !== day)) continue;
    totals[key[4] as keyof typeof totals] += Number(value.value);
  }
  return totals;
}

/** Polls `probe` until it returns something (a log line the app writes on its own), or fails. */
export async function eventually<T>(
  probe: () => T | undefined | Promise<T | undefined>,
  timeoutMs = 5000,
  /** Says what was seen instead, for the failure message. */
  seen?: () => unknown,
): Promise<T> {
  const until = Date.now() + timeoutMs;
  for (;;) {
    const got = await probe();
    if (got !== undefined && got !== null && got !== false) return got;
    if (Date.now() > until) {
      const last = seen ? `; last seen: ${JSON.stringify(await seen())}` : "";
      throw new Error(`nothing after ${timeoutMs} ms${last}`);
    }
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** Today's usage as GET /api/usage reports it. */
export interface TodayUsage {
  requests: number;
  promptTokens: number;
  completionTokens: number;
  totalTokens: number;
  costUsd: number;
}

export interface ServedGateway {
  app: TestApp;
  fake: FakeGlm;
  url: string;
  apiKey: string;
  /** Today's usage, read through GET /api/usage with the user's own key (as a client would). */
  today(): Promise<TodayUsage>;
  close(): Promise<void>;
}

/**
 * The app on a real port (hang-ups and SDKs need real connections), a fake GLM behind it, and one
 * provisioned user.
 */
export async function serveGateway(
  env: Record<string, string>,
  userId: string,
): Promise<ServedGateway> {
  const fake = new FakeGlm();
  const app = await testApp({ GLM_BASE_URL: fake.baseUrl, ...env });
  const server = Deno.serve(
    { hostname: "127.0.0.1", port: 0, onListen: () => {} },
    createApp(app.services).fetch,
  );
  const url = `http://127.0.0.1:${server.addr.port}`;
  const { apiKey } = await app.services.users.provision(userId);
  return {
    app,
    fake,
    url,
    apiKey,
    today: async () => {
      const res = await fetch(`${url}/api/usage?days=1`, { headers: bearer(apiKey) });
      if (res.status !== 200) throw new Error(`GET /api/usage: ${res.status}`);
      const { requests, promptTokens, completionTokens, totalTokens, costUsd } =
        (await res.json()).today;
      return { requests, promptTokens, completionTokens, totalTokens, costUsd };
    },
    close: async () => {
      await server.shutdown();
      await fake.close();
      await app.close();
    },
  };
}

/** The environment of a real app process (tests/support/subprocess.ts) in Clerk mode before a fake GLM. */
export function processEnv(
  kvPath: string,
  glm: FakeGlm,
  issuer: ClerkIssuer,
  extra: Record<string, string> = {},
): Record<string, string> {
  return {
    DENO_KV_PATH: kvPath,
    PUBLIC_URL: PUBLIC_URL,
    CLERK_JWT_KEY: issuer.publicKeyPem,
    KEY_ENCRYPTION_SECRET: ENCRYPTION_SECRET,
    GLM_API_KEY: MASTER_KEY,
    GLM_BASE_URL: glm.baseUrl,
    PORT: "0",
    ...extra,
  };
}

/** Runs `deno task report` (tasks/report.ts) as a process on a KV file. */
export async function runReport(
  args: string[],
  kvPath: string,
  env: Record<string, string> = {},
) {
  const cwd = await Deno.makeTempDir({ prefix: "keyway_report_cwd_" });
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", new URL("../../tasks/report.ts", import.meta.url).pathname, ...args],
    cwd,
    env: { DENO_KV_PATH: kvPath, NO_COLOR: "1", ...env },
    stdout: "piped",
    stderr: "piped",
  }).output().finally(() => Deno.remove(cwd, { recursive: true }));
  const dec = new TextDecoder();
  return { code: out.code, stdout: dec.decode(out.stdout), stderr: dec.decode(out.stderr) };
}

type Commit = () => Promise<Deno.KvCommitResult | Deno.KvCommitError>;

/** A KV whose atomic commits go through `around` (which calls, delays or fails the commit). */
export function interceptCommits(
  kv: Deno.Kv,
  around: (commit: Commit) => Promise<Deno.KvCommitResult | Deno.KvCommitError>,
): Deno.Kv {
  return new Proxy(kv, {
    get(target, prop) {
      if (prop === "atomic") {
        return () => {
          const op = target.atomic();
          const commit = op.commit.bind(op);
          op.commit = () => around(commit);
          return op;
        };
      }
      const value = Reflect.get(target, prop);
      return typeof value === "function" ? value.bind(target) : value;
    },
  });
}
