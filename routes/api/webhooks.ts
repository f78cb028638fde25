/** Placeholder: filled in by its issue. */
import { Hono } from "hono";
import type { Services } from "../../lib/services.ts";
import type { AppEnv } from "../context.ts";

export function webhookRoutes(_services: Services) {
  return new Hono<AppEnv>();
}
