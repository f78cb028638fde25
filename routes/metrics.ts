/**
 * `GET /metrics` (CONTRACT §10): Prometheus' text format for callers that present METRICS_TOKEN as
 * a Bearer token. Without METRICS_TOKEN, or with a wrong token, it is the site's 404: the endpoint
 * does not show that it exists.
 */
import { timingSafeEqual } from "node:crypto";
import { Hono } from "hono";
import { sha256 } from "../lib/core/hash.ts";
import type { Services } from "../lib/core/services.ts";
import type { AppEnv } from "./context.ts";

export function metricsRoutes(services: Services) {
  const app = new Hono<AppEnv>();
  const token = services.config.metricsToken;
  if (!token) return app;
  // Digests of equal length, compared in constant time: the token is not guessed byte by byte.
  const expected = sha256(`Bearer ${token}`);
  app.get("/metrics", async (c) => {
    const given = await sha256(c.req.header("authorization") ?? "");
    if (!timingSafeEqual(given, await expected)) return c.notFound();
    const { contentType, body } = await services.metrics.text();
    c.header("content-type", contentType);
    c.header("cache-control", "no-store");
    return c.body(body);
  });
  return app;
}
