/** Pages (CONTRACT §6). Placeholder until the UI work lands. */
import { Hono } from "hono";
import type { Services } from "../lib/services.ts";
import type { AppEnv } from "./context.ts";

export function pageRoutes(_services: Services) {
  const app = new Hono<AppEnv>();
  app.get("/", (c) => c.html("<!doctype html><title>Keyway</title><h1>Keyway</h1>"));
  return app;
}
