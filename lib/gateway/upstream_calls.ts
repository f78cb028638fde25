/**
 * The calls to GLM for one gateway process: each sent on a pool key (exchange.ts), its answer
 * relayed (relay.ts) and settled once (exits.ts); a key GLM refuses is left out and the request
 * sent again on another; every call in flight is cut when the server stops.
 */
import type { Config } from "../core/config.ts";
import { AppError } from "../core/errors.ts";
import { type Logger, redacted } from "../core/log.ts";
import { ClientLeft } from "../limits/upstream/slots.ts";
import type { KeyPool, PoolKey } from "../limits/upstream/pool.ts";
import { Exchange } from "./exchange.ts";
import { type Exit, type Observed, RequestEnd, type Settlement } from "./exits.ts";
import type { Protocol } from "./protocol.ts";
import { readErrorBody, relayAnswer } from "./relay.ts";
import { classifyRefusal, needsClassifying, type RefusalAlerts } from "./upstream_errors.ts";

/** Upstream response headers worth relaying (content-length/-encoding are the runtime's). */
const RELAYED_HEADERS = ["content-type", "cache-control", "retry-after"];

export /** One request on its way upstream: what every exchange for it is built from. */
interface Call {
  protocol: Protocol;
  req: Request;
  bytes: Uint8Array<ArrayBuffer>;
  requestId: string;
  /** performance.now() when it arrived. */
  started: number;
  /** The model it is forwarded as. */
  model: string;
  /** What the request log and the metrics take from it. */
  observe?: Observed;
}

export class UpstreamCalls {
  /** A pool key's headers and content type, per endpoint (built once). */
  private readonly upstreamHeaders = new Map<string, Record<string, string>>();
  /** Upstream calls whose answers are not settled yet (what shutdown() cuts). */
  private readonly calls = new Set<Exchange>();

  constructor(
    private readonly config: Config,
    private readonly log: Logger,
    private readonly pool: KeyPool,
    private readonly alerts: RefusalAlerts,
  ) {}

  /** Starts the upstream call on a pool key (exchange.ts), tracked until it is settled. */
  send(call: Call, key: PoolKey, client = call.req.signal): Exchange {
    const exchange = new Exchange({
      url: call.protocol.upstreamUrl(this.config),
      headers: this.headersFor(call.protocol, key, call.req),
      body: call.bytes,
      client,
      timeoutMs: this.config.glm.timeoutMs,
      streamMaxMs: this.config.glm.streamMaxMs,
      started: call.started,
      key,
    });
    this.calls.add(exchange);
    return exchange;
  }

  /**
   * No pool key is in service (GLM refused every one): the admitted request is given back,
   * nothing counted, and the operator alerted.
   */
  /** Stops a call whose admission was refused after it began. */
  cancel(exchange: Exchange) {
    exchange.cancel();
    this.calls.delete(exchange);
  }

  async noKeyInService(call: Call, lease: Settlement): Promise<AppError> {
    this.alerts.unavailable(call.model, this.pool.keys.map((k) => k.hint));
    this.pool.countRefused();
    return await new RequestEnd(lease, this.log, {
      id: call.requestId,
      route: call.protocol.route,
      started: call.started,
      observe: call.observe,
    }).exit("no_key", this.config);
  }

  /** The upstream request's headers: a pool key, and the caller's relayed headers. */
  private headersFor(protocol: Protocol, key: PoolKey, req: Request) {
    const id = `${protocol.route} ${key.id}`;
    let headers = this.upstreamHeaders.get(id);
    if (!headers) {
      headers = { ...protocol.upstreamAuth(key.secret), "content-type": "application/json" };
      this.upstreamHeaders.set(id, headers);
    }
    for (const name of protocol.relayedHeaders) {
      const value = req.headers.get(name);
      if (value !== null) headers = { ...headers, [name]: value };
    }
    return headers;
  }

  /** An upstream error body with any copy of a pool key replaced (it reaches users). */
  private withoutMasterKeys(
    bytes: Uint8Array<ArrayBuffer> | null,
  ): Uint8Array<ArrayBuffer> | null {
    if (!bytes) return bytes;
    const text = decoder.decode(bytes);
    let clean = text;
    for (const key of this.config.glm.apiKeys) clean = redacted(clean, key);
    return clean === text ? bytes : new TextEncoder().encode(clean);
  }

  /**
   * Cuts every call in flight (a shutdown past its grace period): a streamed answer ends with
   * an error event and is charged what it had used, like an answer cut for time; a call still
   * waiting for the upstream's headers answers 503 and counts nothing. Resolves once their
   * settlements are done, or after `waitMs`.
   */
  async shutdown(waitMs = 5_000): Promise<void> {
    for (const call of this.calls) call.idle.fire("shutdown");
    const until = performance.now() + waitMs;
    while (this.calls.size && performance.now() < until) {
      await new Promise((r) => setTimeout(r, 20));
    }
  }

  /**
   * Waits for the upstream's answer and relays it; every ending settles through one RequestEnd.
   * A pool key GLM refuses (401/403, `1113`…) is left out, and the request is sent again on
   * another (`again`): charged once, or not at all when no key is in service.
   */
  async forward(
    first: Exchange,
    lease: Settlement,
    call: Call,
    again: () => Promise<Exchange | null>,
    queueMs?: number,
  ): Promise<Response> {
    const { protocol, requestId, model } = call;
    let exchange = first;
    const end = new RequestEnd(lease, this.log, {
      id: requestId,
      route: protocol.route,
      started: call.started,
      queueMs,
      observe: call.observe,
    }, () => {
      exchange.idle.stop();
      this.calls.delete(exchange);
    });
    while (true) {
      let upstream: Response;
      try {
        upstream = await exchange.response;
      } catch (err) {
        const exit = exitOf(exchange);
        if (exit === "timeout" || exit === "deadline" || exit === "unreachable") {
          this.log.warn("upstream failed", {
            id: requestId,
            userId: lease.user.id,
            model,
            error: exit === "unreachable" ? "upstream_unavailable" : "upstream_timeout",
            detail: err instanceof Error ? err.name : "error",
          });
        }
        throw await end.exit(exit, this.config);
      }
      exchange.idle.rest();
      end.ttfbMs = performance.now() - exchange.sent;
      const status = upstream.status;
      if (status >= 300 && status < 400) {
        // GLM does not redirect API calls: a redirect means GLM_BASE_URL or something in front
        // of it is wrong. Not followed (the master key stays here), not counted.
        await upstream.body?.cancel();
        this.log.warn("upstream redirected; not followed", {
          id: requestId,
          model,
          status,
          location: upstreamRedirectTarget(upstream.headers.get("location")),
        });
        throw await end.exit("redirected", this.config);
      }
      // An upstream 5xx is not counted (outcome "not_served"): its answer says so already.
      if (status >= 500) {
        lease.giveBack();
        this.log.warn("upstream error", { id: requestId, userId: lease.user.id, model, status });
      }
      if (!needsClassifying(status)) {
        return await relayAnswer(upstream, {
          protocol,
          exchange,
          end,
          lease,
          headers: this.answerHeaders(upstream.headers, lease, protocol, requestId),
          timeoutMs: this.config.glm.timeoutMs,
          streamMaxMs: this.config.glm.streamMaxMs,
          clean: (bytes) => this.withoutMasterKeys(bytes),
        });
      }
      // The operator's account refused, or is throttled: the user gets Keyway's own answer.
      const bytes = await readErrorBody(upstream.body, exchange.idle);
      const refusal = classifyRefusal(status, bytes, upstream.headers.get("retry-after"));
      const key = exchange.key;
      if (refusal.alert === "upstream.throttled") {
        this.alerts.refused(refusal, model, status, requestId, key);
      } else {
        // This key is refused: left out of the pool, and the request tried on another.
        await this.pool.coolDown(key, refusal.alert.slice("upstream.".length));
        this.alerts.refused(refusal, model, status, requestId, key);
        exchange.idle.stop();
        this.calls.delete(exchange);
        let next: Exchange | null;
        try {
          next = await again();
        } catch (err) {
          const [status, code] = err instanceof AppError
            ? [err.status, err.code]
            : [500, "internal_error"];
          await end.settle(null, status, "not_served", undefined, code);
          throw slotRefusal(err, lease.headers);
        }
        if (next) {
          this.log.info("upstream key refused; the request goes to another pool key", {
            id: requestId,
            model,
            keyHint: key.hint,
          });
          exchange = next;
          continue;
        }
        this.alerts.unavailable(model, this.pool.keys.map((k) => k.hint));
        this.pool.countRefused();
      }
      await end.settle(
        null,
        refusal.error.status,
        "not_served",
        refusal.alert,
        refusal.error.code,
      );
      throw new AppError(
        refusal.error.code,
        refusal.error.message,
        { ...lease.headers, ...refusal.error.headers },
        refusal.error.status,
      );
    }
  }

  /**
   * One plain record, converted once by the Response (a Headers object would be validated twice:
   * when built and again when the Response copies it). It also carries the framing headers
   * routes/mod.ts would otherwise set one by one (see `framed` there).
   */
  private answerHeaders(
    upstream: Headers,
    lease: Settlement,
    protocol: Protocol,
    requestId: string,
  ): Record<string, string> {
    const headers: Record<string, string> = {
      ...lease.headers,
      "x-request-id": requestId,
      "x-content-type-options": "nosniff",
      ...protocol.answerHeaders(requestId),
    };
    for (const name of RELAYED_HEADERS) {
      const value = upstream.get(name);
      if (value !== null) headers[name] = value;
    }
    const upstreamId = upstream.get("x-request-id") ?? upstream.get("request-id");
    if (upstreamId) headers["x-upstream-request-id"] = upstreamId;
    return headers;
  }
}

/** The ending of an exchange whose call failed before any answer: by why it stopped. */
function exitOf(exchange: Exchange): Exit {
  const stop = exchange.stopped;
  return stop === "client_left"
    ? "client_left"
    : stop === "shutdown"
    ? "shutdown"
    : stop === "upstream"
    ? "timeout"
    : stop === "deadline"
    ? "deadline"
    : "unreachable";
}

/** A wait for an upstream slot that ended without one, as the client's answer. */
export function slotRefusal(err: unknown, headers: Record<string, string>): unknown {
  if (err instanceof AppError) {
    return new AppError(err.code, err.message, { ...headers, ...err.headers }, err.status);
  }
  if (err instanceof ClientLeft) {
    return new AppError("upstream_unavailable", "The client disconnected.", headers);
  }
  return err; // KV failed: 500, logged with the request id
}

/** Where a redirect pointed, for the operator's log: its origin and path, never its query. */
function upstreamRedirectTarget(location: string | null): string | null {
  if (!location) return null;
  try {
    const url = new URL(location, "http://relative.invalid");
    return url.origin === "http://relative.invalid" ? url.pathname : `${url.origin}${url.pathname}`;
  } catch {
    return "(not a URL)";
  }
}

const decoder = new TextDecoder();
