/** What the tasks that read the server's data start with: its configuration and its KV. */
import { type Config, configForTask } from "../lib/core/config.ts";
import { KvMissingError, openKv } from "../lib/core/kv.ts";

/**
 * The configuration and the server's KV, or null when either is wrong (said on stderr, one line
 * naming the variable): a task never creates an empty KV where the server's should be.
 */
export async function serverKv(task: string): Promise<{ config: Config; kv: Deno.Kv } | null> {
  const config = await configForTask();
  if (!config) return null;
  try {
    return { config, kv: await openKv(config.kvPath, config.kvAccessToken, { mustExist: true }) };
  } catch (err) {
    if (!(err instanceof KvMissingError)) throw err;
    console.error(`deno task ${task}: ${err.message}`);
    return null;
  }
}
