/**
 * Reserved for the lead: the "Upstream health" card at the top of /admin (in-flight and waiting
 * requests per model, queue-wait p50/p99, recent alerts). Renders nothing until it is built.
 */
export function UpstreamHealth(_props: Record<string, never>) {
  return null;
}
