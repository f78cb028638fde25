import assert from "node:assert/strict";
import { join } from "node:path";
import { Hono } from "hono";
import { serveStatic } from "hono/deno";
import { h } from "preact";
import { renderToString } from "preact-render-to-string";
import {
  buildIslands,
  type IslandBuildOptions,
  IslandCollector,
  islandNames,
  isStale,
  readManifest,
  serializeProps,
  sourceFiles,
  sourceHash,
} from "../../build/islands.ts";
import { launchBrowser } from "../support/browser.ts";

const PROJECT = new URL("../..", import.meta.url).pathname;

/** A throw-away project: one island importing a component, which imports a lib module. */
async function fixture(): Promise<IslandBuildOptions & { root: string }> {
  const root = await Deno.makeTempDir({ prefix: "keyway-islands-" });
  await Deno.copyFile(join(PROJECT, "deno.json"), join(root, "deno.json"));
  for (const dir of ["islands", "components", "lib", "static"]) await Deno.mkdir(join(root, dir));
  await Deno.writeTextFile(
    join(root, "islands", "Counter.tsx"),
    `import { useState } from "preact/hooks";
import { Label } from "../components/Label.tsx";
export default function Counter(props: { start: number; label: string }) {
  const [n, setN] = useState(props.start);
  return <button type="button" onClick={() => setN(n + 1)}><Label text={props.label} /> {n}</button>;
}
`,
  );
  await Deno.writeTextFile(
    join(root, "components", "Label.tsx"),
    `import { shout } from "../lib/text.ts";
export function Label(props: { text: string }) {
  return <span class="label">{shout(props.text)}</span>;
}
`,
  );
  await Deno.writeTextFile(
    join(root, "lib", "text.ts"),
    `export const shout = (s: string) => s.toUpperCase();\n`,
  );
  await Deno.writeTextFile(join(root, "lib", "unrelated.ts"), `export const x = 1;\n`);
  await Deno.writeTextFile(join(root, "static", "app.css"), `body { color: red; }\n`);
  return { root };
}

Deno.test("islands: staleness and a real deno bundle build", async (t) => {
  const opts = await fixture();
  try {
    await t.step("source files follow imports into lib/ but not unrelated files", async () => {
      const files = (await sourceFiles(opts)).map((f) => f.slice(opts.root.length + 1));
      assert.ok(files.includes("islands/Counter.tsx"));
      assert.ok(files.includes("components/Label.tsx"));
      assert.ok(files.includes("lib/text.ts"), "transitive lib import is hashed");
      assert.ok(files.includes("static/app.css"));
      assert.ok(!files.includes("lib/unrelated.ts"));
      assert.deepEqual(await islandNames(opts), ["Counter"]);
    });

    let firstHash = "";
    await t.step("a fresh project is stale; building writes bundles and a manifest", async () => {
      assert.equal(await isStale(opts), true);
      const result = await buildIslands(opts);
      assert.equal(result.built, true);
      assert.deepEqual(result.manifest.islands, { Counter: "Counter.js" });
      firstHash = result.manifest.hash;
      assert.equal(firstHash, await sourceHash(opts));
      assert.deepEqual(await readManifest(opts), result.manifest);
      const js = await Deno.readTextFile(join(opts.root, "static/build/Counter.js"));
      assert.match(js, /data-island="Counter"/, "the entry hydrates wrappers by name");
      assert.ok(!/from\s*["']preact/.test(js), "preact is bundled, no bare imports left");
      assert.ok(js.length < 40_000, `bundle is small (${js.length} bytes)`);
      // No leftover private build folders.
      const left = [];
      for await (const e of Deno.readDir(join(opts.root, "static/build"))) left.push(e.name);
      assert.deepEqual(left.sort(), ["Counter.js", "manifest.json"]);
    });

    await t.step("unchanged sources are not rebuilt", async () => {
      assert.equal(await isStale(opts), false);
      const again = await buildIslands(opts);
      assert.equal(again.built, false);
      assert.equal(again.manifest.hash, firstHash);
    });

    await t.step("an unrelated file does not make it stale", async () => {
      await Deno.writeTextFile(join(opts.root, "lib", "unrelated.ts"), `export const x = 2;\n`);
      assert.equal(await isStale(opts), false);
    });

    await t.step("a change in a lib file the island imports makes it stale", async () => {
      await Deno.writeTextFile(
        join(opts.root, "lib", "text.ts"),
        `export const shout = (s: string) => s.toUpperCase() + "!";\n`,
      );
      assert.equal(await isStale(opts), true);
      const rebuilt = await buildIslands(opts);
      assert.equal(rebuilt.built, true);
      assert.notEqual(rebuilt.manifest.hash, firstHash);
      assert.equal(await isStale(opts), false);
    });

    await t.step("a deleted bundle or a new island makes it stale", async () => {
      await Deno.remove(join(opts.root, "static/build/Counter.js"));
      assert.equal(await isStale(opts), true);
      await buildIslands(opts);
      assert.equal(await isStale(opts), false);
      await Deno.writeTextFile(
        join(opts.root, "islands", "Other.tsx"),
        `export default function Other() { return <p>other</p>; }\n`,
      );
      assert.equal(await isStale(opts), true);
      const built = await buildIslands(opts);
      assert.deepEqual(Object.keys(built.manifest.islands).sort(), ["Counter", "Other"]);
    });

    await t.step("a broken island fails the build with the bundler's message", async () => {
      await Deno.writeTextFile(join(opts.root, "islands", "Broken.tsx"), `export default (;\n`);
      await assert.rejects(() => buildIslands(opts), /deno bundle failed/);
      await Deno.remove(join(opts.root, "islands", "Broken.tsx"));
      // The last good manifest is still in place.
      assert.ok(await readManifest(opts));
    });
  } finally {
    await Deno.remove(opts.root, { recursive: true });
  }
});

Deno.test("islands: SSR wraps the island with escaped props and one script per page", async () => {
  const { island } = await import("../../build/islands.ts");
  const Hello = (p: { text: string; n: number }) => h("p", { class: "hello" }, `${p.text}/${p.n}`);
  const Wrapped = island("Hello", Hello);
  const evil = `</script><script>alert("x")</script>&\u2028`;
  const html = renderToString(
    h(
      IslandCollector.Provider,
      { value: new Set<string>() },
      h("div", null, h(Wrapped, { text: evil, n: 1 }), h(Wrapped, { text: "two", n: 2 })),
    ),
  );
  // Both instances are wrapped and server-rendered.
  assert.equal(html.match(/<div data-island="Hello"/g)?.length, 2);
  assert.match(html, /<p class="hello">two\/2<\/p>/);
  // The only </script> in the page closes the module script tag (emitted once).
  assert.equal(html.match(/<\/script>/g)?.length, 1);
  assert.equal(html.match(/<script type="module" src="\/static\/build\/Hello\.js/g)?.length, 1);
  assert.ok(!html.includes("<script>alert"), "props cannot open a script");
  // The data attribute round-trips to the exact props.
  const attr = html.match(/data-props="([^"]*)"/)![1];
  const decoded = attr.replace(/&quot;/g, '"').replace(/&amp;/g, "&").replace(/&lt;/g, "<")
    .replace(/&gt;/g, ">");
  assert.ok(!decoded.includes("<"), "JSON carries < as \\u003c");
  assert.deepEqual(JSON.parse(decoded), { text: evil, n: 1 });
  assert.equal(serializeProps({ a: "</script>" }), '{"a":"\\u003c/script\\u003e"}');
});

Deno.test("islands: the built bundle hydrates in a real browser", async () => {
  const opts = await fixture();
  const browser = await launchBrowser();
  let server: Deno.HttpServer<Deno.NetAddr> | undefined;
  try {
    await buildIslands(opts);
    const { island } = await import("../../build/islands.ts");
    const Counter = (await import(join(opts.root, "islands", "Counter.tsx"))).default;
    const Wrapped = island("Counter", Counter);
    const app = new Hono();
    app.use("/static/*", serveStatic({ root: opts.root }));
    app.get("/", (c) =>
      c.html(
        '<!doctype html><title>t</title><link rel="icon" href="data:,">' +
          renderToString(
            h(
              IslandCollector.Provider,
              { value: new Set<string>() },
              h(Wrapped, { start: 5, label: "n" }),
            ),
          ),
      ));
    server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen: () => {} }, app.fetch);
    const page = await browser.newPage();
    const errors: string[] = [];
    page.on("pageerror", (e) => errors.push(e.message));
    page.on("console", (m) => m.type() === "error" && errors.push(m.text()));
    await page.goto(`http://127.0.0.1:${server.addr.port}/`);
    const button = page.locator('[data-island="Counter"] button');
    assert.equal((await button.textContent())?.trim(), "N 5", "server-rendered");
    // Clicking changes state only once the bundle has hydrated the wrapper.
    await page.waitForFunction(
      () => {
        const b = document.querySelector('[data-island="Counter"] button') as HTMLButtonElement;
        b.click();
        return b.textContent !== "N 5";
      },
      undefined,
      { timeout: 5000, polling: 100 },
    );
    const text = (await button.textContent())?.trim() ?? "";
    assert.match(text, /^N \d+$/);
    assert.ok(Number(text.slice(2)) > 5);
    await button.click();
    assert.equal((await button.textContent())?.trim(), `N ${Number(text.slice(2)) + 1}`);
    assert.deepEqual(errors, []);
  } finally {
    await browser.close();
    await server?.shutdown();
    await Deno.remove(opts.root, { recursive: true });
  }
});
