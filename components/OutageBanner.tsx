/**
 * The banner at the top of /admin while the service cannot serve anyone: no GLM key in service
 * (every key of GLM_API_KEY refused — rejected, or its balance spent). It says since when, how many
 * requests it has refused, each key's reason, and what fixes it; users meanwhile get 503 and their
 * dashboards say the service is unavailable (not their key).
 */
import { formatCount, formatDateTime, formatWait } from "../lib/core/format.ts";
import type { Outage } from "../lib/limits/upstream/outage.ts";

export interface OutageBannerProps {
  outage: Outage;
  /** Requests refused since the outage began. */
  refused: number;
  now: number;
}

const REASON: Record<string, string> = {
  balance_exhausted: "balance exhausted or plan expired",
  key_rejected: "key rejected",
};

export function OutageBanner({ outage, refused, now }: OutageBannerProps) {
  if (outage.reason !== "no_key_in_service") return null;
  const balance = outage.keys.some((k) => k.reason === "balance_exhausted");
  const next = Math.min(...outage.keys.map((k) => k.coolingUntil ?? Infinity));
  return (
    <section
      class="outage-banner"
      role="alert"
      aria-labelledby="outage-title"
      data-testid="outage-banner"
    >
      <h2 id="outage-title">
        {balance ? "GLM balance exhausted: " : "GLM refuses every key: "}
        the service is down for every user
      </h2>
      <p>
        {outage.since !== null
          ? (
            <>
              Since <strong data-testid="outage-since">{formatDateTime(outage.since)}</strong>{" "}
              ({formatWait(now - outage.since)} ago),{" "}
            </>
          )
          : null}
        <strong data-testid="outage-refused">{formatCount(refused, "request")}</strong>{" "}
        refused with 503 upstream_unavailable (nothing counted against users).
      </p>
      <ul class="outage-keys">
        {outage.keys.map((k) => (
          <li key={k.hint}>
            Key <code>…{k.hint}</code>: {REASON[k.reason ?? ""] ?? k.reason ?? "left out"}
          </li>
        ))}
      </ul>
      <p class="small">
        {balance
          ? "Top up the GLM account (or renew its plan); "
          : "Check GLM_API_KEY in the GLM console; "}
        each key is tried again when its cool-down ends
        {Number.isFinite(next) ? `, the next at ${formatDateTime(next)}` : ""}.
      </p>
    </section>
  );
}
