/**
 * Entries of the request log (lib/observe/request_log.ts) as a table: the dashboard's last
 * requests, the operator's per-user page and /admin/requests. Server-rendered. On a narrow
 * screen each row stacks: time and status first, then the figures under their labels.
 */
import type { RequestEntryBody } from "../lib/api_types.ts";
import {
  formatCount,
  formatDuration,
  formatInt,
  formatLogTime,
  formatUsd,
} from "../lib/core/format.ts";

/** The status as a badge: answered, refused by a limit (4xx), or failed (5xx, the client left). */
function StatusBadge({ entry }: { entry: RequestEntryBody }) {
  const tone = entry.status < 400
    ? "status-ok"
    : entry.status < 499
    ? "status-warn"
    : "status-danger";
  return (
    <span class={`status ${tone}`}>
      {entry.status === 499 ? "499 client left" : entry.status}
    </span>
  );
}

const ENDPOINTS: Record<string, string> = {
  "/v1/chat/completions": "chat",
  "/v1/messages": "messages",
  "/v1/embeddings": "embeddings",
  "/v1/messages/count_tokens": "count_tokens",
};

export function RequestTable(
  { entries, showUser = false, emails, keyNames, testId }: {
    entries: RequestEntryBody[];
    /** The operator's listing: a column with the user (linked to their page). */
    showUser?: boolean;
    /** User id → e-mail, where known (the operator's listing shows it instead of the id). */
    emails?: Map<string, string>;
    /** Key id → the connected app's name, where known. */
    keyNames?: Map<string, string>;
    testId: string;
  },
) {
  return (
    <div class="table-wrap request-wrap">
      <table class="request-table" data-testid={testId}>
        <thead>
          <tr>
            <th scope="col">Time (UTC)</th>
            {showUser && <th scope="col">User</th>}
            <th scope="col">Request</th>
            <th scope="col">Status</th>
            <th scope="col" class="num">Tokens in / out</th>
            <th scope="col" class="num">Cost</th>
            <th scope="col" class="num">Took</th>
          </tr>
        </thead>
        <tbody>
          {entries.map((e) => (
            <tr key={`${e.at} ${e.id} ${e.code}`} data-testid="request-row">
              <td class="cell-time" data-label="Time">
                <time dateTime={e.at}>{formatLogTime(e.at)}</time>
                {e.count > 1 && (
                  <span class="muted small request-meta">
                    {formatCount(e.count, "time")} that minute
                  </span>
                )}
              </td>
              {showUser && (
                <td class="cell-user" data-label="User">
                  <a href={`/admin/users/${encodeURIComponent(e.userId)}`}>
                    {emails?.get(e.userId) ?? <code>{e.userId}</code>}
                  </a>
                </td>
              )}
              <td class="cell-request" data-label="Request">
                <code>{e.model ?? e.requestedModel ?? "—"}</code>
                {e.requestedModel && e.model && e.requestedModel !== e.model && (
                  <span class="muted small">
                    {` asked as `}
                    <code>{e.requestedModel}</code>
                  </span>
                )}
                <span class="muted small request-meta">
                  {ENDPOINTS[e.endpoint] ?? e.endpoint}
                  {e.stream ? " · stream" : ""}
                  {e.keyId !== "default" ? ` · ${keyNames?.get(e.keyId) ?? `key ${e.keyId}`}` : ""}
                  {e.client ? ` · ${e.client}` : ""}
                </span>
              </td>
              <td class="cell-status" data-label="Status">
                <StatusBadge entry={e} />
                {e.code && <code class="request-code">{e.code}</code>}
              </td>
              <td class="num" data-label="Tokens in / out">
                {formatInt(e.promptTokens)} / {formatInt(e.completionTokens)}
                {e.estimated && (
                  <span class="muted small" title="No usage came from GLM: estimated">
                    {" "}(estimated)
                  </span>
                )}
              </td>
              <td class="num" data-label="Cost">{formatUsd(e.costUsd)}</td>
              <td class="num" data-label="Took">
                {formatDuration(e.durationMs)}
                {e.queueMs > 0 && (
                  <span class="muted small request-meta">
                    waited {formatDuration(e.queueMs)}
                  </span>
                )}
              </td>
            </tr>
          ))}
        </tbody>
      </table>
    </div>
  );
}

/** A card of a user's latest requests (the dashboard, the operator's per-user page). */
export function RecentRequests(
  { entries, days, more, keyNames, title = "Last requests", testId = "recent-requests" }: {
    entries: RequestEntryBody[];
    /** Key id → the connected app's name, where known. */
    keyNames?: Map<string, string>;
    /** REQUEST_LOG_DAYS (0: the log is off). */
    days: number;
    /** Where the rest is listed, when there is more. */
    more?: { href: string; label: string };
    title?: string;
    testId?: string;
  },
) {
  return (
    <section class="card" aria-labelledby={`${testId}-title`} style={{ marginTop: "1.25rem" }}>
      <div class="card-head">
        <h2 id={`${testId}-title`}>{title}</h2>
        <p class="muted small">
          {days > 0
            ? `Every request and refusal, kept ${
              formatCount(days, "day")
            }. Never a prompt or an answer.`
            : "The request log is off on this server (REQUEST_LOG_DAYS=0)."}
        </p>
      </div>
      {entries.length
        ? <RequestTable entries={entries} keyNames={keyNames} testId={testId} />
        : days > 0 && <p class="muted">No requests yet.</p>}
      {more && (
        <p class="small" style={{ marginTop: "0.75rem" }}>
          <a href={more.href}>{more.label}</a>
        </p>
      )}
    </section>
  );
}
