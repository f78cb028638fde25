/** Clerk webhooks (CONTRACT §5): Svix signature check, payload schemas, handling each event once. */
import { Webhook } from "svix";
import { z } from "zod";
import type { ClerkSync } from "./sync.ts";
import { type Clock, systemClock } from "../core/clock.ts";
import { AppError, invalidRequest, parseJsonBody } from "../core/errors.ts";
import { keys, retryAtomic } from "../core/kv.ts";
import type { Logger } from "../core/log.ts";
import type { Users } from "../identity/users.ts";
import { clerkId, clerkProfile, type ClerkUserJson, clerkUserSchema } from "./user.ts";

/** Svix retries a message for about three days; a week of memory covers every redelivery. */
const EVENT_MEMORY_MS = 7 * 24 * 3600 * 1000;

const deletedUserSchema = z.object({ id: clerkId, deleted: z.boolean().optional() });

const envelopeSchema = z.object({ type: z.string().min(1).max(100), data: z.unknown() });

type ClerkEvent =
  | { type: "user.created" | "user.updated"; user: ClerkUserJson }
  | { type: "user.deleted"; userId: string }
  | { type: "ignored"; eventType: string };

export type WebhookOutcome = { ok: true; duplicate?: true; ignored?: true };

/** Parses a verified payload; unknown event types come back as "ignored". */
export function parseClerkEvent(rawBody: string): ClerkEvent {
  const envelope = envelopeSchema.safeParse(parseJsonBody(rawBody));
  if (!envelope.success) throw invalidRequest(envelope.error.issues);
  const { type, data } = envelope.data;
  const prefixed = (issues: z.core.$ZodIssue[]) =>
    invalidRequest(issues.map((i) => ({ ...i, path: ["data", ...i.path] })));
  switch (type) {
    case "user.created":
    case "user.updated": {
      const user = clerkUserSchema.safeParse(data);
      if (!user.success) throw prefixed(user.error.issues);
      return { type, user: user.data };
    }
    case "user.deleted": {
      const deleted = deletedUserSchema.safeParse(data);
      if (!deleted.success) throw prefixed(deleted.error.issues);
      return { type, userId: deleted.data.id };
    }
    default:
      return { type: "ignored", eventType: type };
  }
}

/** Verifies, de-duplicates and applies Clerk webhook deliveries. */
export class ClerkWebhooks {
  // One verifier per configured secret: during rotation Clerk may sign with either.
  private readonly verifiers: Webhook[];

  constructor(
    secrets: string[],
    private readonly kv: Deno.Kv,
    private readonly users: Users,
    private readonly clerkSync: ClerkSync,
    private readonly log: Logger,
    private readonly clock: Clock = systemClock,
  ) {
    this.verifiers = secrets.map((secret) => new Webhook(secret));
  }

  async handle(rawBody: string, headers: Headers): Promise<WebhookOutcome> {
    if (!this.verifiers.length) {
      throw new AppError(
        "not_configured",
        "Clerk webhooks are not configured: set CLERK_WEBHOOK_SECRET.",
      );
    }
    const svixId = this.verify(rawBody, headers);
    const event = parseClerkEvent(rawBody);

    // Claim the delivery id atomically: of any number of concurrent or repeated deliveries,
    // exactly one gets past this point.
    const claimKey = keys.webhookEvent(svixId);
    // retryAtomic retries a KV file locked by another process (it throws "database is locked");
    // a failed check is an answer, not a conflict to retry.
    const claimed = await retryAtomic(async () =>
      (await this.kv.atomic()
        .check({ key: claimKey, versionstamp: null })
        .set(claimKey, { type: event.type, receivedAt: new Date(this.clock()).toISOString() }, {
          expireIn: EVENT_MEMORY_MS,
        })
        .commit()).ok, "webhook claim");
    if (!claimed) {
      this.log.info("webhook duplicate skipped", { svixId });
      return { ok: true, duplicate: true };
    }
    try {
      return await this.apply(event, svixId);
    } catch (err) {
      // Forget the claim so Svix's retry of this delivery is processed, not skipped.
      await this.kv.delete(claimKey);
      throw err;
    }
  }

  /** Returns the delivery id once any configured secret verifies the signature. */
  private verify(rawBody: string, headers: Headers): string {
    const svixHeaders = {
      "svix-id": headers.get("svix-id") ?? "",
      "svix-timestamp": headers.get("svix-timestamp") ?? "",
      "svix-signature": headers.get("svix-signature") ?? "",
    };
    const id = svixHeaders["svix-id"];
    if (id && id.length <= 200) {
      for (const verifier of this.verifiers) {
        try {
          // Checks the HMAC and that svix-timestamp is within 5 minutes of now.
          verifier.verify(rawBody, svixHeaders);
          return id;
        } catch {
          // Try the next secret.
        }
      }
    }
    throw new AppError(
      "invalid_signature",
      "Webhook signature is missing, invalid or too old (svix-id, svix-timestamp, svix-signature).",
    );
  }

  /** Provisions a user Clerk reports (user.created, or a user.updated that came first). */
  private async created(
    clerkUser: ClerkUserJson,
    svixId: string,
    type: string,
  ): Promise<WebhookOutcome> {
    const userId = clerkUser.id;
    const profile = clerkProfile(clerkUser);
    try {
      const result = await this.users.provision(userId, profile);
      // A session may have provisioned the user first, without a profile.
      if (!result.created) await this.users.updateProfile(userId, profile);
      else this.clerkSync.afterProvision(result.user);
    } catch (err) {
      if (!(err instanceof AppError && err.code === "user_deleted")) throw err;
      // Acknowledge (an error would make Svix retry for days) but never resurrect the user.
      this.log.info(`webhook ${type} for a deleted user acknowledged`, { svixId, userId });
      return { ok: true };
    }
    this.log.info("webhook applied", { svixId, type, userId });
    return { ok: true };
  }

  private async apply(event: ClerkEvent, svixId: string): Promise<WebhookOutcome> {
    switch (event.type) {
      case "user.created":
        return await this.created(event.user, svixId, event.type);
      case "user.updated": {
        const userId = event.user.id;
        const updated = await this.users.updateProfile(userId, clerkProfile(event.user));
        // Before its user.created (Svix does not promise order, and a user.created that failed is
        // retried later): handled as that, or this newer profile would be lost for good.
        if (updated === null && (await this.users.get(userId)) === null) {
          return await this.created(event.user, svixId, event.type);
        }
        this.log.info("webhook applied", { svixId, type: event.type, userId });
        return { ok: true };
      }
      case "user.deleted":
        await this.users.markDeleted(event.userId);
        this.log.info("webhook applied", { svixId, type: event.type, userId: event.userId });
        return { ok: true };
      case "ignored":
        return { ok: true, ignored: true };
    }
  }
}
