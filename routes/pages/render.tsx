/** What every page shares: the HTML renderer, the visitor's layout props, Clerk's script and the CSP. */
import type { Context } from "hono";
import type { VNode } from "preact";
import { renderToString } from "preact-render-to-string";
import type { Config } from "../../lib/core/config.ts";
import { IslandCollector } from "../../build/islands.ts";
import type { Services } from "../../lib/core/services.ts";
import type { LayoutProps } from "../../components/Layout.tsx";
import { type AppEnv, readSession } from "../context.ts";

/** The Clerk Frontend API host encoded in a publishable key (`pk_test_` + base64 `host$`). */
export function clerkFrontendApi(publishableKey: string | undefined): string | null {
  const m = publishableKey?.match(/^pk_(?:test|live)_([A-Za-z0-9+/=_-]+)$/);
  if (!m) return null;
  try {
    const decoded = atob(m[1].replace(/-/g, "+").replace(/_/g, "/"));
    const host = decoded.replace(/\$$/, "");
    return /^[a-z0-9.-]+(:\d+)?$/i.test(host) && decoded.endsWith("$") ? host : null;
  } catch {
    return null;
  }
}

/** ClerkJS from the instance's Frontend API, as Clerk documents for apps without React. */
export function clerkScript(config: Config): { publishableKey: string; scriptUrl: string } | null {
  const host = clerkFrontendApi(config.clerk.publishableKey);
  if (config.localMode || !host) return null;
  return {
    publishableKey: config.clerk.publishableKey!,
    scriptUrl: `https://${host}/npm/@clerk/clerk-js@5/dist/clerk.browser.js`,
  };
}

/**
 * Content-Security-Policy for hono's secureHeaders: only our own scripts, plus (Clerk mode) what
 * Clerk documents for its components — the Frontend API host, its image CDN, Cloudflare's bot
 * check, its abuse-protection hosts (on any port) and dev-instance telemetry.
 * Inline styles are allowed: islands set widths through style attributes and Clerk injects CSS.
 */
export function contentSecurityPolicy(config: Config) {
  const host = config.localMode ? null : clerkFrontendApi(config.clerk.publishableKey);
  const clerk = host ? [`https://${host}`] : [];
  const turnstile = host ? ["https://challenges.cloudflare.com"] : [];
  const protect = host ? ["https://*.protect.clerk.com:*"] : [];
  const telemetry = host ? ["https://clerk-telemetry.com"] : [];
  return {
    defaultSrc: ["'self'"],
    baseUri: ["'self'"],
    objectSrc: ["'none'"],
    frameAncestors: ["'none'"],
    formAction: ["'self'"],
    scriptSrc: ["'self'", ...clerk, ...turnstile, ...protect],
    connectSrc: ["'self'", ...clerk, ...protect, ...telemetry],
    imgSrc: ["'self'", "data:", ...(host ? ["https://img.clerk.com"] : [])],
    styleSrc: ["'self'", "'unsafe-inline'"],
    frameSrc: ["'self'", ...turnstile, ...protect],
    workerSrc: ["'self'", "blob:"],
  };
}

export function render(c: Context<AppEnv>, page: VNode, status: 200 | 400 | 403 | 404 = 200) {
  const html = renderToString(
    <IslandCollector.Provider value={new Set()}>{page}</IslandCollector.Provider>,
  );
  c.header("cache-control", "no-store");
  return c.html("<!doctype html>" + html, status);
}

/** The layout props for the current visitor (and the session, when there is one). */
export function pageShell(services: Services) {
  const { config, users } = services;
  return async (c: Context<AppEnv>, path: string) => {
    const found = await readSession(c, services);
    let label: string | null = null;
    if (found) {
      label = found.session.email ??
        (await users.get(found.session.userId).catch(() => null))?.email ??
        found.session.userId;
    }
    const layout: Omit<LayoutProps, "children" | "title"> = {
      localMode: config.localMode,
      signedInAs: label,
      isAdmin: found ? config.adminUserIds.has(found.session.userId) : false,
      path,
      supportUrl: config.supportUrl,
    };
    return { session: found?.session ?? null, layout };
  };
}

/** Which client the islands use to authenticate their API calls. */
export const authModeOf = (config: Config) =>
  config.localMode ? "local" as const : "clerk" as const;
