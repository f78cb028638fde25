/** Placeholder: the gateway issue fills this in. */
import { Hono } from "hono";
import type { Services } from "../lib/services.ts";
import type { AppEnv } from "./context.ts";

export function v1Routes(_services: Services) {
  return new Hono<AppEnv>();
}
