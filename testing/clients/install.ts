/**
 * The coding tools the clients suite (tests/e2e/clients) drives, pinned, and their installer: each
 * tool is installed from npm once per version into a cache outside the repository
 * (`$XDG_CACHE_HOME/keyway-clients`, else `~/.cache/keyway-clients`), one folder per pinned
 * version, under a lock so parallel test files never race. `deno task test:clients` installs
 * what is missing (tasks/clients.ts); a test finds a tool with `installed()`.
 */

export interface Tool {
  id: string;
  label: string;
  /** npm specs, pinned. */
  packages: string[];
  /** The command in node_modules/.bin (null: a library, driven by scripts run with node). */
  bin: string | null;
  /** Why this version and not another, when that is worth saying. */
  note?: string;
}

export const TOOLS: readonly Tool[] = [
  {
    id: "claude-code",
    label: "Claude Code",
    packages: ["@anthropic-ai/claude-code@2.1.332"],
    bin: "claude",
  },
  { id: "opencode", label: "opencode", packages: ["opencode-ai@1.18.33"], bin: "opencode" },
  {
    id: "kilo",
    label: "Kilo CLI",
    packages: ["@kilocode/cli@7.7.7"],
    bin: "kilo",
    note:
      "7.8.1 cannot install: its postinstall needs @kilocode/cli-linux-x64@7.8.1, which is not on npm (7.7.9 is the newest)",
  },
  { id: "continue", label: "Continue CLI", packages: ["@continuedev/cli@1.5.47"], bin: "cn" },
  { id: "cline", label: "Cline CLI", packages: ["cline@3.0.65"], bin: "cline" },
  {
    id: "sdks",
    label: "SDKs (openai, @anthropic-ai/sdk, Vercel AI SDK, LangChain)",
    packages: [
      "openai@7.57.0",
      "@anthropic-ai/sdk@1.14.0",
      "ai@7.0.185",
      "@ai-sdk/openai-compatible@3.0.97",
      "@ai-sdk/anthropic@4.0.112",
      "@langchain/openai@1.6.0",
      "@langchain/core@1.4.0",
    ],
    bin: null,
  },
];

/** Tools whose npm install cannot work on a machine that reaches npm and nothing else. */
export const NOT_INSTALLABLE: Readonly<Record<string, string>> = {
  "Crush (@charmland/crush@0.96.1)":
    "its npm package downloads the binary from github.com in postinstall (getaddrinfo ENOTFOUND github.com here)",
};

export function cacheRoot(): string {
  const xdg = Deno.env.get("XDG_CACHE_HOME");
  const home = Deno.env.get("HOME") ?? "/tmp";
  return `${xdg || `${home}/.cache`}/keyway-clients`;
}

/** The tool's folder: its id and pinned versions, so a new pin installs beside the old one. */
export function toolDir(tool: Tool): string {
  const versions = tool.packages.map((p) => p.slice(p.lastIndexOf("@") + 1));
  const name = tool.packages.length === 1
    ? `${tool.id}@${versions[0]}`
    : `${tool.id}@${hash(tool.packages.join(" "))}`;
  return `${cacheRoot()}/${name}`;
}

function hash(s: string): string {
  let h = 0x811c9dc5;
  for (const c of new TextEncoder().encode(s)) h = Math.imul(h ^ c, 0x01000193) >>> 0;
  return h.toString(16).padStart(8, "0");
}

const READY = ".installed";

export interface Installed {
  tool: Tool;
  /** node_modules/.bin/<bin>, or the folder holding node_modules for a library. */
  path: string;
  dir: string;
}

/** The tool when its pinned version is in the cache, else null. */
export async function installed(tool: Tool): Promise<Installed | null> {
  const dir = toolDir(tool);
  try {
    await Deno.stat(`${dir}/${READY}`);
  } catch {
    return null;
  }
  return { tool, dir, path: tool.bin ? `${dir}/node_modules/.bin/${tool.bin}` : dir };
}

export function toolById(id: string): Tool {
  const tool = TOOLS.find((t) => t.id === id);
  if (!tool) throw new Error(`no tool ${id} in testing/clients/install.ts`);
  return tool;
}

/**
 * Installs the tool unless it is there (`npm install --prefix` into a fresh folder, renamed into
 * place when it worked). Returns null when it worked, else the reason in one line.
 */
export async function install(
  tool: Tool,
  progress: (line: string) => void = (line) => console.log(line),
): Promise<string | null> {
  const root = cacheRoot();
  await Deno.mkdir(root, { recursive: true });
  const dir = toolDir(tool);
  const lock = await Deno.open(`${dir}.lock`, { create: true, write: true });
  try {
    await lock.lock(true);
    if (await installed(tool)) return null;
    const staging = `${dir}.partial`;
    await Deno.remove(staging, { recursive: true }).catch(() => {});
    await Deno.mkdir(staging, { recursive: true });
    const started = performance.now();
    progress(`clients: installing ${tool.packages.join(" ")} into ${dir}`);
    let out: Deno.CommandOutput;
    try {
      out = await new Deno.Command("npm", {
        args: [
          "install",
          "--prefix",
          staging,
          "--no-audit",
          "--no-fund",
          "--loglevel=error",
          ...tool.packages,
        ],
        stdout: "piped",
        stderr: "piped",
      }).output();
    } catch (err) {
      return `npm could not be run (${err instanceof Error ? err.message : err})`;
    }
    if (!out.success) {
      await Deno.remove(staging, { recursive: true }).catch(() => {});
      const text = new TextDecoder().decode(out.stderr);
      const reason = text.split("\n").find((l) =>
        /ENOTFOUND|EAI_AGAIN|ETARGET|ECONNREFUSED|E404|notarget|network/i.test(l)
      ) ?? text.trim().split("\n").at(-1) ?? `npm exited with ${out.code}`;
      return `npm install failed: ${reason.replace(/^npm (error|ERR!) /, "").trim()}`;
    }
    await Deno.writeTextFile(`${staging}/${READY}`, `${tool.packages.join("\n")}\n`);
    await Deno.remove(dir, { recursive: true }).catch(() => {});
    await Deno.rename(staging, dir);
    progress(
      `clients: ${tool.label} installed in ${((performance.now() - started) / 1000).toFixed(0)} s`,
    );
    return null;
  } finally {
    lock.close();
  }
}
