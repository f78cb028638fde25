/**
 * The bench's KV measurements: how long one durable commit takes on a KV (CONTRACT §9
 * `kvCommitMs`), and how many KV Connect calls a gateway request makes, counted on the wire by a
 * pass-through in front of a denokv server.
 */
import { keys } from "../lib/core/kv.ts";

/** p50 and p99 of `n` commits one after another, each a durable write of one counter. */
export async function commitLatency(kv: Deno.Kv, n = 300): Promise<{ p50: number; p99: number }> {
  const ms: number[] = [];
  for (let i = 0; i < n; i++) {
    const started = performance.now();
    const res = await kv.atomic().sum(keys.benchCommits(), 1n).commit();
    ms.push(performance.now() - started);
    if (!res.ok) throw new Error("bench: a commit without checks failed");
  }
  ms.sort((a, b) => a - b);
  const at = (p: number) =>
    Math.round(ms[Math.min(ms.length - 1, Math.floor(p * ms.length))] * 1000) / 1000;
  return { p50: at(0.5), p99: at(0.99) };
}

export interface KvCallCounts {
  writes: number;
  reads: number;
  watches: number;
  /** Request bytes of the atomic writes (protobuf bodies). */
  writeBytes: number;
}

/**
 * A KV Connect pass-through on loopback that counts atomic writes (and their bytes), snapshot
 * reads and watches.
 * denokv's metadata names its endpoints by relative path, so a client pointed here stays here.
 */
export function countingKvProxy(target: string) {
  const counts: KvCallCounts = { writes: 0, reads: 0, watches: 0, writeBytes: 0 };
  const server = Deno.serve(
    { hostname: "127.0.0.1", port: 0, onListen: () => {} },
    async (req) => {
      const { pathname, search } = new URL(req.url);
      if (pathname.endsWith("/atomic_write")) {
        counts.writes++;
        counts.writeBytes += Number(req.headers.get("content-length") ?? 0);
      } else if (pathname.endsWith("/snapshot_read")) counts.reads++;
      else if (pathname.endsWith("/watch")) counts.watches++;
      const res = await fetch(`${target}${pathname}${search}`, {
        method: req.method,
        headers: req.headers,
        body: req.body,
        signal: req.signal,
      });
      return new Response(res.body, { status: res.status, headers: res.headers });
    },
  );
  return {
    url: `http://127.0.0.1:${server.addr.port}`,
    counts,
    reset() {
      counts.writes =
        counts.reads =
        counts.watches =
        counts.writeBytes =
          0;
    },
    close: () => server.shutdown(),
  };
}
