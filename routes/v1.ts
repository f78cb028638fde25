/** The gateway's surface (CONTRACT §5 Gateway); the work is in lib/gateway/. */
import { type Handler, Hono } from "hono";
import { AppError } from "../lib/core/errors.ts";
import type { Services } from "../lib/core/services.ts";
import type { Protocol } from "../lib/gateway/protocol.ts";
import { PROTOCOLS } from "../lib/gateway/protocols/mod.ts";
import type { AppEnv } from "./context.ts";

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
