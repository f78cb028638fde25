/**
 * Preloaded into every test process and every app process the tests start (deno.json's test
 * task, tests/support/subprocess.ts): makes each KV atomic commit fail, as a remote KV (KV
 * Connect: Deno Deploy, self-hosted denokv) would, when it has more than 10 checks or 1000
 * mutations, more than 800 KiB of keys and values, a value over 64 KiB or a key over 2 KiB; and
 * each read it would refuse: `getMany` or `watch` of more than 10 keys, a `list` page of more than
 * 1000 entries (CONTRACT §8). Code that passes the suite on a local file then runs unchanged
 * against a remote KV. (Deno's own checks refuse those reads on a local file too, today; the
 * wrapper keeps them refused, in KV Connect's words, whatever a later Deno does locally.)
 *
 * KV queues (enqueue, listenQueue) fail outright: KV Connect has none (denoland/denokv#55), so
 * background work goes through the outbox (lib/core/outbox.ts).
 */
export const KV_LIMITS = {
  readKeys: 10,
  listPage: 1000,
  checks: 10,
  mutations: 1000,
  totalBytes: 800 * 1024,
  valueBytes: 64 * 1024,
  keyBytes: 2048,
};

interface Tally {
  checks: number;
  mutations: number;
  bytes: number;
  problems: string[];
  /** What the commit changes, for observeCommits. */
  changes: CommitChange[];
}

/** One mutation of a commit, as observeCommits reports it. */
export interface CommitChange {
  type: "set" | "delete" | "sum" | "min" | "max";
  key: Deno.KvKey;
  expireIn?: number;
}

const observers = new Set<(changes: readonly CommitChange[]) => void>();

/**
 * Calls `fn` with the mutations of every atomic commit that lands (in this process), until the
 * returned function is called: tests count commits and see what each one wrote.
 */
export function observeCommits(fn: (changes: readonly CommitChange[]) => void): () => void {
  observers.add(fn);
  return () => observers.delete(fn);
}

const tallies = new WeakMap<Deno.AtomicOperation, Tally>();
const tally = (op: Deno.AtomicOperation): Tally => {
  let t = tallies.get(op);
  if (!t) tallies.set(op, t = { checks: 0, mutations: 0, bytes: 0, problems: [], changes: [] });
  return t;
};

const encoder = new TextEncoder();

/** Approximate encoded sizes (upper bounds are what matter; strings dominate). */
function sizeOf(value: unknown): number {
  if (value === null || value === undefined) return 1;
  if (typeof value === "string") return encoder.encode(value).byteLength + 2;
  if (typeof value === "number" || typeof value === "bigint") return 9;
  if (typeof value === "boolean") return 1;
  if (value instanceof Uint8Array) return value.byteLength;
  if (value instanceof Deno.KvU64) return 8;
  if (value instanceof Date) return 9;
  if (Array.isArray(value)) return value.reduce((n: number, v) => n + sizeOf(v), 2);
  if (value instanceof Map) {
    let n = 2;
    for (const [k, v] of value) n += sizeOf(k) + sizeOf(v);
    return n;
  }
  if (value instanceof Set) return [...value].reduce((n: number, v) => n + sizeOf(v), 2);
  if (typeof value === "object") {
    let n = 2;
    for (const [k, v] of Object.entries(value as Record<string, unknown>)) {
      n += sizeOf(k) + sizeOf(v);
    }
    return n;
  }
  return 8;
}

function addKey(t: Tally, key: Deno.KvKey) {
  const size = sizeOf(key);
  if (size > KV_LIMITS.keyBytes) t.problems.push(`a key of ${size} bytes (max 2 KiB)`);
  t.bytes += size;
}

function addValue(t: Tally, value: unknown) {
  const size = sizeOf(value);
  if (size > KV_LIMITS.valueBytes) t.problems.push(`a value of ${size} bytes (max 64 KiB)`);
  t.bytes += size;
}

// The class is not a runtime global: take its prototype from an operation.
const probe = await Deno.openKv(":memory:");
const proto = Object.getPrototypeOf(probe.atomic()) as Deno.AtomicOperation;
probe.close();
const original = {
  check: proto.check,
  mutate: proto.mutate,
  sum: proto.sum,
  min: proto.min,
  max: proto.max,
  set: proto.set,
  delete: proto.delete,
  commit: proto.commit,
};

proto.check = function (...checks: Deno.AtomicCheck[]) {
  const t = tally(this);
  t.checks += checks.length;
  for (const c of checks) addKey(t, c.key);
  return original.check.apply(this, checks);
};
proto.mutate = function (...mutations: Deno.KvMutation[]) {
  const t = tally(this);
  t.mutations += mutations.length;
  for (const m of mutations) {
    addKey(t, m.key);
    if ("value" in m) addValue(t, m.value);
    t.changes.push({
      type: m.type,
      key: m.key,
      ...("expireIn" in m && m.expireIn !== undefined ? { expireIn: m.expireIn } : {}),
    } as CommitChange);
  }
  return original.mutate.apply(this, mutations);
};
for (const name of ["sum", "min", "max"] as const) {
  const fn = original[name];
  proto[name] = function (key: Deno.KvKey, n: bigint) {
    const t = tally(this);
    t.mutations++;
    addKey(t, key);
    t.bytes += 8;
    t.changes.push({ type: name, key });
    return fn.call(this, key, n);
  };
}
proto.set = function (key: Deno.KvKey, value: unknown, options?: { expireIn?: number }) {
  const t = tally(this);
  t.mutations++;
  addKey(t, key);
  addValue(t, value);
  t.changes.push({
    type: "set",
    key,
    ...(options?.expireIn !== undefined ? { expireIn: options.expireIn } : {}),
  });
  return original.set.call(this, key, value, options);
};
proto.delete = function (key: Deno.KvKey) {
  const t = tally(this);
  t.mutations++;
  addKey(t, key);
  t.changes.push({ type: "delete", key });
  return original.delete.call(this, key);
};
const noQueues = () => {
  throw new Error("KV queues do not exist over KV Connect (CONTRACT §8): use the outbox");
};
proto.enqueue = noQueues;
Deno.Kv.prototype.enqueue = noQueues;
Deno.Kv.prototype.listenQueue = noQueues;
// Reads: what one KV Connect snapshot read or watch may ask for.
const kvProto = Deno.Kv.prototype;
const originalRead = { getMany: kvProto.getMany, watch: kvProto.watch, list: kvProto.list };
const refuseRead = (what: string) => {
  throw new TypeError(`KV Connect would refuse this read: ${what}`);
};
kvProto.getMany = function (this: Deno.Kv, keys: readonly Deno.KvKey[], options?: unknown) {
  if (keys.length > KV_LIMITS.readKeys) {
    return Promise.reject(
      new TypeError(`KV Connect would refuse this read: getMany of ${keys.length} keys (max 10)`),
    );
  }
  return originalRead.getMany.call(
    this,
    keys,
    options as { consistency?: Deno.KvConsistencyLevel },
  );
} as typeof kvProto.getMany;
kvProto.watch = function (this: Deno.Kv, keys: readonly Deno.KvKey[], options?: unknown) {
  if (keys.length > KV_LIMITS.readKeys) refuseRead(`watch of ${keys.length} keys (max 10)`);
  return originalRead.watch.call(this, keys, options as { raw?: boolean });
} as typeof kvProto.watch;
kvProto.list = function (
  this: Deno.Kv,
  selector: Deno.KvListSelector,
  options?: Deno.KvListOptions,
) {
  // The page Deno asks for: batchSize, else the limit up to 500, else 100 (ext/kv/01_db.ts).
  const page = options?.batchSize ?? Math.min(options?.limit ?? 100, 500);
  if (page > KV_LIMITS.listPage) refuseRead(`a list page of ${page} entries (max 1000)`);
  return originalRead.list.call(this, selector, options);
} as typeof kvProto.list;

proto.commit = function () {
  const t = tallies.get(this);
  if (t) {
    const problems = [...t.problems];
    if (t.checks > KV_LIMITS.checks) problems.push(`${t.checks} checks (max 10)`);
    if (t.mutations > KV_LIMITS.mutations) problems.push(`${t.mutations} mutations (max 1000)`);
    if (t.bytes > KV_LIMITS.totalBytes) problems.push(`${t.bytes} bytes (max 800 KiB)`);
    if (problems.length) {
      return Promise.reject(
        new TypeError(`KV Connect would refuse this atomic commit: ${problems.join(", ")}`),
      );
    }
  }
  const committed = original.commit.call(this);
  if (!t || !observers.size) return committed;
  return committed.then((res) => {
    if (res.ok) { for (const fn of observers) fn(t.changes); }
    return res;
  });
};
