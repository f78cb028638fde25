/** The loopback names local mode answers at (routes/local_guard.ts) and same-origin checks accept. */

const LOOPBACK_HOSTNAMES = new Set(["localhost", "127.0.0.1", "[::1]"]);
/** host[:port], the host a name or a bracketed IPv6 literal (no userinfo, path or spaces). */
const HOST = /^(\[[0-9a-f:.]+\]|[^[\]:@/\\?#\s]+)(?::\d{1,5})?$/i;

/** Whether a URL hostname (as `URL.hostname` gives it) is one of the loopback names. */
export function isLoopbackHostname(hostname: string): boolean {
  return LOOPBACK_HOSTNAMES.has(hostname.toLowerCase());
}

/** Whether a Host header value names this machine (any port). */
export function isLoopbackHost(host: string): boolean {
  const m = host.match(HOST);
  return m !== null && isLoopbackHostname(m[1]);
}
