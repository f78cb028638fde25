/** Runs `main.ts` as a real process for tests that need one (config failures, secrets at rest). */

const ROOT = new URL("../../", import.meta.url);
const MAIN = new URL("main.ts", ROOT).pathname;
const CONFIG = new URL("deno.json", ROOT).pathname;
/** The test suite's KV Connect limits (tests/support/kv_limits.ts) apply in app processes too. */
const KV_LIMITS = new URL("tests/support/kv_limits.ts", ROOT).pathname;

/** Only what Deno itself needs: the parent's environment must not leak into the app's config. */
function baseEnv(): Record<string, string> {
  const env: Record<string, string> = { NO_COLOR: "1" };
  for (const name of ["PATH", "HOME", "DENO_DIR", "XDG_CACHE_HOME", "TMPDIR"]) {
    const value = Deno.env.get(name);
    if (value !== undefined) env[name] = value;
  }
  return env;
}

function command(env: Record<string, string>, cwd: string) {
  return new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", "--config", CONFIG, "--preload", KV_LIMITS, MAIN],
    cwd,
    env: { ...baseEnv(), ...env },
    clearEnv: true,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  });
}

/** Runs main.ts to completion (it should fail fast); kills it after `timeoutMs`. */
export async function runMainToExit(
  env: Record<string, string>,
  cwd: string,
  timeoutMs = 15_000,
): Promise<{ code: number; stdout: string; stderr: string }> {
  const child = command(env, cwd).spawn();
  const timer = setTimeout(() => child.kill("SIGKILL"), timeoutMs);
  try {
    const out = await child.output();
    const dec = new TextDecoder();
    return { code: out.code, stdout: dec.decode(out.stdout), stderr: dec.decode(out.stderr) };
  } finally {
    clearTimeout(timer);
  }
}

export interface RunningMain {
  /** Base URL, e.g. http://127.0.0.1:41234 */
  url: string;
  pid: number;
  /** Everything printed so far, stdout and stderr. */
  output(): { stdout: string; stderr: string };
  /** SIGTERM by default; SIGKILL to simulate a crash. */
  stop(signal?: Deno.Signal): Promise<void>;
}

/** Starts main.ts and resolves once it logs "keyway listening" (use PORT=0). */
export async function startMain(
  env: Record<string, string>,
  cwd: string,
  timeoutMs = 15_000,
): Promise<RunningMain> {
  const child = command(env, cwd).spawn();
  let stdout = "";
  let stderr = "";
  let onUrl: (url: string) => void = () => {};
  const urlFound = new Promise<string>((resolve) => onUrl = resolve);
  const pump = async (stream: ReadableStream<Uint8Array>, into: (s: string) => void) => {
    const decoder = new TextDecoder();
    for await (const chunk of stream) into(decoder.decode(chunk, { stream: true }));
  };
  const readers = Promise.all([
    pump(child.stdout, (s) => {
      stdout += s;
      for (const line of stdout.split("\n")) {
        if (!line.includes('"keyway listening"')) continue;
        try {
          const url = new URL(JSON.parse(line).url);
          // The server listens on 0.0.0.0 (IPv4); "localhost" might resolve to ::1 first.
          url.hostname = "127.0.0.1";
          onUrl(url.origin);
        } catch {
          // A partial line: wait for the rest.
        }
      }
    }),
    pump(child.stderr, (s) => stderr += s),
  ]);
  let stopped = false;
  const stop = async (signal: Deno.Signal = "SIGTERM") => {
    if (stopped) return;
    stopped = true;
    try {
      child.kill(signal);
    } catch {
      // Already exited.
    }
    await child.status;
    await readers;
  };
  let timer: ReturnType<typeof setTimeout> | undefined;
  try {
    const url = await Promise.race([
      urlFound,
      child.status.then((s) => {
        throw new Error(`main.ts exited with ${s.code} before listening:\n${stderr}`);
      }),
      new Promise<never>((_, reject) => {
        timer = setTimeout(
          () => reject(new Error(`main.ts did not start within ${timeoutMs} ms:\n${stderr}`)),
          timeoutMs,
        );
      }),
    ]);
    return { url, pid: child.pid, output: () => ({ stdout, stderr }), stop };
  } catch (err) {
    await stop();
    throw err;
  } finally {
    clearTimeout(timer);
  }
}
