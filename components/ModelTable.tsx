/** Requests, tokens and cost per model: the dashboard and the operator's per-user page. */
import { formatInt, formatTokens, formatUsd } from "../lib/core/format.ts";

export interface ModelRow {
  model: string;
  requests: number;
  totalTokens: number;
  costUsd: number;
}

export function ModelTable({ rows, testId }: { rows: ModelRow[]; testId: string }) {
  return (
    <div class="table-wrap">
      <table data-testid={testId}>
        <thead>
          <tr>
            <th scope="col">Model</th>
            <th scope="col" class="num">Requests</th>
            <th scope="col" class="num">Tokens</th>
            <th scope="col" class="num">Cost</th>
          </tr>
        </thead>
        <tbody>
          {rows.map((m) => (
            <tr key={m.model}>
              <td>
                <code>{m.model}</code>
              </td>
              <td class="num">{formatInt(m.requests)}</td>
              <td class="num">{formatTokens(m.totalTokens)}</td>
              <td class="num">{formatUsd(m.costUsd)}</td>
            </tr>
          ))}
        </tbody>
      </table>
    </div>
  );
}
