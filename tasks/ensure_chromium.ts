/**
 * Makes sure Debian's Chromium is there for the browser tests: installs it with apt-get when
 * missing (as root), or fails saying exactly why. Never a silent skip.
 */
export const CHROMIUM = Deno.env.get("CHROMIUM_PATH") ?? "/usr/bin/chromium";

async function exists(path: string) {
  try {
    await Deno.stat(path);
    return true;
  } catch {
    return false;
  }
}

async function run(cmd: string, args: string[]) {
  console.error(`$ ${cmd} ${args.join(" ")}`);
  const { code } = await new Deno.Command(cmd, {
    args,
    stdout: "inherit",
    stderr: "inherit",
    env: { DEBIAN_FRONTEND: "noninteractive" },
  }).output();
  return code === 0;
}

if (import.meta.main && !(await exists(CHROMIUM))) {
  const isRoot = Deno.uid?.() === 0;
  if (!isRoot) {
    console.error(
      `Chromium is missing at ${CHROMIUM} and this user cannot install it. ` +
        `Run: sudo apt-get update && sudo apt-get install -y chromium (or set CHROMIUM_PATH).`,
    );
    Deno.exit(1);
  }
  console.error(`Chromium is missing at ${CHROMIUM}: installing Debian's chromium package…`);
  const ok = await run("apt-get", ["update"]) &&
    await run("apt-get", ["install", "-y", "--no-install-recommends", "chromium"]);
  if (!ok || !(await exists(CHROMIUM))) {
    console.error(
      `Could not install Chromium with apt-get: the browser tests need ${CHROMIUM}.`,
    );
    Deno.exit(1);
  }
}
