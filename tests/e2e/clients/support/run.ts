/**
 * Runs a coding tool as its user would, headless, in a sandbox of its own: a temp HOME (every
 * config and cache folder inside it), a working folder, nothing of the parent's environment but
 * PATH, no network beyond loopback (proxies point at a closed loopback port; loopback is exempt),
 * every telemetry, update and model-list switch the tools have turned off, and a hard timeout that
 * kills the tool's whole process group (`timeout -k`).
 */

export interface ToolRun {
  code: number;
  /** stdout then stderr, colour codes removed. */
  output: string;
  /** Whether the hard timeout stopped it. */
  timedOut: boolean;
  /** performance.now() when it exited. */
  exitedAt: number;
  ms: number;
}

export interface Sandbox {
  home: string;
  cwd: string;
}

export async function sandbox(): Promise<Sandbox> {
  const home = await Deno.makeTempDir({ prefix: "keyway_tool_home_" });
  const cwd = `${home}/project`;
  await Deno.mkdir(cwd);
  return { home, cwd };
}

/** The switches each tool documents for no telemetry, no update checks, no model-list fetches. */
const QUIET = {
  // Claude Code
  DISABLE_TELEMETRY: "1",
  DISABLE_ERROR_REPORTING: "1",
  DISABLE_AUTOUPDATER: "1",
  CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC: "1",
  // opencode and Kilo (a fork of opencode)
  OPENCODE_DISABLE_AUTOUPDATE: "1",
  OPENCODE_DISABLE_MODELS_FETCH: "1",
  OPENCODE_DISABLE_LSP_DOWNLOAD: "1",
  OPENCODE_DISABLE_SHARE: "1",
  OPENCODE_DISABLE_DEFAULT_PLUGINS: "1",
  KILO_DISABLE_AUTOUPDATE: "1",
  KILO_DISABLE_MODELS_FETCH: "1",
  KILO_DISABLE_LSP_DOWNLOAD: "1",
  KILO_DISABLE_SHARE: "1",
  KILO_DISABLE_DEFAULT_PLUGINS: "1",
  KILO_DISABLE_SESSION_INGEST: "1",
  KILO_DISABLE_CODEBASE_INDEXING: "1",
  KILO_DISABLE_PRESENCE: "1",
  // Continue, Cline and the conventions many tools follow
  CONTINUE_TELEMETRY_ENABLED: "0",
  CLINE_TELEMETRY_DISABLED: "1",
  DO_NOT_TRACK: "1",
  NO_UPDATE_NOTIFIER: "1",
  // Anything that still tries the network fails at once; loopback (Keyway) is exempt.
  HTTP_PROXY: "http://127.0.0.1:9",
  HTTPS_PROXY: "http://127.0.0.1:9",
  http_proxy: "http://127.0.0.1:9",
  https_proxy: "http://127.0.0.1:9",
  NO_PROXY: "127.0.0.1,localhost",
  no_proxy: "127.0.0.1,localhost",
};

export async function runTool(
  command: string,
  args: string[],
  box: Sandbox,
  options: { env?: Record<string, string>; timeoutMs: number; stdin?: string },
): Promise<ToolRun> {
  const started = performance.now();
  const child = new Deno.Command("timeout", {
    args: ["-k", "3", String(options.timeoutMs / 1000), command, ...args],
    cwd: box.cwd,
    clearEnv: true,
    env: {
      PATH: Deno.env.get("PATH") ?? "/usr/bin:/bin",
      HOME: box.home,
      XDG_CONFIG_HOME: `${box.home}/.config`,
      XDG_CACHE_HOME: `${box.home}/.cache`,
      XDG_DATA_HOME: `${box.home}/.local/share`,
      XDG_STATE_HOME: `${box.home}/.local/state`,
      TMPDIR: box.home,
      NO_COLOR: "1",
      TERM: "dumb",
      ...QUIET,
      ...options.env,
    },
    stdin: options.stdin === undefined ? "null" : "piped",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  if (options.stdin !== undefined) {
    const writer = child.stdin.getWriter();
    await writer.write(new TextEncoder().encode(options.stdin));
    await writer.close();
  }
  const out = await child.output();
  const exitedAt = performance.now();
  const dec = new TextDecoder();
  // deno-lint-ignore no-control-regex
  const plain = (s: string) => s.replace(/\x1b\[[0-9;?]*[A-Za-z]/g, "");
  return {
    code: out.code,
    output: plain(`${dec.decode(out.stdout)}\n${dec.decode(out.stderr)}`),
    timedOut: out.code === 124 || out.code === 137,
    exitedAt,
    ms: exitedAt - started,
  };
}
