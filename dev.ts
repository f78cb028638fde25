/**
 * Dev server: runs main.ts in a child process, watches the sources, rebuilds the island bundles
 * when they go stale and restarts the child, so server-rendered markup matches the new bundles
 * and pages link the new asset version (`?v=` URLs are cached as immutable).
 */
import { buildIslands, PROJECT_ROOT } from "./build/islands.ts";

const WATCH = ["islands", "components", "lib", "routes", "static", "main.ts"];
const DEBOUNCE_MS = 150;

let child: Deno.ChildProcess | null = null;

async function build() {
  try {
    const { built, ms } = await buildIslands();
    if (built) console.log(`dev: islands rebuilt in ${Math.round(ms)} ms`);
    return true;
  } catch (err) {
    console.error(`dev: island build failed — fix it and save again.\n${String(err)}`);
    return false;
  }
}

async function stop() {
  if (!child) return;
  const running = child;
  child = null;
  try {
    running.kill("SIGTERM");
  } catch { /* already gone */ }
  await running.status;
}

function startChild() {
  child = new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", "main.ts"],
    cwd: PROJECT_ROOT,
    stdin: "null",
    stdout: "inherit",
    stderr: "inherit",
  }).spawn();
}

async function restart(reason: string) {
  console.log(`dev: ${reason}`);
  await build();
  await stop();
  startChild();
}

if (import.meta.main) {
  await restart("starting");
  const watcher = Deno.watchFs(WATCH.map((p) => `${PROJECT_ROOT}/${p}`), { recursive: true });
  const shutdown = async () => {
    watcher.close();
    await stop();
    Deno.exit(0);
  };
  Deno.addSignalListener("SIGINT", shutdown);
  Deno.addSignalListener("SIGTERM", shutdown);

  let timer: ReturnType<typeof setTimeout> | undefined;
  const changed = new Set<string>();
  for await (const event of watcher) {
    // Our own output (static/build) must not trigger another round.
    const paths = event.paths.filter((p) => !p.includes("/static/build/") && !/\/\.[^/]*$/.test(p));
    if (!paths.length) continue;
    for (const p of paths) changed.add(p.slice(PROJECT_ROOT.length + 1));
    clearTimeout(timer);
    timer = setTimeout(async () => {
      const files = [...changed];
      changed.clear();
      await restart(`changed: ${files.join(", ")} (reload the page)`);
    }, DEBOUNCE_MS);
  }
}
