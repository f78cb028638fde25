/**
 * The bench's second peer (CONTRACT §9): LiteLLM's proxy (`litellm[proxy]` from PyPI) in a
 * virtual environment under the OS temp folder, no database, its config pointing at the bench's
 * fake upstream, run with Python. The environment is kept between runs (keyed by the LiteLLM and
 * Python versions), so only the first run installs.
 */

/**
 * The newest release whose `proxy` extra installs from PyPI here: later ones require the
 * `litellm-proxy` package, which the registry does not serve.
 */
export const LITELLM_VERSION = "1.106.12";

export interface Started {
  child: Deno.ChildProcess;
  port: number;
}

/** Its master key: LiteLLM refuses to start without one (or a flag that permits none). */
export const LITELLM_MASTER_KEY = "sk-keyway-bench-0123456789abcdef0123456789abcdef";

async function run(cmd: string, args: string[]): Promise<{ ok: boolean; out: string }> {
  try {
    const out = await new Deno.Command(cmd, { args, stdout: "piped", stderr: "piped" }).output();
    const text = new TextDecoder().decode(out.stdout) + new TextDecoder().decode(out.stderr);
    return { ok: out.success, out: text.trim() };
  } catch {
    return { ok: false, out: `${cmd} is not installed` };
  }
}

/** Runs pip, passing its progress lines on to stderr as they come. */
async function pipInstall(
  pip: string,
  spec: string,
  progress: (line: string) => void,
): Promise<{ ok: boolean; last: string }> {
  const child = new Deno.Command(pip, {
    args: ["install", "--disable-pip-version-check", "--no-input", "--progress-bar", "off", spec],
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  let last = "";
  const relay = async (stream: ReadableStream<Uint8Array>) => {
    let buffered = "";
    const decoder = new TextDecoder();
    for await (const bytes of stream) {
      buffered += decoder.decode(bytes, { stream: true });
      const lines = buffered.split("\n");
      buffered = lines.pop() ?? "";
      for (const line of lines.map((l) => l.trim()).filter(Boolean)) {
        last = line;
        // Its own dependencies, not theirs (those come by the hundred), and the outcome.
        const direct = /^Collecting/.test(line) && !line.includes("->");
        if (direct || /^(Installing collected|Successfully installed|ERROR)/.test(line)) {
          progress(`bench: pip: ${line.length > 160 ? `${line.slice(0, 157)}…` : line}`);
        }
      }
    }
  };
  await Promise.all([relay(child.stdout), relay(child.stderr)]);
  return { ok: (await child.status).success, last };
}

/** The virtual environment with LiteLLM installed (made on first use), or why there is none. */
async function environment(
  progress: (line: string) => void,
): Promise<{ python: string; litellm: string } | { missing: string }> {
  const version = await run("python3", ["-c", "import sys; print('%d.%d' % sys.version_info[:2])"]);
  if (!version.ok) return { missing: "python3 is not installed" };
  const temp = Deno.env.get("TMPDIR") ?? "/tmp";
  const dir = `${temp}/keyway-bench-litellm-${LITELLM_VERSION}-py${version.out}`;
  const python = `${dir}/bin/python`;
  const litellm = `${dir}/bin/litellm`;
  const marker = `${dir}/.keyway-installed`;
  try {
    await Deno.stat(marker);
    progress(`bench: LiteLLM ${LITELLM_VERSION} from ${dir} (installed by an earlier run)`);
    return { python, litellm };
  } catch { /* not yet installed */ }
  progress(
    `bench: installing the LiteLLM peer (litellm[proxy]==${LITELLM_VERSION}, PyPI) into ${dir}` +
      " — the first run takes a few minutes; later runs reuse it",
  );
  await Deno.remove(dir, { recursive: true }).catch(() => {});
  const venv = await run("python3", ["-m", "venv", dir]);
  if (!venv.ok) return { missing: `python3 -m venv failed: ${venv.out.split("\n").at(-1)}` };
  const pip = await pipInstall(
    `${dir}/bin/pip`,
    `litellm[proxy]==${LITELLM_VERSION}`,
    progress,
  );
  if (!pip.ok) {
    await Deno.remove(dir, { recursive: true }).catch(() => {});
    return { missing: `pip install litellm[proxy]==${LITELLM_VERSION} failed: ${pip.last}` };
  }
  await Deno.writeTextFile(marker, new Date().toISOString());
  return { python, litellm };
}

/** Starts LiteLLM's proxy in front of `upstreamUrl` (OpenAI-compatible); null with the reason. */
export async function startLitellm(
  upstreamUrl: string,
  configDir: string,
  progress: (line: string) => void,
): Promise<{ proc: Started } | { missing: string }> {
  const env = await environment(progress);
  if ("missing" in env) return env;
  const config = `${configDir}/litellm.yaml`;
  await Deno.writeTextFile(
    config,
    [
      "model_list:",
      "  - model_name: glm-4.6",
      "    litellm_params:",
      "      model: openai/glm-4.6",
      `      api_base: ${upstreamUrl}`,
      "      api_key: bench-master-key",
      "",
    ].join("\n"),
  );
  const probe = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = probe.addr.port;
  probe.close();
  progress("bench: starting LiteLLM's proxy…");
  const child = new Deno.Command(env.litellm, {
    args: ["--config", config, "--host", "127.0.0.1", "--port", String(port)],
    env: {
      LITELLM_MASTER_KEY,
      // The model price map ships with the package: no fetch from the network at start-up.
      LITELLM_LOCAL_MODEL_COST_MAP: "True",
      LITELLM_LOG: "ERROR",
    },
    stdout: "null",
    stderr: "null",
  }).spawn();
  let exited = false;
  child.status.then(() => exited = true);
  const deadline = Date.now() + 90_000;
  while (Date.now() < deadline && !exited) {
    try {
      const res = await fetch(`http://127.0.0.1:${port}/health/liveliness`);
      await res.body?.cancel();
      if (res.ok) return { proc: { child, port } };
    } catch { /* not listening yet */ }
    await new Promise((r) => setTimeout(r, 250));
  }
  if (!exited) child.kill("SIGKILL");
  return { missing: `LiteLLM's proxy did not start (${exited ? "it exited" : "90 s"})` };
}
