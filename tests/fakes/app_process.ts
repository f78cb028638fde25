/** Runs Keyway (main.ts) as a real process on loopback, for multi-process and crash tests. */

export interface AppProcess {
  url: string;
  child: Deno.ChildProcess;
  /** Every stdout/stderr line so far. */
  lines: string[];
  /** SIGTERM (or the given signal) and wait for the exit. */
  stop(signal?: Deno.Signal): Promise<void>;
}

const MAIN = new URL("../../main.ts", import.meta.url).pathname;

export async function spawnApp(env: Record<string, string>): Promise<AppProcess> {
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", MAIN],
    env: { PORT: "0", NO_COLOR: "1", ...env },
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const lines: string[] = [];
  let resolveUrl: (url: string) => void;
  const urlReady = new Promise<string>((r) => resolveUrl = r);
  const pump = async (stream: ReadableStream<Uint8Array<ArrayBuffer>>) => {
    let buf = "";
    for await (const text of stream.pipeThrough(new TextDecoderStream())) {
      buf += text;
      const parts = buf.split("\n");
      buf = parts.pop()!;
      for (const line of parts) {
        lines.push(line);
        try {
          const msg = JSON.parse(line);
          if (msg.msg === "keyway listening") resolveUrl(msg.url.replace("localhost", "127.0.0.1"));
        } catch { /* not JSON */ }
      }
    }
    if (buf) lines.push(buf);
  };
  const pumps = Promise.all([pump(child.stdout), pump(child.stderr)]);
  const timeout = setTimeout(() => child.kill("SIGKILL"), 30_000);
  const url = await Promise.race([
    urlReady,
    child.status.then((s) => {
      throw new Error(`app exited early (${s.code}):\n${lines.join("\n")}`);
    }),
  ]);
  clearTimeout(timeout);
  return {
    url,
    child,
    lines,
    stop: async (signal: Deno.Signal = "SIGTERM") => {
      try {
        child.kill(signal);
      } catch { /* already exited */ }
      await child.status;
      await pumps;
    },
  };
}
