/**
 * Whether the service can serve at all (CONTRACT §6): with no GLM_API_KEY every gateway request
 * gets 503 not_configured, and with every pool key refused by GLM (the key rejected, the balance
 * spent) 503 upstream_unavailable. Users see it on the dashboard as "not your key"; the operator
 * sees it as a banner at the top of /admin with since when and how many requests it refused.
 */
import type { Config } from "../../core/config.ts";
import type { ServiceStateBody } from "../../api_types.ts";
import type { KeyPool, PoolKeyStatus } from "./pool.ts";

export interface Outage {
  reason: "not_configured" | "no_key_in_service";
  /** When the last key in service was left out (ms since the epoch); null when not known. */
  since: number | null;
  /** Every pool key: why and until when it is left out. */
  keys: PoolKeyStatus[];
}

/** The account-wide outage now, or null while some key is in service. */
export async function currentOutage(config: Config, pool: KeyPool): Promise<Outage | null> {
  if (!config.glm.apiKeys.length) return { reason: "not_configured", since: null, keys: [] };
  if ((await pool.inService()).length) return null;
  const keys = await pool.status();
  // The refresh inside status() may have seen a key come back meanwhile.
  if (keys.some((k) => k.coolingUntil === null)) return null;
  const starts = keys.map((k) => k.since).filter((s): s is number => s !== null);
  return { reason: "no_key_in_service", since: starts.length ? Math.max(...starts) : null, keys };
}

/** What a user's dashboard says of the service (nothing of the keys themselves). */
export async function serviceState(config: Config, pool: KeyPool): Promise<ServiceStateBody> {
  const outage = await currentOutage(config, pool);
  if (!outage) return { status: "ok" };
  return {
    status: "unavailable",
    reason: outage.reason,
    since: outage.since === null ? null : new Date(outage.since).toISOString(),
  };
}
