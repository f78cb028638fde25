/**
 * The remote-KV suite's tests (CONTRACT §8): they run the app over KV Connect against a denokv
 * server (testing/denokv.ts). Without denokv they are skipped with one line saying how to install
 * it — except under CI (CI=true), where they fail instead.
 */
import { DENOKV_INSTALL as INSTALL, findDenokv } from "../../testing/denokv.ts";

export { DenoKvServer } from "../../testing/denokv.ts";

const BIN = findDenokv();
const CI = /^(1|true)$/i.test(Deno.env.get("CI") ?? "");

/** Says once per test run (every file of a parallel run shares one process) that we skipped. */
function noticeSkipped() {
  const marker = `${Deno.env.get("TMPDIR") ?? "/tmp"}/keyway_denokv_skip_notice`;
  try {
    using file = Deno.openSync(marker, { read: true, write: true, create: true });
    file.lockSync(true);
    const seen = new TextDecoder().decode(Deno.readFileSync(marker)).trim();
    if (seen === String(Deno.pid)) return;
    file.truncateSync(0);
    file.writeSync(new TextEncoder().encode(String(Deno.pid)));
  } catch {
    // No temp folder to remember it in: say it again rather than not at all.
  }
  console.warn(
    `remote-KV tests skipped: denokv is not installed (install it with \`${INSTALL}\`, ` +
      "or set DENOKV_BIN)",
  );
}

/**
 * A test that needs denokv: run where it is installed, skipped with one notice where it is not,
 * and failed under CI, which must install it (.ci/run).
 */
export function remoteKvTest(name: string, fn: (bin: string) => Promise<void>) {
  if (!BIN && !CI) {
    noticeSkipped();
    Deno.test({ name, ignore: true, fn: () => {} });
    return;
  }
  Deno.test(name, async () => {
    if (!BIN) {
      throw new Error(`denokv is not installed, and CI must run these tests: ${INSTALL}`);
    }
    await fn(BIN);
  });
}
