/** Configuration: one zod schema over the environment, read once at start-up (CONTRACT §2). */
import { z } from "zod";
import {
  DEFAULT_MODEL_ALIASES,
  DEFAULT_PRICING,
  type Pricing,
  pricingSchema,
} from "../usage/pricing.ts";

const intFrom = (name: string, def: number, min = 0, max = Number.MAX_SAFE_INTEGER) =>
  z.string().optional().transform((raw, ctx) => {
    if (raw === undefined || raw.trim() === "") return def;
    const n = Number(raw);
    if (!Number.isInteger(n) || n < min || n > max) {
      ctx.addIssue({ code: "custom", message: `${name} must be an integer from ${min} to ${max}` });
      return z.NEVER;
    }
    return n;
  });

const optionalString = z.string().optional().transform((v) =>
  v === undefined || v.trim() === "" ? undefined : v.trim()
);

const csv = optionalString.transform((v) =>
  v === undefined ? [] : v.split(",").map((s) => s.trim()).filter(Boolean)
);

const origin = (name: string, keepQuery = false) =>
  z.string().transform((raw, ctx) => {
    try {
      const url = new URL(raw);
      if (url.protocol !== "http:" && url.protocol !== "https:") throw new Error();
      // A receiver URL may route on its query (?source=keyway); base URLs never have one.
      if (keepQuery) return url.href;
      return url.origin + url.pathname.replace(/\/+$/, "");
    } catch {
      // The value is not echoed: a secret pasted into the wrong variable must not reach a log.
      ctx.addIssue({ code: "custom", message: `${name} must be an http(s) URL` });
      return z.NEVER;
    }
  });

/** Where pages send a user who is disabled or paused: a web page or an e-mail address. */
const supportUrl = z.string().transform((raw, ctx) => {
  try {
    const url = new URL(raw);
    if (url.protocol === "https:" && url.hostname) return url.href;
    if (url.protocol === "mailto:" && /^[^@\s]+@[^@\s]+$/.test(decodeURIComponent(url.pathname))) {
      return url.href;
    }
  } catch {
    // Not a URL: said below, without echoing the value.
  }
  ctx.addIssue({
    code: "custom",
    message: "SUPPORT_URL must be an https:// page or a mailto: address (mailto:help@example.com)",
  });
  return z.NEVER;
});

/**
 * Shannon entropy of a text's character frequencies times its length: a floor for a human's
 * choice (32 × "a" is 0 bits; 32 random base64 characters are ≈ 150 bits).
 */
export function estimatedEntropyBits(text: string): number {
  const counts = new Map<string, number>();
  for (const ch of text) counts.set(ch, (counts.get(ch) ?? 0) + 1);
  const n = [...text].length;
  let bitsPerChar = 0;
  for (const c of counts.values()) bitsPerChar -= (c / n) * Math.log2(c / n);
  return bitsPerChar * n;
}

/** An optional JSON variable checked by `schema`; one line naming the variable when it fails. */
function jsonFrom<S extends z.ZodType>(
  name: string,
  schema: S,
  explain: (issue: z.core.$ZodIssue | undefined) => string,
) {
  return optionalString.transform((raw, ctx): z.infer<S> | undefined => {
    if (raw === undefined) return undefined;
    let json: unknown;
    try {
      json = JSON.parse(raw);
    } catch {
      ctx.addIssue({ code: "custom", message: `${name} must be valid JSON` });
      return z.NEVER;
    }
    const parsed = schema.safeParse(json);
    if (!parsed.success) {
      ctx.addIssue({ code: "custom", message: `${name} ${explain(parsed.error.issues[0])}` });
      return z.NEVER;
    }
    return parsed.data;
  });
}

const upstreamConcurrencySchema = z.record(
  z.string().min(1).max(200),
  z.number().int().min(0).max(100_000),
);

/** Editors whose URI handlers can receive a connect-flow redirect (CONTRACT §2). */
export const DEFAULT_CONNECT_SCHEMES = [
  "vscode",
  "vscode-insiders",
  "vscodium",
  "cursor",
  "windsurf",
];
const WEB_SCHEMES = new Set([
  "http",
  "https",
  "javascript",
  "data",
  "file",
  "blob",
  "about",
  "ws",
  "wss",
  "ftp",
]);

const envSchema = z.object({
  PORT: intFrom("PORT", 8000, 0, 65535),
  PUBLIC_URL: optionalString.pipe(origin("PUBLIC_URL").optional()),
  DENO_KV_PATH: optionalString,
  DENO_KV_ACCESS_TOKEN: optionalString,
  CLERK_PUBLISHABLE_KEY: optionalString.refine(
    (v) => v === undefined || /^pk_(test|live)_[A-Za-z0-9+/=_-]+$/.test(v),
    "CLERK_PUBLISHABLE_KEY must look like pk_test_… or pk_live_…",
  ),
  CLERK_SECRET_KEY: optionalString.refine(
    (v) => v === undefined || /^sk_(test|live)_\S+$/.test(v),
    "CLERK_SECRET_KEY must look like sk_test_… or sk_live_…",
  ),
  CLERK_JWT_KEY: optionalString.transform((v) => v?.replace(/\\n/g, "\n")).refine(
    (v) => v === undefined || v.includes("-----BEGIN PUBLIC KEY-----"),
    "CLERK_JWT_KEY must be a PEM public key (-----BEGIN PUBLIC KEY-----)",
  ),
  CLERK_AUTHORIZED_PARTIES: csv,
  CLERK_WEBHOOK_SECRET: optionalString.transform((v) => v?.split(/\s+/).filter(Boolean) ?? [])
    .refine(
      (list) => list.every((s) => /^whsec_[A-Za-z0-9+/=]+$/.test(s)),
      "CLERK_WEBHOOK_SECRET must be one or more space-separated whsec_… secrets",
    ),
  CLERK_API_URL: optionalString.pipe(origin("CLERK_API_URL").optional()),
  GLM_API_KEY: optionalString.transform((v) => v?.split(",").map((k) => k.trim()) ?? [])
    .refine(
      (list) => list.every((k) => k.length > 0) && new Set(list).size === list.length,
      "GLM_API_KEY must be one key, or several distinct keys separated by commas (a pool)",
    ),
  GLM_BASE_URL: optionalString.pipe(origin("GLM_BASE_URL").optional()),
  GLM_ANTHROPIC_BASE_URL: optionalString.pipe(origin("GLM_ANTHROPIC_BASE_URL").optional()),
  MODEL_ALIASES: jsonFrom(
    "MODEL_ALIASES",
    z.record(z.string().min(1).max(200), z.string().min(1).max(200)),
    () => 'must map model name patterns to model names ({"claude-*": "glm-4.6"})',
  ),
  UPSTREAM_TIMEOUT_MS: intFrom("UPSTREAM_TIMEOUT_MS", 120_000, 1, 3_600_000),
  STREAM_MAX_MS: intFrom("STREAM_MAX_MS", 600_000, 1, 86_400_000),
  // 32 MiB, as Anthropic's API: agentic tools send long conversations with images.
  MAX_REQUEST_BYTES: intFrom("MAX_REQUEST_BYTES", 32 * 1024 * 1024, 1024, 1024 * 1024 * 1024),
  UPSTREAM_CONCURRENCY: optionalString.transform((raw, ctx): Record<string, number> => {
    if (raw === undefined) return {};
    if (/^\d+$/.test(raw)) {
      const n = Number(raw);
      if (n > 100_000) {
        ctx.addIssue({ code: "custom", message: "UPSTREAM_CONCURRENCY must be ≤ 100000" });
        return z.NEVER;
      }
      return n === 0 ? {} : { "*": n };
    }
    let json: unknown;
    try {
      json = JSON.parse(raw);
    } catch {
      json = undefined;
    }
    const parsed = upstreamConcurrencySchema.safeParse(json);
    if (!parsed.success) {
      ctx.addIssue({
        code: "custom",
        message:
          'UPSTREAM_CONCURRENCY must be a whole number, or JSON such as {"glm-4.6": 4, "*": 2} ' +
          "(whole numbers 0–100000; 0 = unlimited)",
      });
      return z.NEVER;
    }
    const limits: Record<string, number> = {};
    for (const [model, n] of Object.entries(parsed.data)) limits[model.toLowerCase()] = n;
    return limits;
  }),
  // At least a KV round trip: a request needs one to take a free slot.
  UPSTREAM_QUEUE_MS: intFrom("UPSTREAM_QUEUE_MS", 20_000, 100, 3_600_000),
  UPSTREAM_USER_SHARE: optionalString.transform((raw, ctx) => {
    if (raw === undefined) return 0.5;
    const n = Number(raw);
    if (!Number.isFinite(n) || n <= 0 || n > 1) {
      ctx.addIssue({
        code: "custom",
        message: "UPSTREAM_USER_SHARE must be a number above 0 and at most 1 (such as 0.5)",
      });
      return z.NEVER;
    }
    return n;
  }),
  UPSTREAM_QUEUE_MAX: intFrom("UPSTREAM_QUEUE_MAX", 1000, 1, 1_000_000),
  UPSTREAM_KEY_COOLDOWN_MS: intFrom("UPSTREAM_KEY_COOLDOWN_MS", 300_000, 1_000, 86_400_000),
  COUNT_TOKENS_RPM: intFrom("COUNT_TOKENS_RPM", 120, 1, 1_000_000),
  MAX_KEYS_PER_USER: intFrom("MAX_KEYS_PER_USER", 20, 1, 100),
  CONCURRENCY_LIMIT: intFrom("CONCURRENCY_LIMIT", 8, 1, 256),
  OUTPUT_RESERVE_TOKENS: intFrom("OUTPUT_RESERVE_TOKENS", 4096, 0, 10_000_000),
  KEY_MODE: optionalString.pipe(
    z.enum(["proxy", "shared"], { message: "KEY_MODE must be proxy or shared" }).optional(),
  ),
  KEY_ENCRYPTION_SECRET: optionalString.refine(
    (v) => v === undefined || v.length >= 32,
    "KEY_ENCRYPTION_SECRET must be at least 32 characters",
  ).refine(
    (v) => v === undefined || v.length < 32 || estimatedEntropyBits(v) >= 128,
    "KEY_ENCRYPTION_SECRET looks guessable (repeated or few distinct characters); " +
      "use a random value such as `openssl rand -base64 48`",
  ),
  RATE_LIMIT_RPM: intFrom("RATE_LIMIT_RPM", 60, 1, 1_000_000),
  RATE_LIMIT_RPD: intFrom("RATE_LIMIT_RPD", 1000, 1, 100_000_000),
  TOKEN_LIMIT_DAILY: intFrom("TOKEN_LIMIT_DAILY", 0),
  BUDGET_USD_MONTHLY: optionalString.transform((raw, ctx) => {
    if (raw === undefined) return 0;
    const n = Number(raw);
    if (!Number.isFinite(n) || n < 0) {
      ctx.addIssue({ code: "custom", message: "BUDGET_USD_MONTHLY must be a number ≥ 0" });
      return z.NEVER;
    }
    return n;
  }),
  ALLOWED_MODELS: csv,
  PRICING: jsonFrom(
    "PRICING",
    pricingSchema,
    (issue) =>
      `must map model names to {"input": n, "output": n} (${
        issue?.path.join(".") || "root"
      }: ${issue?.message})`,
  ),
  COST_CRON: optionalString.refine(
    (v) => v === undefined || v.split(/\s+/).length === 5,
    "COST_CRON must be a 5-field cron expression such as '0 * * * *'",
  ),
  ADMIN_USER_IDS: csv,
  CONNECT_REDIRECT_SCHEMES: csv.transform((list, ctx) => {
    if (list.length === 0) return DEFAULT_CONNECT_SCHEMES;
    const schemes = list.map((s) => s.toLowerCase().replace(/:$/, ""));
    // Scheme names only (RFC 3986 §3.1): a value such as "https" or "javascript" would turn the
    // connect flow into an open redirect, so the web's own schemes are refused outright.
    const bad = schemes.find((s) => !/^[a-z][a-z0-9+.-]{0,31}$/.test(s) || WEB_SCHEMES.has(s));
    if (bad !== undefined) {
      ctx.addIssue({
        code: "custom",
        message: "CONNECT_REDIRECT_SCHEMES must be a comma list of custom URI scheme names " +
          "(such as vscode,cursor); http, https, javascript, data, file and blob are not allowed",
      });
      return z.NEVER;
    }
    return [...new Set(schemes)];
  }),
  EVENTS_WEBHOOK_URL: optionalString.pipe(origin("EVENTS_WEBHOOK_URL", true).optional()),
  EVENTS_WEBHOOK_SECRET: optionalString.refine(
    (v) => v === undefined || /^whsec_[A-Za-z0-9+/]{16,}={0,2}$/.test(v),
    "EVENTS_WEBHOOK_SECRET must look like whsec_… (a base64 secret of at least 12 bytes)",
  ),
  REQUEST_LOG_DAYS: intFrom("REQUEST_LOG_DAYS", 14, 0, 3650),
  METRICS_TOKEN: optionalString.refine(
    (v) => v === undefined || /^[\x21-\x7E]{16,512}$/.test(v),
    "METRICS_TOKEN must be 16 to 512 printable characters without spaces",
  ),
  SUPPORT_URL: optionalString.pipe(supportUrl.optional()),
  DENO_DEPLOYMENT_ID: optionalString,
  APP_ENV: optionalString,
});

export type KeyMode = "proxy" | "shared";

export interface Config {
  port: number;
  publicUrl: string;
  kvPath: string | undefined;
  kvAccessToken: string | undefined;
  localMode: boolean;
  production: boolean;
  /** On Deno Deploy (DENO_DEPLOYMENT_ID): no process is spawned and no file written at run time. */
  onDeploy: boolean;
  clerk: {
    publishableKey?: string;
    secretKey?: string;
    jwtKey?: string;
    authorizedParties: string[];
    webhookSecrets: string[];
    apiUrl: string;
  };
  glm: {
    /** The first pool key (shared mode hands it out). */
    apiKey?: string;
    /** Every key of the pool (GLM_API_KEY, comma-separated); empty when none is set. */
    apiKeys: string[];
    /** How long a pool key GLM refused is left out. */
    keyCooldownMs: number;
    baseUrl: string;
    anthropicBaseUrl: string;
    timeoutMs: number;
    /** The longest one answer may take, end to end. */
    streamMaxMs: number;
    /** Requests in flight to GLM per model (lower-cased; `*` for the rest; 0 or absent = no cap). */
    concurrency: Record<string, number>;
    /** How long a request may wait for an upstream slot. */
    queueMs: number;
    /** The largest share of a model's slots one user may hold: ceil(share × cap), at least 1. */
    userShare: number;
    /** Requests that may wait for upstream slots at once, across all processes. */
    queueMax: number;
  };
  /** Model name patterns (`*` wildcards) → the model a request for them is served as. */
  modelAliases: Record<string, string>;
  keyMode: KeyMode;
  keyEncryptionSecret?: string;
  /** The largest /v1/* request body in bytes (MAX_REQUEST_BYTES). */
  maxRequestBytes: number;
  limits: { rpm: number; rpd: number; tokensPerDay: number; budgetUsdMonthly: number };
  /** Per-user gateway requests in flight at once, across all processes. */
  concurrencyLimit: number;
  /** Output tokens a request reserves against quotas at admission (its own cap when smaller). */
  outputReserveTokens: number;
  /** Per-user /v1/messages/count_tokens calls per minute (at most 2 in flight). */
  countTokensRpm: number;
  /** Keys one user may hold at once: the default key plus one per connected app. */
  maxKeysPerUser: number;
  /** Empty list with allowAnyModel=false never happens: defaults to the pricing table's models. */
  allowedModels: string[];
  allowAnyModel: boolean;
  pricing: Pricing;
  costCron: string;
  adminUserIds: Set<string>;
  /** Custom URI schemes accepted as connect-flow redirect targets (besides loopback http). */
  connectRedirectSchemes: string[];
  /** The operator's backend that receives Keyway's events (CONTRACT §7 Events); none = off. */
  events: { webhookUrl?: string; webhookSecret?: string };
  /** Days the per-request log keeps an entry (REQUEST_LOG_DAYS); 0 = no log. */
  requestLogDays: number;
  /** The bearer token GET /metrics asks for (METRICS_TOKEN); none = /metrics is a 404. */
  metricsToken?: string;
  /** SUPPORT_URL: where disabled and paused users are sent (an https page or a mailto:). */
  supportUrl: string | null;
}

export class ConfigError extends Error {
  constructor(readonly problems: string[]) {
    super(`Invalid configuration:\n${problems.map((p) => `  - ${p}`).join("\n")}`);
    this.name = "ConfigError";
  }
}

/** Parses the environment into a Config; throws ConfigError with one line per problem. */
export function loadConfig(env: Record<string, string | undefined>): Config {
  const parsed = envSchema.safeParse(env);
  if (!parsed.success) {
    throw new ConfigError(parsed.error.issues.map((issue) => {
      const name = String(issue.path[0] ?? "environment");
      return issue.message.includes(name) ? issue.message : `${name}: ${issue.message}`;
    }));
  }
  const e = parsed.data;
  // Any spelling of production counts ("Production", "PRODUCTION", "prod"): local mode's open
  // sign-in must never start by accident on a server.
  const appEnv = e.APP_ENV?.toLowerCase();
  const production = e.DENO_DEPLOYMENT_ID !== undefined || appEnv === "production" ||
    appEnv === "prod";
  const clerkConfigured = Boolean(
    e.CLERK_PUBLISHABLE_KEY || e.CLERK_SECRET_KEY || e.CLERK_JWT_KEY,
  );
  const localMode = !clerkConfigured && !production;
  const problems: string[] = [];
  // A publishable key alone cannot verify a session: production needs a way to verify them.
  if (production && !e.CLERK_JWT_KEY && !e.CLERK_SECRET_KEY) {
    problems.push(
      "CLERK_JWT_KEY or CLERK_SECRET_KEY is required in production (APP_ENV=production or on Deno Deploy)",
    );
  }
  if (!localMode && !e.KEY_ENCRYPTION_SECRET) {
    problems.push("KEY_ENCRYPTION_SECRET is required outside local mode (at least 32 characters)");
  }
  const kvScheme = e.DENO_KV_PATH?.match(/^([A-Za-z][A-Za-z0-9+.-]*):\/\//)?.[1];
  if (kvScheme && !/^https?$/i.test(kvScheme)) {
    problems.push(
      `DENO_KV_PATH must be a file path, :memory: or an https:// KV Connect URL (not ${kvScheme}://)`,
    );
  }
  if (e.DENO_KV_PATH && /^https?:\/\//.test(e.DENO_KV_PATH) && !e.DENO_KV_ACCESS_TOKEN) {
    problems.push("DENO_KV_ACCESS_TOKEN is required when DENO_KV_PATH is a KV Connect URL");
  }
  const keyMode = e.KEY_MODE ?? "proxy";
  if (keyMode === "shared" && !e.GLM_API_KEY.length) {
    problems.push("GLM_API_KEY is required when KEY_MODE=shared");
  }
  if (problems.length) throw new ConfigError(problems);

  const publicUrl = e.PUBLIC_URL ?? `http://localhost:${e.PORT}`;
  const baseUrl = e.GLM_BASE_URL ?? "https://open.bigmodel.cn/api/paas/v4";
  const pricing = e.PRICING ?? DEFAULT_PRICING;
  const allowAnyModel = e.ALLOWED_MODELS.includes("*");
  const allowedModels = e.ALLOWED_MODELS.length && !allowAnyModel
    ? e.ALLOWED_MODELS
    : Object.keys(pricing).filter((m) => m !== "*");
  return {
    port: e.PORT,
    publicUrl,
    kvPath: e.DENO_KV_PATH,
    kvAccessToken: e.DENO_KV_ACCESS_TOKEN,
    localMode,
    production,
    onDeploy: e.DENO_DEPLOYMENT_ID !== undefined,
    clerk: {
      publishableKey: e.CLERK_PUBLISHABLE_KEY,
      secretKey: e.CLERK_SECRET_KEY,
      jwtKey: e.CLERK_JWT_KEY,
      authorizedParties: e.CLERK_AUTHORIZED_PARTIES.length
        ? e.CLERK_AUTHORIZED_PARTIES
        : [new URL(publicUrl).origin],
      webhookSecrets: e.CLERK_WEBHOOK_SECRET,
      apiUrl: e.CLERK_API_URL ?? "https://api.clerk.com",
    },
    glm: {
      apiKey: e.GLM_API_KEY[0],
      apiKeys: e.GLM_API_KEY,
      keyCooldownMs: e.UPSTREAM_KEY_COOLDOWN_MS,
      baseUrl,
      anthropicBaseUrl: e.GLM_ANTHROPIC_BASE_URL ??
        baseUrl.replace(/\/api\/paas\/v4$/, "/api/anthropic"),
      timeoutMs: e.UPSTREAM_TIMEOUT_MS,
      streamMaxMs: e.STREAM_MAX_MS,
      concurrency: e.UPSTREAM_CONCURRENCY,
      queueMs: e.UPSTREAM_QUEUE_MS,
      userShare: e.UPSTREAM_USER_SHARE,
      queueMax: e.UPSTREAM_QUEUE_MAX,
    },
    modelAliases: e.MODEL_ALIASES ?? DEFAULT_MODEL_ALIASES,
    keyMode,
    keyEncryptionSecret: e.KEY_ENCRYPTION_SECRET,
    maxRequestBytes: e.MAX_REQUEST_BYTES,
    limits: {
      rpm: e.RATE_LIMIT_RPM,
      rpd: e.RATE_LIMIT_RPD,
      tokensPerDay: e.TOKEN_LIMIT_DAILY,
      budgetUsdMonthly: e.BUDGET_USD_MONTHLY,
    },
    concurrencyLimit: e.CONCURRENCY_LIMIT,
    outputReserveTokens: e.OUTPUT_RESERVE_TOKENS,
    countTokensRpm: e.COUNT_TOKENS_RPM,
    maxKeysPerUser: e.MAX_KEYS_PER_USER,
    allowedModels,
    allowAnyModel,
    pricing,
    costCron: e.COST_CRON ?? "0 * * * *",
    adminUserIds: new Set(e.ADMIN_USER_IDS),
    connectRedirectSchemes: e.CONNECT_REDIRECT_SCHEMES,
    events: { webhookUrl: e.EVENTS_WEBHOOK_URL, webhookSecret: e.EVENTS_WEBHOOK_SECRET },
    requestLogDays: e.REQUEST_LOG_DAYS,
    metricsToken: e.METRICS_TOKEN,
    supportUrl: e.SUPPORT_URL ?? null,
  };
}

/** Every configured secret, so the logger can redact them from any line. */
export function secretsOf(config: Config): Array<string | undefined> {
  return [
    ...config.glm.apiKeys,
    config.kvAccessToken,
    config.keyEncryptionSecret,
    config.clerk.secretKey,
    ...config.clerk.webhookSecrets,
    config.events.webhookSecret,
    config.metricsToken,
  ];
}

/** For CLI tasks: the Config, or null after printing the problems (exit code 1). */
export async function configForTask(): Promise<Config | null> {
  try {
    return loadConfig(await readEnv());
  } catch (err) {
    if (!(err instanceof ConfigError)) throw err;
    console.error(err.message);
    return null;
  }
}

/** Reads `.env` (if present) under the real environment, which wins. */
export async function readEnv(path = ".env"): Promise<Record<string, string>> {
  const env: Record<string, string> = {};
  try {
    const text = await Deno.readTextFile(path);
    for (const line of text.split(/\r?\n/)) {
      const m = line.match(/^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*?)\s*$/);
      if (!m) continue;
      let value = m[2];
      const quoted = value.match(/^(['"])([\s\S]*)\1$/);
      if (quoted) value = quoted[1] === '"' ? quoted[2].replace(/\\n/g, "\n") : quoted[2];
      else value = value.replace(/\s+#.*$/, "");
      env[m[1]] = value;
    }
  } catch (err) {
    if (!(err instanceof Deno.errors.NotFound)) throw err;
  }
  return { ...env, ...Deno.env.toObject() };
}
