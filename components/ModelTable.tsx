/**
 * Requests, tokens and cost per model (the dashboard, the operator's per-user page) or per key
 * (the operator's per-user page): one table, whose first column names the row. Where the table is
 * narrow (a phone) each row stacks: the name on its own line, then the three figures under their
 * labels (`data-label`), so no figure is ever cut or an id broken mid-token.
 */
import type { ComponentChildren } from "preact";
import { formatInt, formatTokens, formatUsd } from "../lib/core/format.ts";
import type { KeyUsageRowBody } from "../lib/api_types.ts";

/** What each row shows after its name. */
interface UsageFigures {
  requests: number;
  totalTokens: number;
  costUsd: number;
}

export interface ModelRow extends UsageFigures {
  model: string;
}

function UsageTable<R extends UsageFigures>(props: {
  rows: R[];
  testId: string;
  /** The first column's heading. */
  heading: string;
  rowKey(row: R): string;
  name(row: R): ComponentChildren;
  /** A test id on each row's cost cell. */
  costTestId?: string;
}) {
  return (
    <div class="table-wrap model-wrap">
      <table class="model-table" data-testid={props.testId}>
        <thead>
          <tr>
            <th scope="col">{props.heading}</th>
            <th scope="col" class="num">Requests</th>
            <th scope="col" class="num">Tokens</th>
            <th scope="col" class="num">Cost</th>
          </tr>
        </thead>
        <tbody>
          {props.rows.map((r) => (
            <tr key={props.rowKey(r)}>
              <td class="cell-model">{props.name(r)}</td>
              <td class="num" data-label="Requests">{formatInt(r.requests)}</td>
              <td class="num" data-label="Tokens">{formatTokens(r.totalTokens)}</td>
              <td class="num" data-label="Cost" data-testid={props.costTestId}>
                {formatUsd(r.costUsd)}
              </td>
            </tr>
          ))}
        </tbody>
      </table>
    </div>
  );
}

export function ModelTable({ rows, testId }: { rows: ModelRow[]; testId: string }) {
  return (
    <UsageTable
      rows={rows}
      testId={testId}
      heading="Model"
      rowKey={(m) => m.model}
      name={(m) => <code>{m.model}</code>}
      costTestId="model-cost"
    />
  );
}

/** Per key: the default key, each connected app's, revoked ones used in the span. */
export function KeyTable({ rows, testId }: { rows: KeyUsageRowBody[]; testId: string }) {
  return (
    <UsageTable
      rows={rows}
      testId={testId}
      heading="Key"
      rowKey={(k) => k.keyId}
      name={(k) => k.name}
    />
  );
}
