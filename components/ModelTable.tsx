/**
 * Requests, tokens and cost per model: the dashboard and the operator's per-user page. Where the
 * table is narrow (a phone) each row stacks: the model id on its own line, then the three figures
 * under their labels (`data-label`), so no figure is ever cut or an id broken mid-token.
 */
import { formatInt, formatTokens, formatUsd } from "../lib/core/format.ts";

export interface ModelRow {
  model: string;
  requests: number;
  totalTokens: number;
  costUsd: number;
}

export function ModelTable({ rows, testId }: { rows: ModelRow[]; testId: string }) {
  return (
    <div class="table-wrap model-wrap">
      <table class="model-table" data-testid={testId}>
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
              <td class="cell-model">
                <code>{m.model}</code>
              </td>
              <td class="num" data-label="Requests">{formatInt(m.requests)}</td>
              <td class="num" data-label="Tokens">{formatTokens(m.totalTokens)}</td>
              <td class="num" data-label="Cost" data-testid="model-cost">{formatUsd(m.costUsd)}</td>
            </tr>
          ))}
        </tbody>
      </table>
    </div>
  );
}
