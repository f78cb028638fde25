/**
 * The "Upstream" card at the top of /admin: the operator's GLM account as Keyway sees it — slots
 * in use and requests waiting per model (UPSTREAM_CONCURRENCY), each pool key (its last 4
 * characters: in service or left out, in flight per model), the queue wait over the last
 * hour, and the alerts sent lately. GLM has no balance API and bills a day late, so this is the
 * operator's real-time view.
 */
import { formatCount, formatDateTime, formatInt } from "../lib/core/format.ts";
import type { UpstreamHealth as Health } from "../lib/limits/upstream/slots.ts";

export interface AlertLine {
  id: string;
  type: string;
  at: string;
  message: string;
}

export interface UpstreamHealthProps {
  health: Health;
  /** A cap is configured for some model (UPSTREAM_CONCURRENCY). */
  capped: boolean;
  alerts: AlertLine[];
  /** EVENTS_WEBHOOK_URL is set (alerts are delivered as well as listed). */
  eventsOn: boolean;
}

const waitText = (ms: number | null) =>
  ms === null ? "—" : ms < 1000 ? `≤ ${formatInt(ms)} ms` : `≤ ${formatInt(ms / 1000)} s`;

export function UpstreamHealth({ health, capped, alerts, eventsOn }: UpstreamHealthProps) {
  const models = health.models.filter((m) => m.inFlight > 0 || m.waiting > 0 || m.cap > 0);
  const noneInService = health.keys.length > 0 && health.keys.every((k) => k.coolingUntil !== null);
  return (
    <section
      class="card upstream"
      aria-labelledby="upstream-title"
      data-testid="upstream-health"
      style={{ marginBottom: "1.25rem" }}
    >
      <div class="card-head">
        <h2 id="upstream-title">Upstream (GLM account)</h2>
        <p class="muted small">now, and the last hour</p>
      </div>
      {noneInService && (
        <p class="notice notice-error" role="alert" data-testid="no-key-in-service">
          <strong>No GLM key is in service.</strong> GLM refused every key of{" "}
          <code>GLM_API_KEY</code>; every request gets 503 until one is fixed (a key is tried again
          when its cool-down ends).
        </p>
      )}
      {!capped && (
        <p class="muted small">
          No <code>UPSTREAM_CONCURRENCY</code>{" "}
          is set: requests go to GLM without a cap, and GLM answers <code>1302</code>{" "}
          (which users get as 503 upstream_busy) when your account's concurrency is exceeded.
        </p>
      )}
      {models.length > 0
        ? (
          <div class="table-wrap">
            <table>
              <caption class="sr-only">Requests in flight to GLM and waiting, per model</caption>
              <thead>
                <tr>
                  <th scope="col">Model</th>
                  <th scope="col" class="num">In flight</th>
                  <th scope="col" class="num">Waiting</th>
                </tr>
              </thead>
              <tbody>
                {models.map((m) => (
                  <tr key={m.model}>
                    <td>
                      <code>{m.model}</code>
                    </td>
                    <td class="num">
                      {formatInt(m.inFlight)}
                      {m.cap > 0 ? ` of ${formatInt(m.cap)}` : ""}
                    </td>
                    <td class="num">{formatInt(m.waiting)}</td>
                  </tr>
                ))}
              </tbody>
            </table>
          </div>
        )
        : capped && <p class="muted small">Nothing in flight to GLM right now.</p>}
      {health.keys.length > 1 && (
        <div class="table-wrap">
          <table data-testid="pool-keys">
            <caption class="sr-only">The GLM keys of the pool</caption>
            <thead>
              <tr>
                <th scope="col">GLM key</th>
                <th scope="col">State</th>
                <th scope="col">In flight</th>
              </tr>
            </thead>
            <tbody>
              {health.keys.map((k) => (
                <tr key={k.hint}>
                  <td>
                    <code>…{k.hint}</code>
                  </td>
                  <td>
                    {k.coolingUntil === null ? "in service" : (
                      <span class="text-warn">
                        left out until {formatDateTime(new Date(k.coolingUntil).toISOString())}
                        {k.reason ? ` (${k.reason.replace("_", " ")})` : ""}
                      </span>
                    )}
                  </td>
                  <td class="small">
                    {k.inFlight.length
                      ? k.inFlight.map((f) => `${f.model}: ${formatInt(f.n)}`).join(", ")
                      : "—"}
                  </td>
                </tr>
              ))}
            </tbody>
          </table>
        </div>
      )}
      {capped && (
        <p class="small" data-testid="queue-wait">
          Wait for a slot, last hour: p50 {waitText(health.waits.p50Ms)}, p99{" "}
          {waitText(health.waits.p99Ms)}{" "}
          <span class="muted">({formatCount(health.waits.count, "request")})</span>
        </p>
      )}
      <h3 class="small" style={{ marginTop: "0.75rem" }}>Recent alerts</h3>
      {!eventsOn && (
        <p class="muted small">
          Alerts are listed here and logged; set <code>EVENTS_WEBHOOK_URL</code>{" "}
          to have them sent to your backend too.
        </p>
      )}
      {alerts.length === 0
        ? <p class="muted small">No alerts in the last 24 hours.</p>
        : (
          <ul class="alert-list" data-testid="recent-alerts">
            {alerts.map((a) => (
              <li key={a.id}>
                <code>{a.type}</code> <span class="muted small">{formatDateTime(a.at)}</span>
                <br />
                <span class="small">{a.message}</span>
              </li>
            ))}
          </ul>
        )}
    </section>
  );
}
