/** The OpenAI-compatible gateway surface (CONTRACT §5 Gateway); the work is in lib/gateway.ts. */
import { Hono } from "hono";
import { AppError } from "../lib/errors.ts";
import type { Services } from "../lib/services.ts";
import type { AppEnv } from "./context.ts";

export function v1Routes(services: Services) {
  const app = new Hono<AppEnv>();
  const { gateway, config } = services;
  if (config.keyMode === "shared") {
    // Shared mode hands out the master key itself: there is no gateway to talk to.
    const none = () => {
      throw new AppError("not_found", "The gateway is off: this server runs in shared key mode.");
    };
    app.all("/chat/completions", none);
    app.all("/models", none);
    return app;
  }
  app.post("/chat/completions", async (c) => {
    const res = await gateway.chatCompletions(c.req.raw, c.get("requestId"));
    c.set("framed", true); // the answer carries x-request-id and nosniff already
    return res;
  });
  app.get("/models", (c) => gateway.models(c.req.raw));
  return app;
}
