/**
 * The dashboard's "Use it": one tab per tool (lib/recipes/recipes.ts), the tool's snippets with
 * the instance's URLs, and a copy button on each that copies the snippet with the real key while
 * the page shows it masked. Tabs come first; the connect flows for tools built on Keyway follow.
 */
import { useState } from "preact/hooks";
import type { Recipe } from "../lib/recipes/recipes.ts";

export function SetupTabs(
  p: {
    /** The recipes as shown (the key masked until revealed). */
    shown: Recipe[];
    /** The same recipes with the real key: what the copy buttons copy. */
    real: Recipe[];
    /** False while there is no key to copy. */
    ready: boolean;
    copied: string | null;
    copy: (what: string, label: string, text: string) => void;
  },
) {
  const { shown, real, copied, copy } = p;
  const [tab, setTab] = useState(shown[0]?.id ?? "");
  const index = Math.max(0, shown.findIndex((r) => r.id === tab));
  const recipe = shown[index];
  const onTabKey = (e: KeyboardEvent, i: number) => {
    const to = e.key === "ArrowRight"
      ? (i + 1) % shown.length
      : e.key === "ArrowLeft"
      ? (i - 1 + shown.length) % shown.length
      : e.key === "Home"
      ? 0
      : e.key === "End"
      ? shown.length - 1
      : -1;
    if (to < 0) return;
    e.preventDefault();
    setTab(shown[to].id);
    document.getElementById(`tab-${shown[to].id}`)?.focus();
  };
  return (
    <>
      <h3 id="setup-title" class="setup-title">Use it</h3>
      <p class="muted small" style={{ marginTop: 0 }}>
        Pick your tool: each snippet already holds your key and this service's address.
      </p>
      <div class="tabs" role="tablist" aria-labelledby="setup-title">
        {shown.map((r, i) => (
          <button
            key={r.id}
            type="button"
            role="tab"
            id={`tab-${r.id}`}
            aria-selected={i === index}
            aria-controls="snippet-panel"
            tabIndex={i === index ? 0 : -1}
            onClick={() => setTab(r.id)}
            onKeyDown={(e) => onTabKey(e, i)}
          >
            {r.label}
          </button>
        ))}
      </div>
      <div id="snippet-panel" role="tabpanel" aria-labelledby={`tab-${recipe.id}`}>
        <p class="small">{recipe.intro}</p>
        {recipe.files.map((f, i) => (
          <div class="code" key={`${recipe.id}-${i}`}>
            <div class="code-head">
              <span>{f.title}</span>
              <button
                class="btn btn-sm"
                type="button"
                disabled={!p.ready}
                aria-label={`Copy ${recipe.label}: ${f.title}`}
                onClick={() =>
                  copy(
                    `${recipe.id}-${i}`,
                    `${recipe.label} ${f.title}`,
                    real[index].files[i].content,
                  )}
              >
                {copied === `${recipe.id}-${i}` ? "Copied ✓" : "Copy"}
              </button>
            </div>
            <pre
              tabIndex={0}
              aria-label={`${recipe.label}: ${f.title}`}
            ><code data-testid={`snippet-${recipe.id}-${i}`} data-lang={f.lang}>{f.content}</code></pre>
          </div>
        ))}
      </div>
      <p class="muted small" data-testid="connect-note">
        Editors and tools built on Keyway connect without copy-paste: they open a Keyway page and
        you approve. On a remote machine or in a terminal, open{" "}
        <a href="/connect/device">/connect/device</a> and enter the code your tool shows.
      </p>
    </>
  );
}
