/**
 * The recipes as the README shows them: one `####` heading per tool, its intro, how it was
 * checked, and each snippet in a fenced block. `deno task recipes` writes this between the
 * README's markers; tests/recipes/readme_test.ts fails when the README differs from it.
 */
import type { Recipe } from "./recipes.ts";

export const README_START = "<!-- recipes:start (deno task recipes writes this part) -->";
export const README_END = "<!-- recipes:end -->";

/** The README block (without its markers) for `list`. */
export function recipesMarkdown(list: Recipe[]): string {
  return list.map((r) =>
    [
      `#### ${r.label}`,
      "",
      `${r.intro} _Checked: ${r.checked}._`,
      "",
      ...r.files.flatMap((f) => [
        `${f.path ? `\`${f.path}\`` : f.title}:`,
        "",
        "```" + (f.lang === "text" ? "" : f.lang),
        f.content,
        "```",
        "",
      ]),
    ].join("\n")
  ).join("\n").trimEnd() + "\n";
}

/** `readme` with the text between the markers replaced by `block`; throws without markers. */
export function withRecipes(readme: string, block: string): string {
  const start = readme.indexOf(README_START);
  const end = readme.indexOf(README_END);
  if (start < 0 || end < start) {
    throw new Error(`README.md has no "${README_START}" … "${README_END}" markers`);
  }
  return `${readme.slice(0, start + README_START.length)}\n\n${block}\n${readme.slice(end)}`;
}

/** The text between the markers, as `withRecipes` writes it. */
export function recipesIn(readme: string): string {
  const start = readme.indexOf(README_START);
  const end = readme.indexOf(README_END);
  if (start < 0 || end < start) {
    throw new Error(`README.md has no "${README_START}" … "${README_END}" markers`);
  }
  return readme.slice(start + README_START.length, end).replace(/^\n\n/, "").replace(/\n$/, "");
}
