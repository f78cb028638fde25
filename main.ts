/** Server entry: reads the config, opens KV, builds islands, serves the app, registers the cron. */
import { ConfigError, loadConfig, readEnv } from "./lib/core/config.ts";
import { buildIslands, loadBuiltIslands } from "./build/islands.ts";
import { openKv } from "./lib/core/kv.ts";
import { createServices, type Services } from "./lib/core/services.ts";
import { costSummaryJob } from "./lib/reports/summary.ts";
import { createApp } from "./routes/mod.ts";

const SHUTDOWN_GRACE_MS = 10_000;

/** A start-up failure a person can act on: printed as one line, no stack trace. */
export class StartupError extends Error {
  override name = "StartupError";
}

export interface Running {
  services: Services;
  server: Deno.HttpServer<Deno.NetAddr>;
  url: string;
}

/** Starts Keyway; used by `deno task start`, dev.ts and tests that need a real process. */
export async function start(env: Record<string, string | undefined>): Promise<Running> {
  const config = loadConfig(env);
  const kv = await openKv(config.kvPath, config.kvAccessToken, { onDeploy: config.onDeploy });
  const services = await createServices(config, kv);
  const app = createApp(services);
  // On Deno Deploy the bundles come from `deno task build`; elsewhere they are built when stale.
  await (config.onDeploy ? loadBuiltIslands() : buildIslands()).catch((err) =>
    services.log.error("island bundles unavailable", { error: String(err) })
  );
  try {
    Deno.cron("summarize-costs", config.costCron, costSummaryJob(services));
  } catch (err) {
    // Cron names are per process: a second start() in one process (tests) keeps the first.
    services.log.warn("cost cron not registered", { error: String(err) });
  }
  if (services.events.enabled || services.clerkSync.enabled) {
    try {
      // Deno Deploy freezes idle isolates (and their timers): the cron wakes the outboxes (event
      // delivery, Clerk sync) every minute.
      Deno.cron("run-outboxes", "* * * * *", async () => {
        await Promise.all([services.events.flush(), services.clerkSync.flush()]);
      });
    } catch (err) {
      services.log.warn("outbox cron not registered", { error: String(err) });
    }
  }
  let server: Deno.HttpServer<Deno.NetAddr>;
  try {
    server = Deno.serve({
      port: config.port,
      // Local mode lets anyone sign in with any e-mail: keep it on this machine.
      hostname: config.localMode ? "127.0.0.1" : "0.0.0.0",
      onListen: () => {},
    }, app.fetch);
  } catch (err) {
    await services.close();
    if (err instanceof Deno.errors.AddrInUse) {
      throw new StartupError(
        `Port ${config.port} is already in use: stop what is using it, or set PORT to a free ` +
          `port (PORT=${config.port + 1} deno task start).`,
      );
    }
    if (err instanceof Deno.errors.PermissionDenied) {
      throw new StartupError(
        `Port ${config.port} needs privileges this process lacks: set PORT to a port above 1023.`,
      );
    }
    throw err;
  }
  const url = `http://localhost:${server.addr.port}`;
  services.log.info("keyway listening", {
    url,
    publicUrl: config.publicUrl,
    mode: config.localMode ? "local" : "clerk",
    keyMode: config.keyMode,
    kv: config.kvPath ?? "./data/keyway.sqlite3",
  });
  if (config.keyMode === "proxy" && !config.glm.apiKey) {
    // Not fatal (the pages and keys work), but every gateway request would answer 503.
    services.log.warn(
      "GLM_API_KEY is not set: every /v1 request answers 503 not_configured until it is",
    );
  }
  if (config.localMode) {
    console.log(`\n  Keyway is running in local mode: open ${url}/ and sign in with any e-mail.\n`);
  }
  return { services, server, url };
}

if (import.meta.main) {
  try {
    const running = await start(await readEnv());
    // Finish what is in flight (answers being streamed, usage being written), then exit; a
    // stream that outlives the grace period is cut.
    const stop = async () => {
      running.services.log.info("shutting down");
      const sleep = (ms: number) => new Promise<"late">((r) => setTimeout(() => r("late"), ms));
      const closed = running.server.shutdown();
      if (await Promise.race([closed, sleep(SHUTDOWN_GRACE_MS)]) === "late") {
        // Past the grace period: answers still streaming end with an error event and are
        // settled here, rather than left for another process's reaper half a minute later.
        await running.services.gateway.shutdown();
        await Promise.race([closed, sleep(2_000)]);
      }
      await running.services.close();
      Deno.exit(0);
    };
    for (const signal of ["SIGTERM", "SIGINT"] as const) {
      Deno.addSignalListener(signal, () => void stop());
    }
  } catch (err) {
    if (err instanceof ConfigError || err instanceof StartupError) {
      console.error(err.message);
      Deno.exit(1);
    }
    throw err;
  }
}
