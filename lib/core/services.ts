/** Everything a request handler needs, built once at start-up from the Config and KV. */
import { SessionVerifier } from "../identity/sessions.ts";
import { ClerkSync } from "../clerk/sync.ts";
import { type Config, secretsOf } from "./config.ts";
import { Gateway } from "../gateway/gateway.ts";
import { Ledger } from "../limits/admission.ts";
import { KeyVault } from "../identity/api_keys.ts";
import { createLogger, type Logger } from "./log.ts";
import { Events } from "../alerts/deliver.ts";
import { localSecret, Users } from "../identity/users.ts";

export interface Services {
  config: Config;
  kv: Deno.Kv;
  users: Users;
  sessions: SessionVerifier;
  clerkSync: ClerkSync;
  log: Logger;
  /** Admission and settlement of every gateway request and shared-mode report. */
  ledger: Ledger;
  /** The GLM gateway (built once: upstream URL, header templates, key cache). */
  gateway: Gateway;
  /** Operator events and alerts to EVENTS_WEBHOOK_URL (lib/alerts/deliver.ts). */
  events: Events;
  /** Stops background work and waits for pending KV commits (shutdown, tests). */
  close(): Promise<void>;
}

export async function createServices(
  config: Config,
  kv: Deno.Kv,
  options: { log?: Logger } = {},
): Promise<Services> {
  const log = options.log ??
    createLogger(secretsOf(config));
  // Local mode has no configured secret: one is generated once and kept in KV (documented).
  const encryptionSecret = config.keyEncryptionSecret ??
    await localSecret(kv, "key_encryption");
  const vault = await KeyVault.fromSecret(encryptionSecret);
  const events = new Events(config, kv, log);
  if (config.events.webhookUrl && !config.events.webhookSecret) {
    log.warn(
      "EVENTS_WEBHOOK_URL is set without EVENTS_WEBHOOK_SECRET: events are sent unsigned, so " +
        "the receiver cannot tell them from forgeries",
    );
  }
  const users = new Users(kv, vault, undefined, events);
  const sessions = new SessionVerifier(config, kv, {
    localSecret: config.localMode ? await localSecret(kv, "session_signing") : undefined,
    log,
  });
  const clerkSync = new ClerkSync(config, kv, users, log);
  if (config.keyMode === "proxy" && config.allowAnyModel && !config.pricing["*"]) {
    log.warn(
      'ALLOWED_MODELS=* but PRICING has no "*" entry: models without a price cost $0, and users ' +
        "with a monthly budget cannot use them",
    );
  }
  const ledger = new Ledger(kv, config, { log });
  const gateway = new Gateway({ config, kv, log, ledger });
  events.start();
  return {
    config,
    kv,
    users,
    sessions,
    clerkSync,
    log,
    ledger,
    gateway,
    events,
    close: async () => {
      await Promise.all([ledger.close(), events.close()]);
    },
  };
}
