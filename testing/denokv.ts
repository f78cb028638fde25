/**
 * A self-hosted `denokv` server (denoland/denokv, `cargo install denokv --locked`) on loopback:
 * the KV Connect server the remote-KV tests and the bench's remote scenario run the app against
 * (CONTRACT §8). Found at DENOKV_BIN, on PATH, or in cargo's bin folder.
 */

/** One token for every server of a process: Deno's KV Connect client reads it from the environment. */
export const DENOKV_TOKEN = "keyway-local-denokv-token-0123456789abcdef";

/** How a machine gets denokv. */
export const DENOKV_INSTALL = "cargo install denokv --locked";

function executable(path: string): boolean {
  try {
    const info = Deno.statSync(path);
    return info.isFile && (Deno.build.os === "windows" || ((info.mode ?? 0) & 0o111) !== 0);
  } catch {
    return false;
  }
}

/** The denokv binary: DENOKV_BIN, else the first on PATH, else cargo's bin folder; or null. */
export function findDenokv(): string | null {
  const explicit = Deno.env.get("DENOKV_BIN");
  if (explicit) return executable(explicit) ? explicit : null;
  const name = Deno.build.os === "windows" ? "denokv.exe" : "denokv";
  const home = Deno.env.get("HOME") ?? Deno.env.get("USERPROFILE");
  const cargoBin = Deno.env.get("CARGO_HOME") ?? (home ? `${home}/.cargo` : null);
  const dirs = (Deno.env.get("PATH") ?? "").split(Deno.build.os === "windows" ? ";" : ":");
  if (cargoBin) dirs.push(`${cargoBin}/bin`);
  for (const dir of dirs) {
    if (dir && executable(`${dir}/${name}`)) return `${dir}/${name}`;
  }
  return null;
}

/** A denokv server: its URL, the environment an app needs to use it, stop and start again. */
export class DenoKvServer {
  private child: Deno.ChildProcess | null = null;
  private pumps: Promise<void>[] = [];
  private output = "";

  private constructor(
    private readonly bin: string,
    readonly sqlitePath: string,
    readonly port: number,
  ) {}

  /** Starts denokv on a free loopback port with a fresh SQLite file in `dir`. */
  static async start(bin: string, dir: string): Promise<DenoKvServer> {
    for (let attempt = 1;; attempt++) {
      const probe = Deno.listen({ hostname: "127.0.0.1", port: 0 });
      const port = probe.addr.port;
      probe.close();
      const server = new DenoKvServer(bin, `${dir}/denokv.sqlite3`, port);
      try {
        await server.restart();
        return server;
      } catch (err) {
        // Another process took the port between the probe and denokv's bind: another one.
        if (attempt >= 3) throw err;
      }
    }
  }

  /** The server's process id while it runs. */
  get pid(): number | null {
    return this.child?.pid ?? null;
  }

  get url(): string {
    return `http://127.0.0.1:${this.port}`;
  }

  /** DENO_KV_PATH and DENO_KV_ACCESS_TOKEN for an app process. */
  get env(): Record<string, string> {
    return { DENO_KV_PATH: this.url, DENO_KV_ACCESS_TOKEN: DENOKV_TOKEN };
  }

  /** Opens the server's KV from this process. */
  async open(): Promise<Deno.Kv> {
    Deno.env.set("DENO_KV_ACCESS_TOKEN", DENOKV_TOKEN);
    return await Deno.openKv(this.url);
  }

  /** What denokv printed so far. */
  log(): string {
    return this.output;
  }

  /** Starts (again) on the same port and file; resolves once it accepts connections. */
  async restart(timeoutMs = 15_000): Promise<void> {
    if (this.child) throw new Error("denokv is already running");
    const child = new Deno.Command(this.bin, {
      args: [
        "--sqlite-path",
        this.sqlitePath,
        "serve",
        "--access-token",
        DENOKV_TOKEN,
        "--addr",
        `127.0.0.1:${this.port}`,
      ],
      env: { RUST_LOG: "warn" },
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    this.child = child;
    const decoder = new TextDecoder();
    this.pumps = [child.stdout, child.stderr].map((stream) =>
      (async () => {
        for await (const chunk of stream) this.output += decoder.decode(chunk, { stream: true });
      })().catch(() => {})
    );
    let exited = false;
    child.status.then(() => exited = true);
    const until = Date.now() + timeoutMs;
    while (Date.now() < until && !exited) {
      try {
        const res = await fetch(`${this.url}/v2/metadata_exchange`, { method: "POST" });
        await res.body?.cancel();
        return; // any answer: it listens (without a token it answers 401)
      } catch {
        await new Promise((r) => setTimeout(r, 50));
      }
    }
    await this.stop("SIGKILL");
    throw new Error(`denokv did not start on port ${this.port}:\n${this.output}`);
  }

  /** Stops denokv (SIGKILL: as abrupt as a crash); its file stays for restart(). */
  async stop(signal: Deno.Signal = "SIGKILL"): Promise<void> {
    const child = this.child;
    if (!child) return;
    this.child = null;
    try {
      child.kill(signal);
    } catch {
      // Already exited.
    }
    await child.status;
    await Promise.all(this.pumps);
  }
}
