/**
 * Operator events (CONTRACT §7 Events): lifecycle events and alerts POSTed to EVENTS_WEBHOOK_URL,
 * signed the Standard Webhooks way (svix) and retried with back-off until the receiver answers
 * 2xx.
 *
 * Delivery goes through the KV outbox (lib/core/outbox.ts), so an event rides in the same atomic
 * commit as the change it reports: it exists if and only if that change landed, once.
 */
import { Webhook } from "svix";
import type { Config, KeyMode } from "../core/config.ts";
import { type Clock, systemClock } from "../core/clock.ts";
import { keys, retryAtomic } from "../core/kv.ts";
import { type Logger, redacted } from "../core/log.ts";
import { formatUsd } from "../core/format.ts";
import type { UserRecord } from "../identity/user_record.ts";
import { type AttemptFailure, errorText, Outbox, type OutboxJob } from "../core/outbox.ts";

/** What an upstream alert carries (the gateway fills it from the refused upstream answer). */
export interface UpstreamAlertFields {
  /** The model the refused request asked for (after alias resolution). */
  model: string;
  /** The upstream's HTTP status. */
  status: number;
  /** GLM's business code (`1113`, `1302`, …), when the answer carried one. */
  upstreamCode: string | null;
  /** The upstream's own error text (trimmed; the master key is never echoed). */
  upstreamMessage: string;
  /** The pool key GLM refused: its last 4 characters (key_rejected, balance_exhausted). */
  keyHint?: string;
}

/** No pool key is in service: every request gets 503 until one is. */
export interface UnavailableFields {
  model: string;
  /** The pool keys, each as its last 4 characters, all cooling down. */
  keyHints: string[];
}

/** The fields of each event type, besides `type`, `at` and `message` (CONTRACT §7 Events). */
export interface EventFields {
  /** Once per user: the commit that created the user's key. Never carries the key. */
  "user.provisioned": {
    userId: string;
    email: string | null;
    firstName: string | null;
    lastName: string | null;
    /** The key's first characters (proxy mode); null in shared mode, where no kw_ key is used. */
    keyPrefix: string | null;
    mode: KeyMode;
  };
  "user.deleted": { userId: string };
  /** `by`: the operator's user id when an admin made the change. */
  "user.disabled": { userId: string; by: string | null };
  "user.enabled": { userId: string; by: string | null };
  "key.rotated": { userId: string; keyPrefix: string | null };
  /** A connected app's key (CONTRACT §7): created at an approval, revoked by its user. */
  "key.created": { userId: string; keyId: string; name: string; keyPrefix: string };
  "key.revoked": { userId: string; keyId: string; name: string; keyPrefix: string };
  /** Once per user, month and percent. */
  "budget.threshold": {
    userId: string;
    percent: 80 | 100;
    budgetUsd: number;
    spentUsd: number;
    /** The UTC month (YYYY-MM) the spend belongs to. */
    month: string;
  };
  "upstream.key_rejected": UpstreamAlertFields;
  "upstream.balance_exhausted": UpstreamAlertFields;
  "upstream.throttled": UpstreamAlertFields;
  "upstream.unavailable": UnavailableFields;
}

export type EventType = keyof EventFields;
/** Sent at most once per type, subject and hour (budget.threshold: once per user and month). */
export type AlertType =
  | "budget.threshold"
  | "upstream.key_rejected"
  | "upstream.balance_exhausted"
  | "upstream.throttled"
  | "upstream.unavailable";
export type LifecycleType = Exclude<EventType, AlertType>;

/** An event before it is stamped: its type and that type's fields. */
export type KeywayEvent = { [T in EventType]: { type: T } & EventFields[T] }[EventType];
export type LifecycleEvent = Extract<KeywayEvent, { type: LifecycleType }>;

/** The JSON body a receiver gets. */
export type EventBody = KeywayEvent & { at: string; message: string };

/** "duplicate": already sent (here or by another process); "failed": KV refused (logged). */
export type AlertOutcome = "sent" | "duplicate" | "failed";

/** An alert as /admin lists it: the body plus its webhook-id. */
export type RecentAlert = EventBody & { id: string };

/** One event waiting in the outbox; `body` is the exact JSON text that is signed and sent. */
interface EventJob {
  type: EventType;
  body: string;
}

const HOUR_MS = 3_600_000;
const DAY_MS = 24 * HOUR_MS;
/** Longest upstream error text kept in an alert. */
const UPSTREAM_MESSAGE_MAX = 500;

/** Signs, stores and delivers operator events. With no EVENTS_WEBHOOK_URL it stores no event. */
export class Events {
  /** Wait before retry n is retryBaseMs × 2^(n−1), at most retryMaxMs (1 s, 2 s, 4 s … 1 h). */
  retryBaseMs = 1_000;
  retryMaxMs = HOUR_MS;
  /** An event not delivered this long after it was created is dropped with an error line. */
  giveUpAfterMs = DAY_MS;
  /** How long a receiver may take to answer one delivery (less than the outbox's leaseMs). */
  timeoutMs = 10_000;
  /** How long a user.provisioned without an e-mail waits for the profile (see add()). */
  profileWaitMs = 5_000;
  /** Where events wait for delivery (its pollMs and leaseMs are the loop's). */
  readonly outbox: Outbox<EventJob>;

  /** True when EVENTS_WEBHOOK_URL is set: events are stored and delivered. */
  readonly enabled: boolean;
  private readonly url: string | undefined;
  private readonly signer: Webhook | undefined;
  private readonly masterKeys: string[];
  /** Local mode: sessions carry the e-mail, so no provisioned user waits for a profile. */
  private readonly localMode: boolean;

  constructor(
    private readonly config: Config,
    private readonly kv: Deno.Kv,
    private readonly log: Logger,
    private readonly clock: Clock = systemClock,
  ) {
    this.url = config.events.webhookUrl;
    this.enabled = this.url !== undefined;
    const secret = config.events.webhookSecret;
    this.signer = secret ? new Webhook(secret) : undefined;
    this.masterKeys = config.glm.apiKeys;
    this.localMode = config.localMode;
    this.outbox = new Outbox<EventJob>(
      kv,
      keys.eventOutboxAll()[0],
      {
        name: "event delivery",
        run: async (job, signal) => this.post(await this.completed(job), signal),
        retryInMs: (job) => {
          const wait = Math.min(this.retryBaseMs * 2 ** (job.attempts - 1), this.retryMaxMs);
          return this.clock() + wait - job.createdAt > this.giveUpAfterMs ? undefined : wait;
        },
        fields: (job) => ({ eventId: job.id, type: job.type }),
        done: (job) =>
          log.info("event delivered", { eventId: job.id, type: job.type, attempt: job.attempts }),
      },
      log,
      clock,
    );
  }

  /** Proxy or shared: what user.provisioned reports as `mode`. */
  get keyMode(): KeyMode {
    return this.config.keyMode;
  }

  /**
   * Adds a lifecycle event to an atomic operation: it is delivered if and only if that commit
   * lands (one mutation; nothing when events are off).
   */
  add(op: Deno.AtomicOperation, event: LifecycleEvent): Deno.AtomicOperation {
    if (!this.enabled) return op;
    const now = this.clock();
    // A user provisioned by their first dashboard visit, before Clerk's user.created: the e-mail
    // and names arrive a moment later (that webhook, or the Clerk sync). The event waits for them
    // and is completed from the user's record when it is sent.
    const waits = event.type === "user.provisioned" && event.email === null && !this.localMode;
    this.outbox.add(op, this.jobOf(event, now), waits ? now + this.profileWaitMs : now);
    return op;
  }

  /**
   * Sends an alert at most once per (type, subject) and clock hour, across processes. Returns
   * whether this call sent it. The alert is logged and kept for /admin (recentAlerts) even when
   * no EVENTS_WEBHOOK_URL is set.
   */
  async alert<T extends AlertType>(
    type: T,
    fields: EventFields[T],
    subject = "*",
  ): Promise<boolean> {
    const hour = Math.floor(this.clock() / HOUR_MS);
    const outcome = await this.alertOnce(
      keys.alertSent(type, subject, hour),
      2 * HOUR_MS,
      { type, ...fields } as KeywayEvent,
    );
    return outcome === "sent";
  }

  /**
   * Sends an alert unless `claimKey` exists, and creates that key in the same commit (so it is
   * once across processes); the claim expires after `claimForMs`. Never throws: a KV failure is
   * logged and reported as "failed", so a caller on a user's request path cannot fail because of
   * an alert.
   */
  async alertOnce(
    claimKey: Deno.KvKey,
    claimForMs: number,
    event: KeywayEvent,
  ): Promise<AlertOutcome> {
    const clean = this.scrubbed(event);
    let sent = false;
    try {
      sent = await retryAtomic(async () => {
        const now = this.clock();
        const job = this.jobOf(clean, now);
        const body = JSON.parse(job.body) as EventBody;
        const op = this.kv.atomic()
          .check({ key: claimKey, versionstamp: null })
          .set(claimKey, { eventId: job.id, at: now }, { expireIn: claimForMs })
          .set(keys.alertLog(now, job.id), { id: job.id, ...body } satisfies RecentAlert, {
            expireIn: DAY_MS + HOUR_MS,
          });
        if (this.enabled) this.outbox.add(op, job, now);
        // A lock held by another process throws (retried); a failed check means already sent.
        const res = await op.commit();
        if (res.ok) this.log.warn(`alert ${clean.type}`, { eventId: job.id, ...clean });
        return res.ok;
      }, `alert ${event.type}`);
    } catch (err) {
      this.log.error("alert could not be stored", { type: event.type, error: errorText(err) });
      return "failed";
    }
    if (!sent) return "duplicate";
    if (this.enabled) this.outbox.wake();
    return "sent";
  }

  /** Alerts of the last 24 hours, newest first. */
  async recentAlerts(limit = 50): Promise<RecentAlert[]> {
    const since = this.clock() - DAY_MS;
    const alerts: RecentAlert[] = [];
    const iter = this.kv.list<RecentAlert>(
      { prefix: keys.alertLogAll(), start: keys.alertLog(since, "") },
      { reverse: true, limit },
    );
    for await (const entry of iter) alerts.push(entry.value);
    return alerts;
  }

  /** Starts this process's delivery loop (no-op when events are off). */
  start(): void {
    if (this.enabled) this.outbox.start();
  }

  /** Runs a delivery pass now and waits for it (the cron's nudge, see Outbox.flush). */
  async flush(): Promise<void> {
    if (this.enabled) await this.outbox.flush();
  }

  /** Stops the loop; deliveries in flight are cut and retried later (by any process). */
  async close(): Promise<void> {
    await this.outbox.close();
  }

  private jobOf(event: KeywayEvent, now: number): EventJob & { id: string } {
    const at = new Date(now).toISOString();
    // type, at and message first: the order a person reading the raw body expects.
    const { type, ...fields } = event;
    const body = { type, at, message: describe(event), ...fields };
    return {
      id: `evt_${crypto.randomUUID().replaceAll("-", "")}`,
      type: event.type,
      body: JSON.stringify(body),
    };
  }

  /**
   * A user.provisioned sent without an e-mail, completed from the user's record when it is known
   * by now (the webhook or the Clerk sync brought it). Other events as they are.
   */
  private async completed(job: OutboxJob<EventJob>): Promise<OutboxJob<EventJob>> {
    if (job.type !== "user.provisioned") return job;
    const body = JSON.parse(job.body) as EventBody & { type: "user.provisioned" };
    if (body.email !== null) return job;
    const user = (await this.kv.get<UserRecord>(keys.user(body.userId))).value;
    if (!user?.email || user.status === "deleted") return job;
    const full = { ...body, email: user.email, firstName: user.firstName, lastName: user.lastName };
    full.message = describe(full);
    return { ...job, body: JSON.stringify(full) };
  }

  /** Upstream texts are trimmed, and never carry the master key even if GLM echoed it. */
  private scrubbed(event: KeywayEvent): KeywayEvent {
    if (!("upstreamMessage" in event)) return event;
    let text = event.upstreamMessage.slice(0, UPSTREAM_MESSAGE_MAX);
    for (const key of this.masterKeys) text = redacted(text, key);
    return { ...event, upstreamMessage: text };
  }

  /** One POST; null on 2xx, else what went wrong (for the log). */
  private async post(
    event: OutboxJob<EventJob>,
    stopping: AbortSignal,
  ): Promise<AttemptFailure | null> {
    const now = new Date(this.clock());
    // The id stays the same on every retry so receivers can drop repeats; the timestamp (and so
    // the signature) is the attempt's, as receivers refuse stale timestamps.
    const headers: Record<string, string> = {
      "content-type": "application/json",
      "user-agent": "Keyway-Events/1",
      "webhook-id": event.id,
      "webhook-timestamp": String(Math.floor(now.getTime() / 1000)),
    };
    if (this.signer) headers["webhook-signature"] = this.signer.sign(event.id, now, event.body);
    const aborter = new AbortController();
    const stop = () => aborter.abort();
    stopping.addEventListener("abort", stop);
    const timer = setTimeout(stop, this.timeoutMs);
    try {
      const res = await fetch(this.url!, {
        method: "POST",
        headers,
        body: event.body,
        signal: aborter.signal,
        // A redirect is not an answer: a receiver that moved must be reconfigured.
        redirect: "manual",
      });
      await res.body?.cancel();
      return res.ok ? null : { error: `the receiver answered HTTP ${res.status}` };
    } catch (err) {
      if (stopping.aborted) return { error: "the process is shutting down" };
      if (aborter.signal.aborted) return { error: `no answer within ${this.timeoutMs} ms` };
      return { error: errorText(err) };
    } finally {
      clearTimeout(timer);
      stopping.removeEventListener("abort", stop);
    }
  }
}

/** Dollars as the operator reads them; tiny amounts keep two significant digits ($0.000036). */
const usd = (n: number) => n > 0 && n < 0.01 ? `$${Number(n.toPrecision(2))}` : formatUsd(n);

/** The event's sentence for people (`message`). */
function describe(event: KeywayEvent): string {
  const by = (id: string | null) => id ? ` by operator ${id}` : "";
  switch (event.type) {
    case "user.provisioned":
      return `${event.email ?? event.userId} signed up and got a key` +
        (event.keyPrefix ? ` (${event.keyPrefix}…)` : "") + ".";
    case "user.deleted":
      return `User ${event.userId} was deleted: keys revoked, e-mail and names dropped.`;
    case "user.disabled":
      return `User ${event.userId} was disabled${by(event.by)}.`;
    case "user.enabled":
      return `User ${event.userId} was enabled${by(event.by)}.`;
    case "key.rotated":
      return `User ${event.userId} rotated their key` +
        (event.keyPrefix ? ` (now ${event.keyPrefix}…)` : "") + "; the old one stopped working.";
    case "key.created":
      return `User ${event.userId} connected "${event.name}" with a new key (${event.keyPrefix}…).`;
    case "key.revoked":
      return `User ${event.userId} revoked the key of "${event.name}" (${event.keyPrefix}…); ` +
        "it stopped working.";
    case "budget.threshold":
      return `User ${event.userId} has spent ${usd(event.spentUsd)} of their ` +
        `${usd(event.budgetUsd)} budget for ${event.month} (${event.percent}%).`;
    case "upstream.key_rejected":
      return `GLM refused the operator's master key${hint(event.keyHint)} (HTTP ${event.status} ` +
        `on ${event.model}); it is left out of the pool for a while, and users get 503 once ` +
        `no key is left in service.`;
    case "upstream.balance_exhausted":
      return `The GLM account${hint(event.keyHint)} is out of balance (code ` +
        `${event.upstreamCode ?? "none"} on ${event.model}); its key is left out of the pool ` +
        `until it is topped up, and users get 503 once no key is left in service.`;
    case "upstream.unavailable":
      return `No GLM key is in service (${event.keyHints.map((h) => `…${h}`).join(", ")} all ` +
        `refused): every request on ${event.model} and other models gets 503 until one is fixed.`;
    case "upstream.throttled":
      return `GLM keeps throttling requests (HTTP ${event.status}, code ` +
        `${event.upstreamCode ?? "none"} on ${event.model}); users get 503 upstream_busy.`;
  }
}

/** " (key …abcd)" for a pool key's hint, or nothing. */
function hint(keyHint: string | undefined): string {
  return keyHint ? ` (key …${keyHint})` : "";
}
