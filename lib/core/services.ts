/** Everything a request handler needs, built once at start-up from the Config and KV. */
import { SessionVerifier } from "../identity/sessions.ts";
import { ClerkSync } from "../clerk/sync.ts";
import { type Config, secretsOf } from "./config.ts";
import { Gateway } from "../gateway/gateway.ts";
import { Ledger } from "../limits/admission.ts";
import { UpstreamSlots } from "../limits/upstream/slots.ts";
import { KeyPool } from "../limits/upstream/pool.ts";
import { checkBudget } from "../reports/budget_alerts.ts";
import { keys, u64 } from "./kv.ts";
import { KeyVault } from "../identity/api_keys.ts";
import { createLogger, type Logger } from "./log.ts";
import { Events } from "../alerts/deliver.ts";
import { localSecret, Users } from "../identity/users.ts";
import { ConnectFlows, type ConnectOptions } from "../identity/connect.ts";
import { utcMonth } from "./utc.ts";
import { type Clock, systemClock } from "./clock.ts";
import { CacheEpoch } from "../identity/cache_epoch.ts";
import { RequestLog } from "../observe/request_log.ts";
import { Metrics } from "../observe/metrics.ts";

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
  /** Requests in flight to GLM per model (UPSTREAM_CONCURRENCY). */
  slots: UpstreamSlots;
  /** PKCE and device-code flows that hand an editor the user's key (CONTRACT §5). */
  connect: ConnectFlows;
  /** Operator events and alerts to EVENTS_WEBHOOK_URL (lib/alerts/deliver.ts). */
  events: Events;
  /** The time every service above reads. */
  clock: Clock;
  /** The per-request log (lib/observe/request_log.ts). */
  requestLog: RequestLog;
  /** Prometheus metrics for GET /metrics (lib/observe/metrics.ts). */
  metrics: Metrics;
  /** Stops background work and waits for pending KV commits (shutdown, tests). */
  close(): Promise<void>;
}

export async function createServices(
  config: Config,
  kv: Deno.Kv,
  /** `connect` shortens the flows' lifetimes and intervals in tests; `clock` fakes the time. */
  options: { log?: Logger; connect?: ConnectOptions; clock?: Clock } = {},
): Promise<Services> {
  const clock = options.clock ?? systemClock;
  const log = options.log ??
    createLogger(secretsOf(config), { clock });
  // Local mode has no configured secret: one is generated once and kept in KV (documented).
  const encryptionSecret = config.keyEncryptionSecret ??
    await localSecret(kv, "key_encryption");
  const vault = await KeyVault.fromSecret(encryptionSecret);
  const events = new Events(config, kv, log, clock);
  if (config.events.webhookUrl && !config.events.webhookSecret) {
    log.warn(
      "EVENTS_WEBHOOK_URL is set without EVENTS_WEBHOOK_SECRET: events are sent unsigned, so " +
        "the receiver cannot tell them from forgeries",
    );
  }
  const users = new Users(
    kv,
    vault,
    new CacheEpoch(kv, undefined, undefined, clock),
    events,
    clock,
  );
  const sessions = new SessionVerifier(config, kv, {
    localSecret: config.localMode ? await localSecret(kv, "session_signing") : undefined,
    log,
    clock,
  });
  const clerkSync = new ClerkSync(config, kv, users, log, clock);
  if (config.keyMode === "proxy" && config.allowAnyModel && !config.pricing["*"]) {
    log.warn(
      'ALLOWED_MODELS=* but PRICING has no "*" entry: models without a price cost $0, and users ' +
        "with a monthly budget cannot use them",
    );
  }
  const metrics = new Metrics(config);
  const requestLog = new RequestLog(kv, config, {
    clock,
    log,
    onCommit: (ms) => metrics.commit(ms),
  });
  const ledger = new Ledger(kv, config, {
    log,
    clock,
    onCommit: (ms) => metrics.commit(ms),
    // budget.threshold at 80 % and 100 %, once each per user and month across processes.
    onBudgetCharged: async (userId, budgetUsd) => {
      const month = utcMonth(clock());
      const spent = await kv.get(keys.spendByMonth(userId, month));
      await checkBudget(events, { id: userId }, u64(spent.value) / 1e9, budgetUsd, month);
    },
  });
  const slots = new UpstreamSlots(kv, config, ledger, log, new KeyPool(kv, config, clock), clock);
  metrics.watch({
    kv,
    poolKeys: () => slots.pool.keys,
    activeLeases: () => ledger.activeLeases,
    clock,
  });
  const gateway = new Gateway({
    config,
    kv,
    log,
    ledger,
    slots,
    clock,
    requestLog,
    metrics,
    notify: (alert, { model, status, upstreamCode, message, keyHint, keyHints }) => {
      if (alert === "upstream.unavailable") {
        events.alert(alert, { model, keyHints: keyHints ?? [] });
      } else {
        // Per pool key: a second key refused within the hour is its own alert.
        events.alert(
          alert,
          { model, status, upstreamCode, upstreamMessage: message, keyHint },
          keyHint ?? "*",
        );
      }
    },
  });
  events.start();
  clerkSync.start();
  return {
    config,
    kv,
    users,
    sessions,
    clerkSync,
    log,
    ledger,
    gateway,
    slots,
    connect: new ConnectFlows(kv, { now: clock, ...options.connect }),
    events,
    clock,
    requestLog,
    metrics,
    close: async () => {
      slots.close();
      await Promise.all([ledger.close(), events.close(), clerkSync.close()]);
      await requestLog.close();
    },
  };
}
