/**
 * Islands: the only components that ship JavaScript. The server renders an island inside a
 * wrapper carrying its props as JSON; a tiny per-island bundle (built with `deno bundle`)
 * hydrates every wrapper of that name. Builds are skipped while a hash of the sources matches
 * the manifest in the output directory.
 */
import { dirname, join, relative, resolve, sep as SEPARATOR } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import { type ComponentType, createContext, Fragment, h, type VNode } from "preact";
import { useContext } from "preact/hooks";

/** Bumped whenever the generated entry code changes, so old builds count as stale. */
const ENTRY_TEMPLATE_VERSION = "1";
const MANIFEST = "manifest.json";

export interface IslandBuildOptions {
  /** Project root (absolute); default: the directory above lib/. */
  root?: string;
  /** Folder of island components, relative to root. */
  islandsDir?: string;
  /** Folders hashed as a whole besides islands (server components, hand-written assets). */
  hashDirs?: string[];
  /** Output folder for bundles and the manifest, relative to root. */
  outDir?: string;
  /** Rebuild even when the hash matches. */
  force?: boolean;
}

export interface IslandManifest {
  /** Hash of every source that can change a bundle (and the hand-written static assets). */
  hash: string;
  /** Island name → bundle file name inside outDir. */
  islands: Record<string, string>;
  builtAt: string;
}

export const PROJECT_ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "..");

function resolved(options: IslandBuildOptions) {
  const root = options.root ?? PROJECT_ROOT;
  return {
    root,
    islandsDir: join(root, options.islandsDir ?? "islands"),
    hashDirs: (options.hashDirs ?? ["components", "static"]).map((d) => join(root, d)),
    outDir: join(root, options.outDir ?? join("static", "build")),
  };
}

const ISLAND_FILE = /^([A-Z][A-Za-z0-9]*)\.tsx?$/;

/** Island names (PascalCase file names in the islands folder), sorted. */
export async function islandNames(options: IslandBuildOptions = {}): Promise<string[]> {
  const { islandsDir } = resolved(options);
  const names: string[] = [];
  try {
    for await (const entry of Deno.readDir(islandsDir)) {
      const m = entry.isFile ? entry.name.match(ISLAND_FILE) : null;
      if (m) names.push(m[1]);
    }
  } catch (err) {
    if (!(err instanceof Deno.errors.NotFound)) throw err;
  }
  return names.sort();
}

async function filesUnder(dir: string, skip: string): Promise<string[]> {
  const out: string[] = [];
  try {
    for await (const entry of Deno.readDir(dir)) {
      const path = join(dir, entry.name);
      if (path === skip || entry.name.startsWith(".")) continue;
      if (entry.isDirectory) out.push(...await filesUnder(path, skip));
      else if (entry.isFile) out.push(path);
    }
  } catch (err) {
    if (!(err instanceof Deno.errors.NotFound)) throw err;
  }
  return out;
}

const RELATIVE_IMPORT =
  /(?:\bfrom\s*|\bimport\s*\(?\s*)["'](\.{1,2}\/[^"']+\.(?:tsx?|jsx?|mjs|json))["']/g;

/**
 * Every file whose change can change a bundle: the islands and hashed folders, plus the local
 * modules they import (followed transitively, so lib/ files islands use are included).
 */
export async function sourceFiles(options: IslandBuildOptions = {}): Promise<string[]> {
  const { root, islandsDir, hashDirs, outDir } = resolved(options);
  const seen = new Set<string>();
  const queue = [
    ...await filesUnder(islandsDir, outDir),
    ...(await Promise.all(hashDirs.map((d) => filesUnder(d, outDir)))).flat(),
  ];
  const config = join(root, "deno.json");
  queue.push(config);
  while (queue.length) {
    const file = queue.pop()!;
    if (seen.has(file)) continue;
    seen.add(file);
    if (!/\.(tsx?|jsx?|mjs)$/.test(file)) continue;
    let text: string;
    try {
      text = await Deno.readTextFile(file);
    } catch {
      continue;
    }
    for (const m of text.matchAll(RELATIVE_IMPORT)) {
      const target = resolve(dirname(file), m[1]);
      if (target.startsWith(root + SEPARATOR) && !seen.has(target)) queue.push(target);
    }
  }
  return [...seen].sort();
}

/** SHA-256 (hex, 16 chars) over the source files' paths and contents. */
export async function sourceHash(options: IslandBuildOptions = {}): Promise<string> {
  const { root } = resolved(options);
  const parts: Uint8Array[] = [new TextEncoder().encode(`v${ENTRY_TEMPLATE_VERSION}\n`)];
  for (const file of await sourceFiles(options)) {
    parts.push(new TextEncoder().encode(`\n${relative(root, file)}\n`));
    try {
      parts.push(await Deno.readFile(file));
    } catch (err) {
      if (!(err instanceof Deno.errors.NotFound)) throw err;
    }
  }
  const all = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let offset = 0;
  for (const p of parts) all.set(p, (offset += p.length) - p.length);
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", all));
  return Array.from(digest.slice(0, 8), (b) => b.toString(16).padStart(2, "0")).join("");
}

export async function readManifest(
  options: IslandBuildOptions = {},
): Promise<IslandManifest | null> {
  const { outDir } = resolved(options);
  try {
    const raw = JSON.parse(await Deno.readTextFile(join(outDir, MANIFEST)));
    if (typeof raw?.hash !== "string" || typeof raw?.islands !== "object") return null;
    return raw as IslandManifest;
  } catch {
    return null;
  }
}

/** True when the manifest is missing, names other islands, or was built from other sources. */
export async function isStale(options: IslandBuildOptions = {}): Promise<boolean> {
  const manifest = await readManifest(options);
  if (!manifest) return true;
  const names = await islandNames(options);
  const { outDir } = resolved(options);
  for (const name of names) {
    const file = manifest.islands[name];
    if (!file) return true;
    try {
      await Deno.stat(join(outDir, file));
    } catch {
      return true;
    }
  }
  return Object.keys(manifest.islands).length !== names.length ||
    manifest.hash !== await sourceHash(options);
}

/** The generated entry: import the island, hydrate every wrapper that names it. */
export function entrySource(name: string, islandFile: string): string {
  return [
    `import { h, hydrate } from "preact";`,
    `import Island from ${JSON.stringify(pathToFileURL(islandFile).href)};`,
    `for (const el of document.querySelectorAll('[data-island="${name}"]')) {`,
    `  const props = JSON.parse(el.getAttribute("data-props") || "{}");`,
    `  hydrate(h(Island, props), el);`,
    `}`,
    ``,
  ].join("\n");
}

export interface BuildResult {
  built: boolean;
  manifest: IslandManifest;
  ms: number;
}

/**
 * Builds every island's bundle when the sources changed (or `force`). Safe to run from several
 * processes at once: each builds in a private folder and renames finished files into place,
 * the manifest last.
 */
export async function buildIslands(options: IslandBuildOptions = {}): Promise<BuildResult> {
  const started = performance.now();
  const { root, islandsDir, outDir } = resolved(options);
  if (!options.force && !(await isStale(options))) {
    const manifest = (await readManifest(options))!;
    setAssetVersion(manifest.hash);
    return { built: false, manifest, ms: performance.now() - started };
  }
  const hash = await sourceHash(options);
  const names = await islandNames(options);
  await Deno.mkdir(outDir, { recursive: true });
  const work = await Deno.makeTempDir({ dir: outDir, prefix: ".build-" });
  try {
    const islands: Record<string, string> = {};
    if (names.length) {
      const entries: string[] = [];
      await Deno.mkdir(join(work, "entries"));
      for (const name of names) {
        const file = (await islandFile(islandsDir, name))!;
        const entry = join(work, "entries", `${name}.ts`);
        await Deno.writeTextFile(entry, entrySource(name, file));
        entries.push(entry);
      }
      const args = ["bundle", "--quiet", "--platform", "browser", "--minify"];
      try {
        await Deno.stat(join(root, "deno.json"));
        args.push("--config", join(root, "deno.json"));
      } catch { /* no config: bare specifiers must resolve some other way */ }
      args.push("--outdir", join(work, "out"), ...entries);
      const { code, stderr } = await new Deno.Command(Deno.execPath(), {
        args,
        cwd: root,
        stdout: "null",
        stderr: "piped",
        env: { NO_COLOR: "1" },
      }).output();
      if (code !== 0) {
        throw new Error(`deno bundle failed (exit ${code}):\n${new TextDecoder().decode(stderr)}`);
      }
      for (const name of names) {
        await Deno.rename(join(work, "out", `${name}.js`), join(outDir, `${name}.js`));
        islands[name] = `${name}.js`;
      }
    }
    const manifest: IslandManifest = { hash, islands, builtAt: new Date().toISOString() };
    await Deno.writeTextFile(join(work, MANIFEST), JSON.stringify(manifest, null, 2) + "\n");
    await Deno.rename(join(work, MANIFEST), join(outDir, MANIFEST));
    setAssetVersion(hash);
    return { built: true, manifest, ms: performance.now() - started };
  } finally {
    await Deno.remove(work, { recursive: true }).catch(() => {});
  }
}

/**
 * The bundles `deno task build` made, without building (Deno Deploy: the server may not spawn
 * processes or write files). Throws when there are none or they were built from other sources.
 */
export async function loadBuiltIslands(options: IslandBuildOptions = {}): Promise<IslandManifest> {
  const manifest = await readManifest(options);
  if (!manifest || await isStale(options)) {
    throw new Error(
      "the island bundles are missing or stale: run `deno task build` before deploying",
    );
  }
  setAssetVersion(manifest.hash);
  return manifest;
}

async function islandFile(dir: string, name: string): Promise<string | null> {
  for (const ext of ["tsx", "ts"]) {
    const path = join(dir, `${name}.${ext}`);
    try {
      await Deno.stat(path);
      return path;
    } catch { /* try the next extension */ }
  }
  return null;
}

// ---------------------------------------------------------------------------------------------
// Rendering

/** Where bundles are served from and the version appended for cache busting. */
export const islandAssets = { base: "/static/build", version: "" };

export function setAssetVersion(version: string) {
  islandAssets.version = version;
}

/** A URL under /static with the current asset version (long-cacheable). */
export function assetUrl(path: string): string {
  return islandAssets.version ? `${path}?v=${islandAssets.version}` : path;
}

/** JSON for a data attribute or script: `<`, `>`, `&` and line separators as \u escapes. */
export function serializeProps(props: unknown): string {
  return JSON.stringify(props ?? {}).replace(
    /[<>&\u2028\u2029]/g,
    (ch) => `\\u${ch.charCodeAt(0).toString(16).padStart(4, "0")}`,
  );
}

/** Collects island names used during one render, so each script tag is emitted once. */
export const IslandCollector = createContext<Set<string> | null>(null);

/**
 * Wraps an island component for server rendering: `island("Counter", Counter)` returns a
 * component that renders the island inside its wrapper plus (once per page) its module script.
 */
export function island<P extends Record<string, unknown>>(
  name: string,
  Component: ComponentType<P>,
): (props: P) => VNode {
  if (!/^[A-Z][A-Za-z0-9]*$/.test(name)) throw new Error(`bad island name ${name}`);
  function IslandWrapper(props: P) {
    const used = useContext(IslandCollector);
    const first = !used?.has(name);
    used?.add(name);
    const src = assetUrl(`${islandAssets.base}/${name}.js`);
    return h(
      Fragment,
      null,
      h(
        "div",
        { "data-island": name, "data-props": serializeProps(props), class: "island" },
        h(Component, props),
      ),
      // Outside the wrapper: hydrate() owns only the wrapper's children.
      first ? h("script", { type: "module", src }) : null,
    );
  }
  IslandWrapper.displayName = `Island(${name})`;
  return IslandWrapper;
}
