/**
 * Requests, tokens and cost per key (the default key, each connected app's, revoked ones used in
 * the span): the operator's per-user page. Laid out as ModelTable, so it stacks on a phone too.
 */
import { formatInt, formatTokens, formatUsd } from "../lib/core/format.ts";
import type { KeyUsageRowBody } from "../lib/api_types.ts";

export function KeyTable({ rows, testId }: { rows: KeyUsageRowBody[]; testId: string }) {
  return (
    <div class="table-wrap model-wrap">
      <table class="model-table" data-testid={testId}>
        <thead>
          <tr>
            <th scope="col">Key</th>
            <th scope="col" class="num">Requests</th>
            <th scope="col" class="num">Tokens</th>
            <th scope="col" class="num">Cost</th>
          </tr>
        </thead>
        <tbody>
          {rows.map((k) => (
            <tr key={k.keyId}>
              <td class="cell-model">{k.name}</td>
              <td class="num" data-label="Requests">{formatInt(k.requests)}</td>
              <td class="num" data-label="Tokens">{formatTokens(k.totalTokens)}</td>
              <td class="num" data-label="Cost">{formatUsd(k.costUsd)}</td>
            </tr>
          ))}
        </tbody>
      </table>
    </div>
  );
}
