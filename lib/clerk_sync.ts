/**
 * Keeps Clerk in step with Keyway (placeholder: filled in by the webhooks work).
 * afterProvision never blocks or fails provisioning.
 */
import type { Config } from "./config.ts";
import type { Logger } from "./log.ts";
import type { UserRecord, Users } from "./users.ts";

export class ClerkSync {
  constructor(
    private readonly config: Config,
    private readonly kv: Deno.Kv,
    private readonly users: Users,
    private readonly log: Logger,
  ) {}

  /** Called after a key was created: mirror metadata, fetch the profile if unknown. */
  afterProvision(_user: UserRecord): void {}

  /** Handles queued retries (kv.listenQueue); returns false for messages it does not own. */
  handleQueueMessage(_message: unknown): Promise<boolean> {
    return Promise.resolve(false);
  }
}
