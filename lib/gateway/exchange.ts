/**
 * One upstream call: sent once, watched by one watchdog (UPSTREAM_TIMEOUT_MS for the headers,
 * then for each next piece of the answer; STREAM_MAX_MS end to end), cancelled when the client
 * leaves before the headers. Why it stopped early is one reason, set once, whoever noticed first.
 */
import type { PoolKey } from "../limits/upstream/pool.ts";

/**
 * Why an answer is cut: a silent upstream or client, STREAM_MAX_MS, or the server stopping.
 */
export type Stall = "upstream" | "client" | "deadline" | "shutdown";

/**
 * The relay's watchdog. Calls `onStall` once, when one wait lasts `ms` — for the upstream (its
 * headers, then each read of its body) or for the client (between a chunk handed over and its
 * next read: a client that reads nothing holds the upstream call and its slots) — or when the
 * whole answer has taken `maxMs`. Each step costs a clock read; the process's one timer
 * (`watchdogs`) looks at every watchdog when the first of them could have stalled.
 */
export class IdleTimer {
  private since = performance.now();
  private readonly deadline: number;
  private phase: "upstream" | "client" = "upstream";
  private done = false;

  constructor(
    private readonly ms: number,
    maxMs: number,
    private readonly onStall: (stall: Stall) => void,
    started = this.since,
  ) {
    this.deadline = started + maxMs;
    watchdogs.add(this, this.due());
  }

  /** A read from the upstream starts: the clock runs from now. */
  wait() {
    this.since = performance.now();
    this.phase = "upstream";
  }

  /** A read is over: now the client's turn to ask for more. */
  rest() {
    this.since = performance.now();
    this.phase = "client";
  }

  stop() {
    if (this.done) return;
    this.done = true;
    watchdogs.remove(this);
  }

  /** Fires now, as if the wait had run out (the server is shutting down). */
  fire(stall: Stall) {
    this.stop();
    this.onStall(stall);
  }

  /** The soonest this watchdog could stall, as things stand. */
  private due(): number {
    return Math.min(this.since + this.ms, this.deadline);
  }

  /** Looked at `now` by the process's timer: stalls (null), or when to look again. */
  check(now: number): number | null {
    const stall = now >= this.deadline
      ? "deadline"
      : now - this.since >= this.ms
      ? this.phase
      : null;
    if (stall === null) return this.due();
    this.done = true;
    this.onStall(stall);
    return null;
  }
}

/**
 * One timer for the process's watchdogs instead of one per request (a timer is a Node-compatible
 * object here: arming one cost more CPU than the rest of the watchdog together). It is armed for
 * the earliest moment one of them could stall; then each is looked at, and it is armed again for
 * the next. With no watchdog left it is cleared, so an idle process holds no timer.
 */
class Watchdogs {
  private readonly live = new Set<IdleTimer>();
  private timer: ReturnType<typeof setTimeout> | undefined;
  private armedFor = Infinity;

  add(watchdog: IdleTimer, due: number) {
    this.live.add(watchdog);
    if (due < this.armedFor) this.arm(due);
  }

  remove(watchdog: IdleTimer) {
    this.live.delete(watchdog);
    if (!this.live.size) this.disarm();
  }

  private disarm() {
    clearTimeout(this.timer);
    this.timer = undefined;
    this.armedFor = Infinity;
  }

  private arm(due: number) {
    clearTimeout(this.timer);
    this.armedFor = due;
    this.timer = setTimeout(() => this.look(), Math.max(0, due - performance.now()));
  }

  private look() {
    this.timer = undefined;
    this.armedFor = Infinity;
    const now = performance.now();
    let next = Infinity;
    for (const watchdog of this.live) {
      const due = watchdog.check(now);
      if (due === null) this.live.delete(watchdog);
      else next = Math.min(next, due);
    }
    if (next < this.armedFor) this.arm(next);
  }
}

const watchdogs = new Watchdogs();

/** Why a call stopped before its answer ended: a watchdog stall, or the client leaving. */
export type StopReason = Stall | "client_left";

export interface ExchangeOptions {
  url: string;
  headers: Record<string, string>;
  body: Uint8Array<ArrayBuffer>;
  /** The client's request: its hang-up before the answer's headers cancels the call. */
  client: AbortSignal;
  timeoutMs: number;
  streamMaxMs: number;
  /** performance.now() when the request arrived (STREAM_MAX_MS counts from there). */
  started: number;
  /** The pool key the call is made with. */
  key: PoolKey;
}

export class Exchange {
  readonly response: Promise<Response>;
  /** The pool key the call is made with. */
  readonly key: PoolKey;
  readonly idle: IdleTimer;
  /** performance.now() when the call was sent (the upstream's time to first byte counts from here). */
  readonly sent = performance.now();
  private readonly abort = new AbortController();
  private reason: StopReason | null = null;
  /** The relay's cut, once it relays a body (a stop then ends the answer being relayed). */
  private cut: ((reason: StopReason) => void) | null = null;

  constructor(o: ExchangeOptions) {
    this.key = o.key;
    this.idle = new IdleTimer(o.timeoutMs, o.streamMaxMs, (stall) => this.stop(stall), o.started);
    // Only until the headers arrive: after that the relay's cancel() notices the client leaving.
    // (deno.json opts out of Deno's legacy behaviour of also aborting request.signal once a
    // response has been sent.)
    const onClientGone = () => this.stop("client_left");
    if (o.client.aborted) onClientGone();
    else o.client.addEventListener("abort", onClientGone, { once: true });
    this.response = fetch(o.url, {
      method: "POST",
      headers: o.headers,
      body: o.body,
      signal: this.abort.signal,
      // Never followed: the master key must not go to another origin.
      redirect: "manual",
    });
    this.response.catch(() => {}); // awaited by the gateway, unless the admission was refused
    const done = () => o.client.removeEventListener("abort", onClientGone);
    this.response.then(done, done);
  }

  /** Why the call stopped early, or null. */
  get stopped(): StopReason | null {
    return this.reason;
  }

  /** Stops the call for a reason (the first reason is the one kept). */
  stop(reason: StopReason) {
    this.reason ??= reason;
    if (this.cut) this.cut(reason);
    else this.abort.abort();
  }

  /** The relay takes over stops: `cut` ends the answer being relayed. */
  relaying(cut: (reason: StopReason) => void) {
    this.cut = cut;
  }

  /** Aborts the upstream call (the relay's cut, or a client gone mid-answer). */
  abortUpstream() {
    this.abort.abort();
  }

  /** Stops the call without a reason to report (its admission was refused after all). */
  cancel() {
    this.idle.stop();
    this.abort.abort();
  }
}
