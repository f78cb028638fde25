/**
 * The answers of the HTTP API as zod schemas, for the OpenAPI document (`GET /openapi.json`,
 * routes/openapi.ts). Each mirrors a shape of lib/api_types.ts — the types the routes build with
 * `satisfies` — and tests/routes/openapi_test.ts checks, at type level, that each schema's type and
 * its interface are the same, so neither can change without the other.
 */
import { z } from "zod";

export const ErrorBodySchema = z.object({
  type: z.literal("error").optional().meta({
    description: "On /v1/messages* only (Anthropic's error shape).",
  }),
  error: z.object({
    code: z.string().meta({ description: "snake_case, e.g. quota_exceeded" }),
    message: z.string().meta({ description: "For people." }),
    type: z.string().optional().meta({
      description: "On /v1/messages* only: Anthropic's error type.",
    }),
  }),
}).meta({ id: "Error" });

export const LimitsSchema = z.object({
  rpm: z.number().int(),
  rpd: z.number().int(),
  tokensPerDay: z.number().int().nullable(),
  budgetUsdMonthly: z.number().nullable(),
}).meta({ id: "Limits", description: "The limits in force (null: unlimited)." });

export const LimitOverridesSchema = z.object({
  rpm: z.number().int().optional(),
  rpd: z.number().int().optional(),
  tokensPerDay: z.number().int().optional(),
  budgetUsdMonthly: z.number().optional(),
}).meta({ id: "LimitOverrides" });

export const KeyBodySchema = z.object({
  apiKey: z.string().meta({ description: "kw_… (the master key in shared mode)" }),
  baseUrl: z.string(),
  anthropicBaseUrl: z.string(),
  mode: z.enum(["proxy", "shared"]),
  keyPrefix: z.string(),
  keyId: z.string().meta({ description: '"default", or a connected app\'s k_… id' }),
  userId: z.string(),
  createdAt: z.string(),
  limits: LimitsSchema,
}).meta({ id: "Key" });

export const KeyUsageSchema = z.object({
  requests: z.number().int(),
  totalTokens: z.number().int(),
  costUsd: z.number(),
}).meta({ id: "KeyUsage" });

export const KeyUsageRowSchema = KeyUsageSchema.extend({
  keyId: z.string(),
  name: z.string(),
}).meta({ id: "KeyUsageRow" });

export const KeyListingSchema = z.object({
  id: z.string(),
  name: z.string(),
  client: z.string().nullable(),
  keyPrefix: z.string(),
  default: z.boolean(),
  createdAt: z.string(),
  lastUsedAt: z.string().nullable(),
  usage30d: KeyUsageSchema,
}).meta({ id: "KeyListing" });

export const KeysBodySchema = z.object({ keys: z.array(KeyListingSchema) }).meta({ id: "Keys" });

export const UsageTotalsSchema = z.object({
  requests: z.number().int(),
  promptTokens: z.number().int(),
  completionTokens: z.number().int(),
  totalTokens: z.number().int(),
  costUsd: z.number(),
}).meta({ id: "UsageTotals" });

const PauseReasonSchema = z.enum(["requests_per_day", "tokens_per_day", "budget_monthly"]);

export const AccountStateSchema = z.union([
  z.object({ status: z.enum(["active", "disabled", "deleted"]) }),
  z.object({
    status: z.literal("paused"),
    reason: PauseReasonSchema,
    reasons: z.array(PauseReasonSchema),
    until: z.string(),
  }),
]).meta({ id: "AccountState" });

export const ServiceStateSchema = z.union([
  z.object({ status: z.literal("ok") }),
  z.object({
    status: z.literal("unavailable"),
    reason: z.enum(["not_configured", "no_key_in_service"]),
    since: z.string().nullable(),
  }),
]).meta({ id: "ServiceState" });

export const UsageBodySchema = z.object({
  userId: z.string(),
  limits: LimitsSchema,
  remaining: z.object({
    minute: z.number().int(),
    day: z.number().int(),
    tokensToday: z.number().int().nullable(),
    budgetUsd: z.number().nullable(),
  }),
  today: UsageTotalsSchema,
  days: z.array(UsageTotalsSchema.extend({ date: z.string() })),
  byModel: z.array(UsageTotalsSchema.extend({ model: z.string() })),
  byKey: z.array(KeyUsageRowSchema),
  thisMonth: z.object({ costUsd: z.number() }),
  state: AccountStateSchema,
  service: ServiceStateSchema.optional(),
}).meta({ id: "Usage" });

export const DeviceStartSchema = z.object({
  deviceCode: z.string(),
  userCode: z.string(),
  verificationUri: z.string(),
  verificationUriComplete: z.string(),
  expiresIn: z.number().int(),
  interval: z.number().int(),
}).meta({ id: "DeviceStart" });

export const AdminUserSchema = z.object({
  userId: z.string(),
  email: z.string().nullable(),
  status: z.enum(["active", "paused", "disabled", "deleted"]),
  pausedBy: z.enum(["requests", "tokens", "budget"]).nullable(),
  pausedUntil: z.string().nullable(),
  createdAt: z.string(),
  lastActiveAt: z.string().nullable().meta({ description: "The latest UTC day with usage." }),
  keyPrefix: z.string().nullable(),
  keys: z.number().int(),
  limits: LimitOverridesSchema,
  effectiveLimits: LimitsSchema,
  usage30d: z.object({
    requests: z.number().int(),
    totalTokens: z.number().int(),
    costUsd: z.number(),
  }),
}).meta({ id: "AdminUser" });

export const AdminUsersSchema = z.object({
  users: z.array(AdminUserSchema),
  next: z.string().nullable(),
  total: z.number().int(),
}).meta({ id: "AdminUsers" });

export const AdminUserChangedSchema = z.object({ user: AdminUserSchema }).meta({
  id: "AdminUserChanged",
});

export const OkSchema = z.object({
  ok: z.literal(true),
  duplicate: z.literal(true).optional(),
  ignored: z.literal(true).optional(),
}).meta({ id: "Ok" });

export const ModelSchema = z.looseObject({ id: z.string(), object: z.literal("model") }).meta({
  id: "Model",
});

export const ModelListSchema = z.looseObject({
  object: z.literal("list"),
  data: z.array(ModelSchema),
}).meta({ id: "ModelList" });

/** An upstream answer relayed as it arrives: GLM's OpenAI- or Anthropic-format JSON. */
export const UpstreamAnswerSchema = z.looseObject({}).meta({
  id: "UpstreamAnswer",
  description: "The upstream's answer, relayed untouched (OpenAI or Anthropic format).",
});

export const RequestEntrySchema = z.object({
  id: z.string().meta({ description: "The request's x-request-id" }),
  at: z.string(),
  userId: z.string(),
  keyId: z.string(),
  endpoint: z.string(),
  model: z.string().nullable(),
  requestedModel: z.string().nullable(),
  stream: z.boolean(),
  status: z.number().int(),
  code: z.string().nullable(),
  promptTokens: z.number().int(),
  completionTokens: z.number().int(),
  cachedTokens: z.number().int(),
  costUsd: z.number(),
  estimated: z.boolean().meta({ description: "No upstream usage arrived: the estimate" }),
  durationMs: z.number(),
  ttfbMs: z.number().nullable(),
  queueMs: z.number(),
  client: z.string().meta({ description: "The User-Agent, cut to 80 printable characters" }),
  count: z.number().int().meta({ description: "Refusals of this user, code and minute" }),
}).meta({ id: "RequestEntry" });

export const RequestsBodySchema = z.object({
  requests: z.array(RequestEntrySchema),
  next: z.string().nullable(),
}).meta({ id: "Requests" });
