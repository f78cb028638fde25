/** The gateway's surface (CONTRACT §5 Gateway); the work is in lib/gateway/. */
import { type Handler, Hono } from "hono";
import { AppError } from "../lib/core/errors.ts";
import type { Services } from "../lib/core/services.ts";
import type { Protocol } from "../lib/gateway/protocol.ts";
import { PROTOCOLS } from "../lib/gateway/protocols/mod.ts";
import type { AppEnv } from "./context.ts";
import { describeRoute } from "./openapi.ts";
import { ModelListSchema, ModelSchema, UpstreamAnswerSchema } from "../lib/api_schemas.ts";
import { z } from "zod";

for (const protocol of PROTOCOLS) {
  describeRoute({
    method: "post",
    path: protocol.route,
    summary: protocol.metered
      ? `${protocol.route.slice(4)}: forwarded to GLM, limited and metered`
      : `${protocol.route.slice(4)}: forwarded to GLM (its own per-minute limit, not metered)`,
    description: "Fields the gateway does not check pass through untouched; the answer is " +
      "relayed as it arrives. Proxy mode only (404 in shared mode).",
    caller: protocol.route.startsWith("/v1/messages") ? "anthropicKey" : "apiKey",
    body: protocol.body,
    ok: {
      description: "The upstream's answer: JSON, or an SSE stream when the body asks for one.",
      schema: UpstreamAnswerSchema,
      sse: protocol.metered && protocol.route !== "/v1/embeddings",
    },
    errors: [400, 401, 403, 404, 413, 429, 502, 503, 504],
  });
}
describeRoute({
  method: "get",
  path: "/v1/models",
  summary: "The models this gateway serves",
  caller: "anthropicKey",
  ok: { description: "The allowed models.", schema: ModelListSchema },
  errors: [401, 403, 404],
});
describeRoute({
  method: "get",
  path: "/v1/models/:id{.+}",
  summary: "One model (an alias resolves to its target)",
  caller: "anthropicKey",
  params: z.object({ id: z.string().min(1) }),
  ok: { description: "The model.", schema: ModelSchema },
  errors: [401, 403, 404],
});

export function v1Routes(services: Services) {
  const app = new Hono<AppEnv>();
  const { gateway, config } = services;
  if (config.keyMode === "shared") {
    // Shared mode hands out the master key itself: there is no gateway to talk to.
    const none = () => {
      throw new AppError("not_found", "The gateway is off: this server runs in shared key mode.");
    };
    for (const protocol of PROTOCOLS) app.all(protocol.route.slice(3), none);
    app.all("/models", none);
    app.all("/models/*", none);
    return app;
  }
  app.get("/models", (c) => gateway.listModels(c.req.raw));
  app.get("/models/:id{.+}", (c) => gateway.listModels(c.req.raw, c.req.param("id")));
  return app;
}

/**
 * The gateway's POST endpoints, the hot path. routes/mod.ts mounts them ahead of the app-wide
 * middleware (≈ a sixth of the gateway's CPU per request): each takes its own request id, the
 * gateway limits the body (MAX_REQUEST_BYTES) and logs its own line, its answers carry x-request-id and
 * nosniff, and errors go to app.onError like everyone else's.
 */
export function gatewayHandler(
  services: Services,
  protocol: Protocol,
  nextId: (incoming: string | undefined) => string,
): Handler<AppEnv> {
  return async (c) => {
    const id = nextId(c.req.header("x-request-id"));
    c.set("requestId", id);
    return await services.gateway.handle(protocol, c.req.raw, id);
  };
}
