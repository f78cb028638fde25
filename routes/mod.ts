/** The Hono app: middleware, error mapping in one place, and every route module mounted. */
import { Hono } from "hono";
import { bodyLimit } from "hono/body-limit";
import { HTTPException } from "hono/http-exception";
import { secureHeaders } from "hono/secure-headers";
import { serveStatic } from "hono/deno";
import { PROJECT_ROOT } from "../build/islands.ts";
import { AppError, errorBody, isAnthropicPath, isApiPath } from "../lib/core/errors.ts";
import type { Services } from "../lib/core/services.ts";
import { adminRoutes } from "./api/admin.ts";
import { connectApiRoutes } from "./api/connect.ts";
import { keyRoutes } from "./api/key.ts";
import { keysRoutes } from "./api/keys.ts";
import { usageRoutes } from "./api/usage.ts";
import { webhookRoutes } from "./api/webhooks.ts";
import { requestRoutes } from "./api/requests.ts";
import { metricsRoutes } from "./metrics.ts";
import { authRoutes } from "./auth.ts";
import type { AppEnv } from "./context.ts";
import { localHostGuard } from "./local_guard.ts";
import { contentSecurityPolicy, pageRoutes } from "./pages/mod.ts";
import { notFoundPage } from "./pages/not_found.tsx";
import { connectPageRoutes } from "./pages/connect.tsx";
import { gatewayHandler, v1Routes } from "./v1.ts";
import { PROTOCOLS } from "../lib/gateway/protocols/mod.ts";
import { inMiB } from "../lib/gateway/request_body.ts";
import { describeRoute, openApiRoutes } from "./openapi.ts";
import { z } from "zod";

describeRoute({
  method: "get",
  path: "/health",
  summary: "200 once KV answers",
  caller: "anyone",
  ok: { description: "Up.", schema: z.object({ ok: z.literal(true) }) },
  errors: [500],
});
describeRoute({
  method: "get",
  path: "/api/hello",
  summary: "Claude Code's probe: an empty 200",
  caller: "anyone",
  ok: { description: "Empty.", empty: true },
  errors: [],
});

const KIB = 1024;

const tooLarge = (limit: string) => () => {
  throw new AppError("payload_too_large", `Request body is larger than ${limit}.`);
};

/**
 * Request ids: a per-process random prefix and a counter (unique without the cost of a UUID per
 * request). An incoming `x-request-id` is never used: a client must not choose what the logs say.
 */
function requestIds() {
  const prefix = crypto.randomUUID().slice(0, 8);
  let seq = 0;
  return (_incoming: string | undefined) => `${prefix}-${(seq++).toString(36)}`;
}

export function createApp(services: Services) {
  const { log, kv } = services;
  const app = new Hono<AppEnv>();

  const nextId = requestIds();
  // Ahead of everything, the gateway included: local mode answers loopback host names only.
  if (services.config.localMode) app.use("*", localHostGuard(nextId));
  if (services.config.keyMode === "proxy") {
    // Ahead of every middleware: the gateway frames, limits and logs its own requests.
    for (const protocol of PROTOCOLS) {
      app.post(protocol.route, gatewayHandler(services, protocol, nextId));
    }
  }
  // One middleware frames every other request: an id, an access line, and the API's headers.
  // Header writes are costly per request, so JSON answers get only what protects JSON (nosniff)
  // and pages get hono's full secureHeaders set below.
  app.use("*", async (c, next) => {
    const started = performance.now();
    const id = nextId(c.req.header("x-request-id"));
    c.set("requestId", id);
    await next();
    if (!c.get("framed")) {
      const headers = c.res.headers;
      headers.set("x-request-id", id);
      if (isApiPath(c.req.path)) headers.set("x-content-type-options", "nosniff");
    }
    // The gateway logs its own line with usage; everything else gets an access line.
    if (c.res.status >= 500 || !c.req.path.startsWith("/v1/")) {
      log.info("request", {
        id,
        method: c.req.method,
        path: c.req.path,
        status: c.res.status,
        ms: Math.round((performance.now() - started) * 10) / 10,
      });
    }
  });
  const pageSecurity = secureHeaders({
    crossOriginEmbedderPolicy: false,
    contentSecurityPolicy: contentSecurityPolicy(services.config),
    // With no-referrer (hono's default) Chrome sends `Origin: null` on same-origin form POSTs,
    // which the CSRF check must refuse; this policy keeps the origin and never leaks paths.
    referrerPolicy: "strict-origin-when-cross-origin",
  });
  app.use("*", async (c, next) => {
    if (isApiPath(c.req.path)) return await next();
    await pageSecurity(c, next);
    // The connect page's form ends in a redirect to the client, which browsers check against
    // form-action: that one target (validated, a scheme or a loopback origin) is added.
    const target = c.get("formAction");
    const csp = c.res.headers.get("content-security-policy");
    if (target && csp) {
      c.res.headers.set(
        "content-security-policy",
        csp.replace("form-action 'self'", `form-action 'self' ${target}`),
      );
    }
  });
  // Versioned URLs (?v=<source hash>) never change content, so they may be cached for a year.
  app.use(
    "/static/*",
    serveStatic({
      root: PROJECT_ROOT,
      onFound: (_path, c) => {
        c.header(
          "cache-control",
          c.req.query("v")
            ? "public, max-age=31536000, immutable"
            : "public, max-age=0, must-revalidate",
        );
      },
    }),
  );
  app.use(
    "/api/webhooks/*",
    bodyLimit({ maxSize: 256 * KIB, onError: tooLarge("256 KiB") }),
  );
  // The gateway's POST endpoints (mounted above) limit their own bodies the same way.
  const v1Max = services.config.maxRequestBytes;
  app.use("/v1/*", bodyLimit({ maxSize: v1Max, onError: tooLarge(inMiB(v1Max)) }));
  const apiLimit = bodyLimit({ maxSize: 64 * KIB, onError: tooLarge("64 KiB") });
  app.use("/api/*", async (c, next) => {
    if (c.req.path.startsWith("/api/webhooks/")) return await next();
    return await apiLimit(c, next);
  });
  app.use("/auth/*", bodyLimit({ maxSize: 16 * KIB, onError: tooLarge("16 KiB") }));
  // The connect pages' approve and cancel forms (read before any session check).
  const formLimit = bodyLimit({ maxSize: 16 * KIB, onError: tooLarge("16 KiB") });
  app.use("/connect", formLimit);
  app.use("/connect/*", formLimit);

  app.get("/health", async (c) => {
    await kv.get(["health"]);
    return c.json({ ok: true });
  });

  // Claude Code probes this before every run; an empty 200 keeps it quiet (HEAD answers too).
  app.get("/api/hello", (c) => c.body(null, 200));
  app.route("/", openApiRoutes(services));

  app.route("/api", keyRoutes(services));
  app.route("/api", keysRoutes(services));
  app.route("/api", webhookRoutes(services));
  app.route("/api", usageRoutes(services));
  app.route("/api", adminRoutes(services));
  app.route("/api", connectApiRoutes(services));
  app.route("/api", requestRoutes(services));
  app.route("/", metricsRoutes(services));
  app.route("/v1", v1Routes(services));
  app.route("/", authRoutes(services));
  app.route("/", connectPageRoutes(services));
  app.route("/", pageRoutes(services));

  const notFound = notFoundPage(services);
  app.notFound((c) => {
    if (isApiPath(c.req.path)) {
      const anthropic = isAnthropicPath(c.req.path) ? 404 : undefined;
      return c.json(
        errorBody("not_found", `No such endpoint: ${c.req.method} ${c.req.path}`, anthropic),
        404,
      );
    }
    return notFound(c);
  });

  app.onError((err, c) => {
    // Routes mounted ahead of the framing middleware get their id and nosniff here.
    const id = c.get("requestId");
    if (id) c.header("x-request-id", id);
    // The Anthropic SDK reads its request id from `request-id` (error.requestID, _request_id).
    if (id && isAnthropicPath(c.req.path)) c.header("request-id", id);
    if (isApiPath(c.req.path)) c.header("x-content-type-options", "nosniff");
    c.set("framed", true);
    const anthropic = (status: number) => isAnthropicPath(c.req.path) ? status : undefined;
    if (err instanceof AppError) {
      for (const [name, value] of Object.entries(err.headers)) c.header(name, value);
      return c.json(
        errorBody(err.code, err.message, anthropic(err.status)),
        err.status as 400,
      );
    }
    if (err instanceof HTTPException && err.status < 500) {
      const code = err.status === 413
        ? "payload_too_large"
        : err.status === 404
        ? "not_found"
        : "invalid_request";
      return c.json(
        errorBody(code, err.message || "Bad request.", anthropic(err.status)),
        err.status,
      );
    }
    log.error("unhandled error", {
      id,
      method: c.req.method,
      path: c.req.path,
      error: err instanceof Error ? (err.stack ?? err.message) : String(err),
    });
    return c.json(
      errorBody("internal_error", `internal error (request id ${id})`, anthropic(500)),
      500,
    );
  });

  return app;
}

export type App = ReturnType<typeof createApp>;
