/** Aligned plain-text tables for the CLI tasks (`report`, `summarize`). */

/** Rows padded to one width: text columns left-aligned, the rest right-aligned; ruled totals. */
export function renderTable(
  head: string[],
  rows: string[][],
  total: string[],
  textColumns: number,
): string[] {
  const all = [head, ...rows, total];
  const widths = head.map((_, c) => Math.max(...all.map((r) => [...r[c]].length)));
  const line = (r: string[]) =>
    r.map((cell, c) => {
      const pad = " ".repeat(widths[c] - [...cell].length);
      return c < textColumns ? cell + pad : pad + cell;
    }).join("  ").trimEnd();
  const rule = widths.map((w) => "─".repeat(w)).join("  ");
  return [line(head), rule, ...rows.map(line), rule, line(total)];
}

/** `text` cut to `max` characters, with an ellipsis when cut. */
export function clip(text: string, max: number): string {
  const chars = [...text];
  return chars.length > max ? chars.slice(0, max - 1).join("") + "…" : text;
}
