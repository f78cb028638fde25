/**
 * Browser-test plumbing: Debian's Chromium driven by playwright-core (never a downloaded
 * browser), a real Keyway server on a loopback port, and pages that fail on console errors.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import axe from "axe-core";
import { type Browser, type BrowserContext, chromium, type Page } from "playwright-core";
import { loadConfig } from "../../lib/core/config.ts";
import { buildIslands } from "../../build/islands.ts";
import { createServices, type Services } from "../../lib/core/services.ts";
import type { ConnectOptions } from "../../lib/identity/connect.ts";
import { createApp } from "../../routes/mod.ts";
import { captureLogger, ENCRYPTION_SECRET, MASTER_KEY, PUBLIC_URL } from "./helpers.ts";

export const CHROMIUM = Deno.env.get("CHROMIUM_PATH") ?? "/usr/bin/chromium";
export const CHROMIUM_ARGS = [
  "--no-sandbox",
  "--disable-gpu",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
  "--no-first-run",
];

export async function launchBrowser(): Promise<Browser> {
  return await chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS, headless: true });
}

export interface TestServer {
  url: string;
  services: Services;
  logs: string[];
  close(): Promise<void>;
}

/** Builds the islands (when stale) and serves a fresh app on 127.0.0.1:0 with its own KV. */
export async function startServer(
  env: Record<string, string> = {},
  /** Service options, e.g. shorter connect-flow lifetimes. */
  options: { connect?: ConnectOptions } = {},
): Promise<TestServer> {
  await buildIslands();
  const config = loadConfig({
    DENO_KV_PATH: ":memory:",
    PUBLIC_URL,
    GLM_API_KEY: MASTER_KEY,
    ...env,
  });
  const kv = await Deno.openKv(":memory:");
  const { log, lines } = captureLogger([MASTER_KEY, ENCRYPTION_SECRET]);
  const services = await createServices(config, kv, { log, ...options });
  const app = createApp(services);
  const server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen: () => {} }, app.fetch);
  return {
    url: `http://127.0.0.1:${server.addr.port}`,
    services,
    logs: lines,
    close: async () => {
      await server.shutdown();
      kv.close();
    },
  };
}

/** Console errors and uncaught page errors seen by a context's pages. */
export interface Watched {
  context: BrowserContext;
  errors: string[];
  newPage(): Promise<Page>;
}

export async function watchedContext(
  browser: Browser,
  options: Parameters<Browser["newContext"]>[0] = {},
): Promise<Watched> {
  const context = await browser.newContext(options);
  const errors: string[] = [];
  return {
    context,
    errors,
    newPage: async () => {
      const page = await context.newPage();
      page.on("console", (msg) => {
        if (msg.type() === "error") errors.push(`console: ${msg.text()} (${page.url()})`);
      });
      page.on("pageerror", (err) => errors.push(`pageerror: ${err.message} (${page.url()})`));
      return page;
    },
  };
}

/**
 * Runs axe-core in the page and fails on serious or critical violations (CONTRACT §6), naming
 * each rule and the elements it found.
 */
export async function assertAccessible(page: Page, label: string): Promise<void> {
  if (!(await page.evaluate(() => "axe" in globalThis))) {
    // Evaluated through the DevTools protocol: the page's CSP (no inline scripts) stays as served.
    await page.evaluate(`${axe.source};\nundefined`);
  }
  const violations = await page.evaluate(async () => {
    // deno-lint-ignore no-explicit-any
    const result = await (globalThis as any).axe.run(document, {
      resultTypes: ["violations"],
    });
    return (result.violations as {
      id: string;
      impact: string | null;
      help: string;
      nodes: { target: string[] }[];
    }[]).map((v) => ({
      id: v.id,
      impact: v.impact,
      help: v.help,
      targets: v.nodes.slice(0, 5).map((n) => n.target.join(" ")),
    }));
  });
  const bad = violations.filter((v) => v.impact === "serious" || v.impact === "critical");
  if (bad.length) {
    throw new Error(
      `axe: ${bad.length} serious/critical violation(s) on ${label} (${page.url()}):\n` +
        bad.map((v) => `  - ${v.id} (${v.impact}): ${v.help}\n      ${v.targets.join("\n      ")}`)
          .join("\n"),
    );
  }
}

/** A folder for screenshots, removed at the end unless KEYWAY_KEEP_SHOTS=1. */
export async function shotsFolder(): Promise<
  { dir: string; done(shots: string[]): Promise<void> }
> {
  const dir = await Deno.makeTempDir({ prefix: "keyway-shots-" });
  return {
    dir,
    done: async (shots) => {
      if (Deno.env.get("KEYWAY_KEEP_SHOTS") === "1") {
        console.log(`screenshots (${shots.length}) kept in ${dir}`);
        return;
      }
      await Deno.remove(dir, { recursive: true });
    },
  };
}

export const DESKTOP = { width: 1280, height: 800 };
export const PHONE = { width: 390, height: 844 };
/** Audits and photographs the page at both sizes, light and dark; back to desktop light. */
export async function inspect(page: Page, dir: string, name: string, shots: string[]) {
  for (const [size, viewport] of [["desktop", DESKTOP], ["phone", PHONE]] as const) {
    await page.setViewportSize(viewport);
    for (const scheme of ["light", "dark"] as const) {
      await page.emulateMedia({ colorScheme: scheme });
      await assertAccessible(page, `${name} ${size} ${scheme}`);
      const overflow = await page.evaluate(() =>
        document.documentElement.scrollWidth - document.documentElement.clientWidth
      );
      assert.ok(overflow <= 0, `${name} ${size}: the page scrolls sideways by ${overflow}px`);
      const path = join(dir, `${name}-${size}-${scheme}.png`);
      await page.screenshot({ path, fullPage: true });
      shots.push(path);
    }
  }
  await page.setViewportSize(DESKTOP);
  await page.emulateMedia({ colorScheme: "light" });
}

/** A browser context signed in (local mode) as `email`, and the user's id. */
export async function signedIn(browser: Browser, server: TestServer, email: string) {
  const { token, userId } = await server.services.sessions.issueLocal(email);
  const w = await watchedContext(browser, { viewport: DESKTOP });
  await w.context.addCookies([{ name: "__session", value: token, url: server.url }]);
  return { w, userId, token };
}
