/**
 * The layout's rules, read from the real module graph (`deno info --json`): no import circles
 * among the project's own modules, lib/ never imports routes/ or tests/, tasks/ and testing/ never
 * import tests/.
 */
import assert from "node:assert/strict";

const root = new URL("../", import.meta.url);
const rootPath = decodeURIComponent(root.pathname);

interface Graph {
  modules: Array<{ specifier: string; dependencies?: Array<{ code?: { specifier: string } }> }>;
}

async function graph(entries: string[]): Promise<Map<string, string[]>> {
  const edges = new Map<string, string[]>();
  for (const entry of entries) {
    const out = await new Deno.Command(Deno.execPath(), {
      args: ["info", "--json", entry],
      cwd: rootPath,
      stdout: "piped",
      stderr: "piped",
    }).output();
    assert.ok(out.success, new TextDecoder().decode(out.stderr));
    const g = JSON.parse(new TextDecoder().decode(out.stdout)) as Graph;
    for (const m of g.modules) {
      if (!m.specifier.startsWith(root.href)) continue;
      const from = m.specifier.slice(root.href.length);
      const to = (m.dependencies ?? [])
        .map((d) => d.code?.specifier)
        .filter((s): s is string => !!s && s.startsWith(root.href))
        .map((s) => s.slice(root.href.length));
      edges.set(from, to);
    }
  }
  return edges;
}

/** The project's entry points: the server, the tasks and the bench (which reach everything). */
const ENTRIES = [
  "main.ts",
  "dev.ts",
  "tasks/report.ts",
  "tasks/summarize.ts",
  "tasks/bench.ts",
  "tasks/build.ts",
];

Deno.test("architecture: no import circles, and the folders import only downward", async (t) => {
  const edges = await graph(ENTRIES);
  assert.ok(edges.size > 50, `only ${edges.size} modules read`);

  await t.step("no circles among the project's modules", () => {
    const state = new Map<string, "open" | "done">();
    const circles: string[] = [];
    const visit = (node: string, path: string[]) => {
      state.set(node, "open");
      for (const next of edges.get(node) ?? []) {
        if (state.get(next) === "open") {
          circles.push([...path.slice(path.indexOf(next)), next].join(" → "));
        } else if (!state.has(next)) visit(next, [...path, next]);
      }
      state.set(node, "done");
    };
    for (const node of edges.keys()) if (!state.has(node)) visit(node, [node]);
    assert.deepEqual(circles, []);
  });

  await t.step("lib/ imports neither routes/ nor tests/; tasks/ and testing/ never tests/", () => {
    const wrong: string[] = [];
    for (const [from, tos] of edges) {
      for (const to of tos) {
        if (from.startsWith("lib/") && (to.startsWith("routes/") || to.startsWith("tests/"))) {
          wrong.push(`${from} → ${to}`);
        }
        if ((from.startsWith("tasks/") || from.startsWith("testing/")) && to.startsWith("tests/")) {
          wrong.push(`${from} → ${to}`);
        }
      }
    }
    assert.deepEqual(wrong, []);
  });
});
