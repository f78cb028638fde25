/**
 * The client's address, as the server's connection sees it (Deno.serve hands it to Hono as the
 * env's `remoteAddr`). Keyway trusts no forwarding header: behind a reverse proxy every client
 * has the proxy's address (README, "Where the contract is silent").
 */
import type { Context } from "hono";

/** The connection's remote IP, IPv4-mapped IPv6 shown as IPv4; null in-process (app.request). */
export function clientAddress(c: Context): string | null {
  const env: unknown = c.env;
  if (typeof env !== "object" || env === null || !("remoteAddr" in env)) return null;
  const addr = env.remoteAddr;
  if (typeof addr !== "object" || addr === null || !("hostname" in addr)) return null;
  const host = addr.hostname;
  if (typeof host !== "string" || host === "") return null;
  return host.toLowerCase().startsWith("::ffff:") && host.includes(".") ? host.slice(7) : host;
}

/**
 * What one client's limits are counted under: the IPv4 address, or an IPv6 address's /64 (one
 * household or host gets a whole /64, so single IPv6 addresses cost an attacker nothing).
 */
export function addressBucket(address: string): string {
  if (!address.includes(":")) return address;
  const [head, tail = ""] = address.split("::");
  const left = head ? head.split(":") : [];
  const right = address.includes("::") && tail ? tail.split(":") : [];
  const groups = address.includes("::")
    ? [...left, ...Array(Math.max(0, 8 - left.length - right.length)).fill("0"), ...right]
    : left;
  return groups.slice(0, 4).map((g) => g.replace(/^0+(?=.)/, "").toLowerCase()).join(":") + "::/64";
}
