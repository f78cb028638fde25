/**
 * A deadline on every KV Connect call, and a breaker behind it. Deno's KV Connect client retries
 * a call whose server is unreachable for as long as it stays unreachable (a self-hosted denokv
 * restarting, a network partition): without a deadline a request would hang until then.
 *
 * - A call that takes longer than the deadline fails (KvUnavailableError: the request gets a 5xx
 *   JSON answer) and goes on in the background; a commit may still land later.
 * - The first such failure opens the breaker: every call fails at once, without reaching the
 *   client, until a probe read answers again **and** every write given up on has finished
 *   (landed or failed). So a caller that reads back whether an uncertain commit landed (an
 *   admission or settlement whose commit threw is settled again, guarded by its lease entry;
 *   lib/limits/admission.ts) never reads before that commit has finished.
 *
 * Watches get neither: they wait by nature, and their users poll as well.
 */

/** KV answered nothing within the deadline, or is known to be unreachable. */
export class KvUnavailableError extends Error {
  override name = "KvUnavailableError";
}

/** How long one KV Connect call may take before the request relying on it gives up. */
export const KV_CONNECT_DEADLINE_MS = 5_000;
/** While the breaker is open: how often a probe read is sent, and how many may hang at once. */
const PROBE_EVERY_MS = 1_000;
const PROBES_MAX = 5;

export interface DeadlineOptions {
  ms?: number;
  /** A key the probe reads (any key: only the answer matters). */
  probeKey: Deno.KvKey;
}

class Breaker {
  /** Writes given up on that have not finished yet. */
  private readonly abandoned = new Set<Promise<unknown>>();
  private probes = 0;
  private answered = false;
  private timer: ReturnType<typeof setInterval> | undefined;

  constructor(private readonly kv: Deno.Kv, private readonly o: Required<DeadlineOptions>) {}

  get open(): boolean {
    return this.timer !== undefined;
  }

  /** Runs one call under the deadline; fails at once while the breaker is open. */
  call<T>(what: string, write: boolean, start: () => Promise<T>): Promise<T> {
    if (this.open) {
      return Promise.reject(
        new KvUnavailableError(`KV is unreachable (${what} not sent): waiting for it to answer`),
      );
    }
    const work = start();
    let timer: ReturnType<typeof setTimeout> | undefined;
    const late = new Promise<never>((_, reject) => {
      timer = setTimeout(() => {
        if (write) {
          this.abandoned.add(work);
          const finished = () => {
            this.abandoned.delete(work);
            this.maybeClose();
          };
          work.then(finished, finished);
        } else work.catch(() => {}); // it may still fail, with no one listening
        this.trip();
        reject(
          new KvUnavailableError(
            `KV did not answer ${what} within ${this.o.ms} ms (KV Connect server unreachable?)`,
          ),
        );
      }, this.o.ms);
    });
    return Promise.race([work, late]).finally(() => clearTimeout(timer));
  }

  private trip() {
    if (this.open) return;
    this.answered = false;
    this.timer = setInterval(() => this.probe(), PROBE_EVERY_MS);
    Deno.unrefTimer(this.timer);
    this.probe();
  }

  private probe() {
    if (this.answered || this.probes >= PROBES_MAX) return;
    this.probes++;
    this.kv.get(this.o.probeKey).then(() => {
      this.answered = true;
      this.maybeClose();
    }, () => {}).finally(() => this.probes--);
  }

  private maybeClose() {
    if (!this.open || !this.answered || this.abandoned.size) return;
    clearInterval(this.timer);
    this.timer = undefined;
  }

  close() {
    clearInterval(this.timer);
    this.timer = undefined;
  }
}

/** `kv` whose reads, writes and list pages fail after a deadline instead of waiting for ever. */
export function withDeadline(kv: Deno.Kv, options: DeadlineOptions): Deno.Kv {
  const breaker = new Breaker(kv, { ms: KV_CONNECT_DEADLINE_MS, ...options });
  return new Proxy(kv, {
    get(target, prop) {
      switch (prop) {
        case "get":
        case "getMany":
        case "set":
        case "delete":
          return (...args: unknown[]) =>
            breaker.call(
              String(prop),
              prop === "set" || prop === "delete",
              () => (target[prop] as (...a: unknown[]) => Promise<unknown>).apply(target, args),
            );
        case "atomic":
          return () => {
            const op = target.atomic();
            const commit = op.commit.bind(op);
            op.commit = () => breaker.call("a commit", true, commit);
            return op;
          };
        case "list":
          return (...args: Parameters<Deno.Kv["list"]>) =>
            listWithDeadline(target.list(...args), breaker);
        case "close":
          return () => {
            breaker.close();
            target.close();
          };
      }
      const value = Reflect.get(target, prop, target);
      return typeof value === "function" ? value.bind(target) : value;
    },
  });
}

function listWithDeadline<T>(it: Deno.KvListIterator<T>, breaker: Breaker) {
  const wrapped: Deno.KvListIterator<T> = new Proxy(it, {
    get(target, prop) {
      if (prop === "next") return () => breaker.call("a list page", false, () => target.next());
      if (prop === Symbol.asyncIterator) return () => wrapped;
      const value = Reflect.get(target, prop, target);
      return typeof value === "function" ? value.bind(target) : value;
    },
  });
  return wrapped;
}
