/**
 * `GET /openapi.json`: an OpenAPI 3.1 document of the HTTP API, generated (with `zod-openapi`)
 * from the same zod schemas the routes validate with and answer in (lib/api_schemas.ts).
 *
 * Each route module describes its routes next to them with `describeRoute({...})`: method, path
 * (Hono's, `:id`), who may call it, its params, query and body schemas, its answer and its error
 * statuses. tests/routes/openapi_test.ts compares the document with the router's own route table,
 * so a route added without its description (or a description left behind) fails the suite.
 */
import { Hono } from "hono";
import { z } from "zod";
import {
  createDocument,
  type ZodOpenApiOperationObject,
  type ZodOpenApiResponseObject,
} from "zod-openapi";
import type { Services } from "../lib/core/services.ts";
import { ErrorBodySchema } from "../lib/api_schemas.ts";
import type { AppEnv } from "./context.ts";

export type Method = "get" | "post" | "put" | "delete";

/** Who may call a route (CONTRACT §3): each maps to security requirements below. */
export type Caller =
  | "anyone"
  | "session"
  | "sessionOrKey"
  | "apiKey"
  | "anthropicKey"
  | "operator"
  | "svix";

export interface RouteDoc {
  method: Method;
  /** Hono's path, `:id` params included (`/api/admin/users/:id/disable`). */
  path: string;
  summary: string;
  description?: string;
  caller: Caller;
  params?: z.ZodObject;
  query?: z.ZodObject;
  body?: z.ZodType;
  /** The success answer: its status (200 by default), JSON schema, and whether it may stream SSE. */
  ok: { status?: number; description: string; schema?: z.ZodType; sse?: boolean; empty?: boolean };
  /** Other success statuses with the same body (201 for a key this call created). */
  alsoOk?: { status: number; description: string }[];
  /** The error statuses it may answer, each with the contract's JSON error body. */
  errors: number[];
}

const routes = new Map<string, RouteDoc>();

/** Describes one route for the OpenAPI document: call it next to the route's definition. */
export function describeRoute(doc: RouteDoc): void {
  routes.set(`${doc.method.toUpperCase()} ${doc.path}`, doc);
}

/** Every described route, as `METHOD /path` in Hono's notation. */
export function describedRoutes(): string[] {
  return [...routes.keys()];
}

const ERROR_TEXT: Record<number, string> = {
  400: "invalid_request (naming the field), model_not_allowed, connect-flow codes",
  401: "unauthorized (session) or invalid_api_key",
  403: "forbidden, user_disabled, user_deleted, quota_exceeded (nothing but the reset helps)",
  404: "not_found",
  413: "payload_too_large",
  429: "rate_limit_exceeded, quota_exceeded, concurrency_limit_exceeded (with Retry-After)",
  500: "internal_error (with the request id)",
  502: "upstream_unavailable",
  503: "not_configured, upstream_busy (with Retry-After), upstream_unavailable",
  504: "upstream_timeout",
};

const SECURITY: Record<Caller, Record<string, string[]>[] | undefined> = {
  anyone: [],
  session: [{ session: [] }, { sessionCookie: [] }],
  sessionOrKey: [{ session: [] }, { sessionCookie: [] }, { apiKey: [] }],
  apiKey: [{ apiKey: [] }],
  anthropicKey: [{ apiKey: [] }, { anthropicApiKey: [] }],
  operator: [{ session: [] }, { sessionCookie: [] }],
  svix: [],
};

/** `/v1/models/:id{.+}` → `/v1/models/{id}`. */
export function openApiPath(honoPath: string): string {
  return honoPath.replace(/:([A-Za-z_][A-Za-z0-9_]*)(\{[^}]*\})?/g, "{$1}");
}

function operation(doc: RouteDoc): ZodOpenApiOperationObject {
  const json = (schema: z.ZodType) => ({ "application/json": { schema } });
  const okContent = doc.ok.empty ? undefined : {
    ...(doc.ok.schema ? json(doc.ok.schema) : {}),
    ...(doc.ok.sse ? { "text/event-stream": { schema: z.string() } } : {}),
  };
  const responses: Record<string, ZodOpenApiResponseObject> = {
    [String(doc.ok.status ?? 200)]: { description: doc.ok.description, content: okContent },
  };
  for (const also of doc.alsoOk ?? []) {
    responses[String(also.status)] = { description: also.description, content: okContent };
  }
  for (const status of doc.errors) {
    responses[String(status)] = {
      description: ERROR_TEXT[status] ?? "error",
      content: json(ErrorBodySchema),
    };
  }
  const tag = doc.path.startsWith("/v1/")
    ? "Gateway"
    : doc.caller === "operator"
    ? "Operator"
    : "API";
  return {
    summary: doc.summary,
    ...(doc.description ? { description: doc.description } : {}),
    tags: [tag],
    security: SECURITY[doc.caller],
    ...(doc.params || doc.query
      ? {
        requestParams: {
          ...(doc.params && { path: doc.params }),
          ...(doc.query && { query: doc.query }),
        },
      }
      : {}),
    ...(doc.body ? { requestBody: { required: true, content: json(doc.body) } } : {}),
    // Keys are status codes, which the library types as `${1|2|3|4|5}${string}`.
    responses: responses as ZodOpenApiOperationObject["responses"],
  };
}

/** The OpenAPI 3.1 document of every described route. */
export function openApiDocument(publicUrl: string) {
  const paths: Record<string, Record<string, ZodOpenApiOperationObject>> = {};
  for (const doc of routes.values()) {
    (paths[openApiPath(doc.path)] ??= {})[doc.method] = operation(doc);
  }
  return createDocument({
    openapi: "3.1.0",
    info: {
      title: "Keyway",
      version: "1",
      description:
        "Per-user keys, limits and metering in front of the operator's GLM account. Errors are " +
        '`{"error": {"code", "message"}}`; the gateway (`/v1/*`) relays the upstream\'s answers ' +
        "as they arrive (JSON, or SSE when the body asks for `stream: true`).",
    },
    servers: [{ url: publicUrl }],
    tags: [
      { name: "API", description: "Keys, usage and connecting editors (a user's session)" },
      { name: "Operator", description: "ADMIN_USER_IDS whose own account is active" },
      { name: "Gateway", description: "OpenAI- and Anthropic-compatible, with a kw_ key" },
    ],
    components: {
      securitySchemes: {
        session: {
          type: "http",
          scheme: "bearer",
          bearerFormat: "JWT",
          description: "A Clerk session token (or a local-mode session).",
        },
        sessionCookie: { type: "apiKey", in: "cookie", name: "__session" },
        apiKey: { type: "http", scheme: "bearer", description: "The user's kw_… key." },
        anthropicApiKey: { type: "apiKey", in: "header", name: "x-api-key" },
      },
    },
    paths,
  });
}

describeRoute({
  method: "get",
  path: "/openapi.json",
  summary: "This document",
  caller: "anyone",
  ok: { description: "The OpenAPI 3.1 document.", schema: z.looseObject({ openapi: z.string() }) },
  errors: [],
});

export function openApiRoutes(services: Services) {
  const app = new Hono<AppEnv>();
  let body: string | undefined;
  app.get("/openapi.json", (c) => {
    // Built once, on the first request: every route module has described its routes by then.
    body ??= JSON.stringify(openApiDocument(services.config.publicUrl));
    c.header("cache-control", "public, max-age=300");
    c.header("content-type", "application/json; charset=UTF-8");
    return c.body(body);
  });
  return app;
}
