/** Key API (CONTRACT §5): GET|POST /api/key, POST /api/key/rotate, /api/auth/provision-user. */
import { type Context, Hono } from "hono";
import { effectiveLimits, userDisabled } from "../../lib/limits/policy.ts";
import type { Config } from "../../lib/core/config.ts";
import type { Services } from "../../lib/core/services.ts";
import type { Profile, ProvisionResult } from "../../lib/identity/users.ts";
import type { KeyBody } from "../../lib/api_types.ts";
import { DEFAULT_KEY_ID } from "../../lib/identity/user_record.ts";
import { type AppEnv, requireSession } from "../context.ts";

/** The key success body (CONTRACT §5), shared by /api/key and the connect flows. */
export function keyBody(config: Config, result: ProvisionResult): KeyBody {
  const shared = config.keyMode === "shared";
  const apiKey = shared ? config.glm.apiKey! : result.apiKey;
  return {
    apiKey,
    baseUrl: shared ? config.glm.baseUrl : `${config.publicUrl}/v1`,
    // Anthropic clients (Claude Code's ANTHROPIC_BASE_URL) append /v1/messages themselves.
    anthropicBaseUrl: shared ? config.glm.anthropicBaseUrl : config.publicUrl,
    mode: config.keyMode,
    keyPrefix: apiKey.slice(0, 7),
    keyId: result.app?.id ?? DEFAULT_KEY_ID,
    userId: result.user.id,
    createdAt: result.app?.createdAt ?? result.user.key?.createdAt ?? result.user.createdAt,
    limits: effectiveLimits(config, result.user),
  };
}

/**
 * The caller's key, provisioning them if needed: the one path behind /api/key and the connect
 * flows. A deleted user gets 403 user_deleted (from provisioning), a disabled one user_disabled.
 */
export async function issueKey(
  services: Services,
  userId: string,
  profile?: Profile,
  /** Read KV, not the cache: another process's rotation or disable of a moment ago counts. */
  options: { fresh?: boolean } = {},
): Promise<ProvisionResult> {
  const result = await services.users.provision(userId, profile, options);
  if (result.created) services.clerkSync.afterProvision(result.user);
  if (result.user.status === "disabled") throw userDisabled({});
  return result;
}

export function keyRoutes(services: Services) {
  const { config, users, clerkSync } = services;
  const body = (result: ProvisionResult) => keyBody(config, result);
  const app = new Hono<AppEnv>();
  // Per route, not app.use("*"): a sub-app's wildcard middleware would cover all of /api/*.
  const auth = requireSession(services);

  /**
   * Serialized answers per cached result. Users hands out the same (never mutated) object for a
   * user until its cache entry is dropped (rotation, status or limit change, epoch move), so the
   * text lives exactly as long as the cached user does and is never stale.
   */
  const texts = new WeakMap<ProvisionResult, string>();
  const respond = (c: Context<AppEnv>, result: ProvisionResult, status: 200 | 201) => {
    let text = texts.get(result);
    if (text === undefined) {
      text = JSON.stringify(body(result));
      if (!result.created) texts.set(result, text);
    }
    // A plain Response with every header in one record: c.header() + c.json() would take
    // hono's slower header-merging path, and each later headers.set() is validated on its own.
    c.set("framed", true);
    return new Response(text, {
      status,
      headers: {
        "content-type": "application/json",
        "cache-control": "no-store",
        "x-request-id": c.get("requestId"),
        "x-content-type-options": "nosniff",
      },
    });
  };

  const provision = (method: "GET" | "POST") => async (c: Context<AppEnv>) => {
    const session = c.get("session");
    const profile = session.email
      ? { email: session.email, firstName: null, lastName: null }
      : undefined;
    const result = await issueKey(services, session.userId, profile);
    return respond(c, result, result.created && method === "POST" ? 201 : 200);
  };

  app.get("/key", auth, provision("GET"));
  app.post("/key", auth, provision("POST"));
  app.get("/auth/provision-user", auth, provision("GET"));
  app.post("/auth/provision-user", auth, provision("POST"));
  app.post("/key/rotate", auth, async (c) => {
    const session = c.get("session");
    await issueKey(services, session.userId);
    const result = await users.rotate(session.userId);
    clerkSync.afterProvision(result.user);
    return respond(c, result, 200);
  });
  return app;
}
