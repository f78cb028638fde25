/**
 * Keeps Clerk in step with Keyway through the Backend API: mirrors the key's state into the
 * user's public_metadata and fetches e-mail and names Keyway has not seen yet. Runs in the
 * background on the KV outbox (lib/core/outbox.ts), retried by whichever process is alive, so it
 * never blocks or fails provisioning and works on every KV, KV Connect included. Without
 * CLERK_SECRET_KEY it does nothing.
 */
import { type ClerkClient, createClerkClient } from "@clerk/backend";
import { isClerkAPIResponseError } from "@clerk/backend/errors";
import type { Config } from "../core/config.ts";
import { type Clock, systemClock } from "../core/clock.ts";
import { keys, retryAtomic } from "../core/kv.ts";
import type { Logger } from "../core/log.ts";
import { type AttemptFailure, errorText, Outbox } from "../core/outbox.ts";
import type { UserRecord, Users } from "../identity/users.ts";
import { clerkProfile, clerkUserSchema } from "./user.ts";

/** What Clerk's public_metadata.keyway holds; never the key itself. */
export interface KeywayMetadata {
  provisioned: boolean;
  /** The `kw_` key's first characters (proxy mode); null in shared mode, where no kw_ key is used. */
  keyPrefix: string | null;
  mode: Config["keyMode"];
}

/** One user to bring up to date in Clerk. */
interface SyncJob {
  userId: string;
}

/** Clerk answered in a way a retry cannot change (404 user gone, 401 bad secret key, 422…). */
class PermanentSyncError extends Error {}

export class ClerkSync {
  /** Wait before retry n (1-based); after the last one the sync gives up with an error line. */
  retryDelaysMs: number[] = [5_000, 30_000, 120_000, 600_000, 3_600_000];
  /** How long one try may wait for Clerk (one hung call must not hold the loop). */
  timeoutMs = 15_000;
  /** True with CLERK_SECRET_KEY: syncs are stored and run. */
  readonly enabled: boolean;
  /** Where syncs wait (its pollMs and leaseMs are the loop's). */
  readonly outbox: Outbox<SyncJob>;

  private readonly client: ClerkClient | undefined;
  /** Jobs this process is still storing (idle() waits for them too). */
  private readonly adding = new Set<Promise<void>>();

  constructor(
    private readonly config: Config,
    private readonly kv: Deno.Kv,
    private readonly users: Users,
    private readonly log: Logger,
    clock: Clock = systemClock,
  ) {
    const { secretKey, apiUrl } = config.clerk;
    this.client = secretKey ? createClerkClient({ secretKey, apiUrl }) : undefined;
    this.enabled = this.client !== undefined;
    this.outbox = new Outbox<SyncJob>(
      kv,
      keys.clerkSyncOutboxAll()[0],
      {
        name: "clerk sync",
        run: (job, signal) => this.attempt(job.userId, signal),
        retryInMs: (job) => this.retryDelaysMs[job.attempts - 1],
        fields: (job) => ({ userId: job.userId }),
        done: (job) => {
          if (job.attempts > 1) {
            log.info("clerk sync succeeded on retry", {
              userId: job.userId,
              attempt: job.attempts,
            });
          }
        },
      },
      log,
      clock,
    );
  }

  /** Called after a key was created or rotated: stores a sync, which runs within milliseconds. */
  afterProvision(user: UserRecord): void {
    if (!this.enabled) return;
    const adding = retryAtomic(async () => {
      const op = this.kv.atomic();
      this.outbox.add(op, { id: `sync_${crypto.randomUUID()}`, userId: user.id });
      return (await op.commit()).ok;
    }, "clerk sync job").then(
      () => {},
      (err) =>
        this.log.error("clerk sync could not be stored", {
          userId: user.id,
          error: errorText(err),
        }),
    );
    this.adding.add(adding);
    adding.finally(() => this.adding.delete(adding));
  }

  /** Starts this process's loop (no-op without CLERK_SECRET_KEY). */
  start(): void {
    if (this.enabled) this.outbox.start();
  }

  /** Runs due syncs now and waits for them (the cron's nudge, see Outbox.flush). */
  async flush(): Promise<void> {
    if (this.enabled) await this.outbox.flush();
  }

  async close(): Promise<void> {
    await Promise.all(this.adding);
    await this.outbox.close();
  }

  /**
   * Resolves once no sync is waiting in KV, from any process (tests await this instead of
   * sleeping). Rejects after `timeoutMs`.
   */
  async idle(timeoutMs = 5_000): Promise<void> {
    const until = performance.now() + timeoutMs;
    while (this.adding.size || (await this.outbox.pending()) > 0) {
      if (performance.now() > until) throw new Error(`clerk sync still busy after ${timeoutMs} ms`);
      await Promise.race([...this.adding, new Promise((r) => setTimeout(r, 10))]);
    }
    await this.outbox.passDone(); // its last outcome's log line
  }

  /** One try: null when Clerk is up to date, else what went wrong. */
  private async attempt(userId: string, signal: AbortSignal): Promise<AttemptFailure | null> {
    // Clerk's client takes no signal: a shutdown or a hung call stops the wait, and the job is
    // tried again (syncs are idempotent, so a late answer to this try does no harm).
    let stop = () => {};
    let timer: ReturnType<typeof setTimeout> | undefined;
    const stopped = new Promise<AttemptFailure>((resolve) => {
      stop = () => resolve({ error: "the process is shutting down" });
      signal.addEventListener("abort", stop, { once: true });
      timer = setTimeout(
        () => resolve({ error: `Clerk did not answer within ${this.timeoutMs} ms` }),
        this.timeoutMs,
      );
    });
    try {
      return await Promise.race([
        this.sync(userId).then(
          () => null,
          (err) => ({ error: describe(err), permanent: err instanceof PermanentSyncError }),
        ),
        stopped,
      ]);
    } finally {
      clearTimeout(timer);
      signal.removeEventListener("abort", stop);
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
