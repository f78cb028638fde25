/**
 * Keeps Clerk in step with Keyway through the Backend API: mirrors the key's state into the
 * user's public_metadata and fetches e-mail and names Keyway has not seen yet. Runs in the
 * background and retries through the KV queue, so it never blocks or fails provisioning.
 * Without CLERK_SECRET_KEY it does nothing.
 */
import { type ClerkClient, createClerkClient } from "@clerk/backend";
import { isClerkAPIResponseError } from "@clerk/backend/errors";
import { z } from "zod";
import type { Config } from "../core/config.ts";
import type { Logger } from "../core/log.ts";
import type { UserRecord, Users } from "../identity/users.ts";
import { clerkProfile, clerkUserSchema } from "./webhooks.ts";

const syncMessageSchema = z.object({
  type: z.literal("clerk_sync"),
  userId: z.string().min(1).max(200),
  /** 1 for the first retry (attempt 0 runs in-process, right after provisioning). */
  attempt: z.number().int().min(1).max(100),
  /** Lets this process tell when its own retries are done (see idle()). */
  id: z.string().max(100),
});
type SyncMessage = z.infer<typeof syncMessageSchema>;

/** What Clerk's public_metadata.keyway holds; never the key itself. */
export interface KeywayMetadata {
  provisioned: boolean;
  /** The `kw_` key's first characters (proxy mode); null in shared mode, where no kw_ key is used. */
  keyPrefix: string | null;
  mode: Config["keyMode"];
}

/** Clerk answered in a way a retry cannot change (404 user gone, 401 bad secret key, 422…). */
class PermanentSyncError extends Error {}

export class ClerkSync {
  /** Wait before retry n (1-based); after the last one the sync gives up with an error line. */
  retryDelaysMs: number[] = [5_000, 30_000, 120_000, 600_000, 3_600_000];
  /** Deno's own redelivery of a queue message whose handler threw (KV trouble, a crash). */
  backoffSchedule: number[] = [1_000, 10_000, 60_000];

  private readonly client: ClerkClient | undefined;
  private readonly running = new Set<Promise<void>>();
  private readonly queued = new Set<string>();
  private waiters: Array<() => void> = [];

  constructor(
    private readonly config: Config,
    private readonly kv: Deno.Kv,
    private readonly users: Users,
    private readonly log: Logger,
  ) {
    const { secretKey, apiUrl } = config.clerk;
    this.client = secretKey ? createClerkClient({ secretKey, apiUrl }) : undefined;
  }

  /** Called after a key was created: mirror metadata, fetch the profile if unknown. */
  afterProvision(user: UserRecord): void {
    if (!this.client) return;
    const work = this.attempt(user.id, 0).catch((err) => {
      this.log.error("clerk sync could not schedule a retry", {
        userId: user.id,
        error: describe(err),
      });
    });
    this.running.add(work);
    work.finally(() => {
      this.running.delete(work);
      this.notify();
    });
  }

  /** Handles queued retries (kv.listenQueue); returns false for messages it does not own. */
  async handleQueueMessage(message: unknown): Promise<boolean> {
    const parsed = syncMessageSchema.safeParse(message);
    if (!parsed.success) return false;
    const { userId, attempt, id } = parsed.data;
    // If this throws (only when the next retry cannot be enqueued), Deno redelivers the message.
    if (this.client) await this.attempt(userId, attempt);
    this.queued.delete(id);
    this.notify();
    return true;
  }

  /**
   * Resolves once no sync started or queued by this process is pending (tests await this
   * instead of sleeping). Rejects after `timeoutMs`.
   */
  async idle(timeoutMs = 5_000): Promise<void> {
    let timer: ReturnType<typeof setTimeout> | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(
        () => reject(new Error(`clerk sync still busy after ${timeoutMs} ms`)),
        timeoutMs,
      );
    });
    try {
      while (this.running.size || this.queued.size) {
        await Promise.race([new Promise<void>((r) => this.waiters.push(r)), timeout]);
      }
    } finally {
      clearTimeout(timer);
    }
  }

  /** One try; on a transient failure the next try is enqueued with a growing delay. */
  private async attempt(userId: string, attempt: number): Promise<void> {
    try {
      await this.sync(userId);
      if (attempt > 0) this.log.info("clerk sync succeeded on retry", { userId, attempt });
      return;
    } catch (err) {
      const delay = this.retryDelaysMs[attempt];
      if (err instanceof PermanentSyncError || delay === undefined) {
        this.log.error("clerk sync gave up", { userId, attempt, error: describe(err) });
        return;
      }
      this.log.warn("clerk sync failed, will retry", {
        userId,
        attempt,
        retryInMs: delay,
        error: describe(err),
      });
      const message: SyncMessage = {
        type: "clerk_sync",
        userId,
        attempt: attempt + 1,
        id: crypto.randomUUID(),
      };
      this.queued.add(message.id);
      try {
        await this.kv.enqueue(message, { delay, backoffSchedule: this.backoffSchedule });
      } catch (enqueueErr) {
        this.queued.delete(message.id);
        throw enqueueErr;
      }
    }
  }

  /** Brings Clerk up to date with the user's current record (idempotent). */
  private async sync(userId: string): Promise<void> {
    const client = this.client!;
    // Re-check after writing: a rotation meanwhile must not leave the old prefix in Clerk.
    for (let round = 0; round < 3; round++) {
      const user = await this.users.get(userId);
      if (!user || user.status === "deleted") return;
      if (!user.profileKnown) {
        const clerkUser = await clerkCall(() => client.users.getUser(userId));
        const parsed = clerkUserSchema.safeParse(clerkUser.raw);
        if (!parsed.success) {
          throw new PermanentSyncError("Clerk Backend API sent a user in an unexpected shape");
        }
        await this.users.updateProfile(userId, clerkProfile(parsed.data));
      }
      const keyway: KeywayMetadata = {
        provisioned: user.key !== null,
        keyPrefix: this.config.keyMode === "proxy" ? (user.key?.prefix ?? null) : null,
        mode: this.config.keyMode,
      };
      await clerkCall(() =>
        client.users.updateUserMetadata(userId, { publicMetadata: { keyway: { ...keyway } } })
      );
      const after = await this.users.get(userId);
      if (!after || after.status === "deleted" || after.key?.prefix === user.key?.prefix) return;
    }
  }

  private notify() {
    if (this.running.size || this.queued.size) return;
    const waiters = this.waiters;
    this.waiters = [];
    for (const wake of waiters) wake();
  }
}

/** Runs a Backend API call, marking 4xx answers other than 429 as not worth retrying. */
async function clerkCall<T>(call: () => Promise<T>): Promise<T> {
  try {
    return await call();
  } catch (err) {
    if (
      isClerkAPIResponseError(err) && err.status !== undefined && err.status >= 400 &&
      err.status < 500 && err.status !== 429
    ) {
      throw new PermanentSyncError(`Clerk Backend API answered ${err.status}: ${describe(err)}`);
    }
    throw err;
  }
}

function describe(err: unknown): string {
  if (isClerkAPIResponseError(err)) {
    const first = err.errors[0];
    return `status ${err.status ?? "none"}${first ? `: ${first.code} ${first.message}` : ""}`;
  }
  return err instanceof Error ? err.message : String(err);
}
