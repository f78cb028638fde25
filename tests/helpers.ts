/** Test plumbing: an isolated app on its own :memory: KV, with captured logs. */
import { loadConfig } from "../lib/core/config.ts";
import type { Logger } from "../lib/core/log.ts";
import { createLogger } from "../lib/core/log.ts";
import { createServices, type Services } from "../lib/core/services.ts";
import { createApp } from "../routes/mod.ts";
import { ClerkIssuer } from "./fakes/clerk_issuer.ts";

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
export async function testApp(env: Record<string, string> = {}): Promise<TestApp> {
  const config = loadConfig({
    DENO_KV_PATH: ":memory:",
    PUBLIC_URL,
    GLM_API_KEY: MASTER_KEY,
    ...env,
  });
  const kv = await Deno.openKv(config.kvPath ?? ":memory:");
  const { log, lines } = captureLogger([MASTER_KEY, ENCRYPTION_SECRET]);
  const services = await createServices(config, kv, { log });
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
