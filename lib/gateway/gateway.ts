/**
 * The GLM gateway: an OpenAI- and Anthropic-compatible proxy in front of the operator's GLM
 * account, one Protocol module per endpoint (lib/gateway/protocols/).
 *
 * auth → admit → slot → exchange → settle. A request is checked in the contract's order — key
 * (401) → user state (403) → model (400) → request limits, concurrency, quotas (429) → upstream —
 * and admitted as a Lease (lib/limits/admission.ts) that holds a slot and reserves its estimated
 * tokens. The body is forwarded as the bytes that arrived (re-serialized only when an alias or
 * another casing of the model was asked for); the answer is relayed (relay.ts) while its
 * protocol's meter watches for `usage`, and the lease is settled — its usage committed — before
 * the answer's last byte. Every way a request ends goes through one RequestEnd (exits.ts).
 */
import { type Clock, systemClock } from "../core/clock.ts";
import type { Config } from "../core/config.ts";
import { AppError } from "../core/errors.ts";
import { keys } from "../core/kv.ts";
import { type Logger, redacted } from "../core/log.ts";
import { ApiKeyAuth } from "../identity/api_key_auth.ts";
import type { UserRecord } from "../identity/users.ts";
import type { Charge, Lease, Ledger } from "../limits/admission.ts";
import { rateHeaders } from "../limits/policy.ts";
import { type LimitStatus, limitStatus } from "../limits/status.ts";
import { CountTokensLimiter } from "../limits/count_tokens.ts";
import {
  ClientLeft,
  type SlotHold,
  type Taken,
  type UpstreamSlots,
} from "../limits/upstream/slots.ts";
import type { KeyPool, PoolKey } from "../limits/upstream/pool.ts";
import { Exchange } from "./exchange.ts";
import { type Exit, RequestEnd, type Settlement } from "./exits.ts";
import { ModelCatalog } from "./models.ts";
import { bearerToken, type Protocol } from "./protocol.ts";
import { anthropicKey } from "./protocols/anthropic_messages.ts";
import { readErrorBody, relayAnswer } from "./relay.ts";
import { answerWhileWaiting } from "./waiting_stream.ts";
import {
  declaredLength,
  MAX_BODY_BYTES,
  readBody,
  type RequestBody,
  tooLarge,
  withModel,
} from "./request_body.ts";
import {
  classifyRefusal,
  needsClassifying,
  RefusalAlerts,
  type UpstreamNotifier,
} from "./upstream_errors.ts";

export { MAX_BODY_BYTES };
export type { UpstreamNotifier };

/** The most bytes of request bodies that may wait for upstream slots in one process (CONTRACT §5). */
const MAX_WAITING_BYTES = 256 * 1024 * 1024;

/** Upstream response headers worth relaying (content-length/-encoding are the runtime's). */
const RELAYED_HEADERS = ["content-type", "cache-control", "retry-after"];

interface GatewayDeps {
  config: Config;
  kv: Deno.Kv;
  log: Logger;
  ledger: Ledger;
  slots: UpstreamSlots;
  notify?: UpstreamNotifier;
  clock?: Clock;
}

/** One request on its way upstream: what every exchange for it is built from. */
interface Call {
  protocol: Protocol;
  req: Request;
  bytes: Uint8Array<ArrayBuffer>;
  requestId: string;
  /** performance.now() when it arrived. */
  started: number;
  /** The model it is forwarded as. */
  model: string;
}

/**
 * count_tokens: relayed with the rate headers as they stand; nothing counted. Settling ends its
 * own limits' flight and frees its upstream slot.
 */
class Unmetered implements Settlement {
  private settled: Promise<Charge> | null = null;
  constructor(
    readonly user: UserRecord,
    readonly model: string,
    readonly headers: Record<string, string>,
    private readonly release: () => Promise<unknown>,
  ) {}
  settle(): Promise<Charge> {
    return this.settled ??= this.release().then(() => ({
      promptTokens: 0,
      completionTokens: 0,
      estimated: false,
    }));
  }
  relayed(): void {}
  giveBack(): void {}
}

export class Gateway {
  private readonly config: Config;
  private readonly kv: Deno.Kv;
  private readonly log: Logger;
  private readonly ledger: Ledger;
  private readonly slots: UpstreamSlots;
  private readonly countTokens: CountTokensLimiter;
  private readonly auth: ApiKeyAuth;
  private readonly alerts: RefusalAlerts;
  readonly models: ModelCatalog;
  /** The operator's key and content type, per endpoint (built once). */
  private readonly upstreamHeaders = new Map<string, Record<string, string>>();
  /** Upstream calls whose answers are not settled yet (what shutdown() cuts). */
  private readonly calls = new Set<Exchange>();
  /** Bytes of the bodies of this process's requests waiting for an upstream slot. */
  private waitingBytes = 0;
  private readonly clock: Clock;

  constructor(deps: GatewayDeps) {
    this.config = deps.config;
    this.kv = deps.kv;
    this.log = deps.log;
    this.ledger = deps.ledger;
    this.slots = deps.slots;
    this.auth = new ApiKeyAuth(deps.kv);
    this.countTokens = new CountTokensLimiter(deps.kv, deps.config, { log: deps.log });
    this.clock = deps.clock ?? systemClock;
    this.alerts = new RefusalAlerts(deps.log, deps.notify, this.clock);
    this.models = new ModelCatalog(deps.config);
  }

  /**
   * Serves one gateway endpoint: the key (401), the body, then one admission — user state
   * (403), model (400), request limits, concurrency and quotas (429) — and the upstream call,
   * relayed and settled. Unmetered endpoints check the same but take no lease.
   */
  async handle(protocol: Protocol, req: Request, requestId = ""): Promise<Response> {
    const started = performance.now();
    if ((declaredLength(req) ?? 0) > MAX_BODY_BYTES) throw tooLarge(); // refused unread
    if (!this.pool.size && !this.config.glm.apiKeys.length) {
      this.log.warn("gateway not configured: GLM_API_KEY is not set", { id: requestId });
      throw new AppError("not_configured", "The gateway has no upstream key (GLM_API_KEY).");
    }
    const hash = await this.auth.hash(protocol.apiKey(req.headers));
    // Read the body while the key is looked up; its errors are reported after the key checks.
    const [body, userId] = await Promise.all([readBody(req, protocol), this.auth.userIdFor(hash)]);
    /** The model the request is forwarded, limited, metered and priced as (or the refusal). */
    const target = body instanceof AppError ? body : this.models.resolve(body.model);
    const validate = (user: UserRecord | null, headers: Record<string, string>) => {
      const checked = this.auth.check(hash, userId, user, headers);
      if (target instanceof AppError) throw new AppError(target.code, target.message, headers);
      return checked;
    };
    if (body instanceof AppError || target instanceof AppError) {
      // Refused on the key, the user's state or the body, in that order: nothing to admit.
      const status = await limitStatus(this.kv, this.config, userId);
      validate(status.user, this.currentHeaders(status));
      throw target; // unreachable: validate() threw
    }
    const bytes = target === body.model ? body.bytes : withModel(body.bytes, target);
    const call: Call = { protocol, req, bytes, requestId, started, model: target };
    // A model with an upstream cap waits for its slot (on a pool key): no call before that.
    const capped = this.slots.capOf(target) > 0;
    if (!protocol.metered) {
      const status = await limitStatus(this.kv, this.config, userId);
      const rate = this.currentHeaders(status);
      return await this.unmetered(call, validate(status.user, rate), rate, capped);
    }
    /**
     * Uncapped, the upstream call starts as soon as the snapshot admits the request — while the
     * admission commit is in flight (CONTRACT §5): its latency hides behind the upstream's.
     * Nothing of the answer is relayed, and nothing counted, before the admission is durable.
     */
    const key = capped ? null : await this.pool.pick();
    let early: Exchange | undefined;
    const onAdmitted = key ? () => void (early ??= this.send(call, key)) : undefined;
    const lease = await this.admit(body, target, userId, validate, onAdmitted, capped)
      .catch((err) => {
        // A change that landed before the commit (a disable, another process taking the last of
        // the allowance) refused it after all: the call is cancelled at once, nothing counted.
        if (early) {
          early.cancel();
          this.calls.delete(early);
          this.log.info("admission refused after the upstream call began; call cancelled", {
            id: requestId,
            userId,
            model: target,
            error: err instanceof AppError ? err.code : String(err),
          });
        }
        throw err;
      });
    if (!capped) {
      if (!key) throw await this.noKeyInService(call, lease);
      const again = async () => {
        const next = await this.pool.pick();
        return next ? this.send(call, next) : null;
      };
      return await this.forward(early ??= this.send(call, key), lease, call, again);
    }
    if (!(await this.pool.inService()).length) throw await this.noKeyInService(call, lease);
    // The client as the wait sees it: its request's signal, or the early answer's hang-up.
    const left = new AbortController();
    const client = AbortSignal.any([req.signal, left.signal]);
    const waiting = this.waitForSlot(lease, call, client);
    /** Its pool key refused: the slot goes back, and the request waits for one on another key. */
    const again = async () => {
      if (!(await this.pool.inService()).length) return null;
      await this.ledger.detachSlot(lease);
      return this.send(call, (await this.slots.acquire(lease, client)).key, client);
    };
    const forward = (taken: Taken) =>
      this.forward(this.send(call, taken.key, client), lease, call, again, taken.waitedMs);
    if (!body.stream) return await forward(await waiting);
    return await answerWhileWaiting({
      protocol,
      waiting,
      headers: {
        ...lease.headers,
        "x-request-id": requestId,
        "x-content-type-options": "nosniff",
        ...protocol.answerHeaders(requestId),
      },
      leave: () => left.abort(),
      forward,
    });
  }

  /**
   * No pool key is in service (GLM refused every one): the admitted request is given back,
   * nothing counted, and the operator alerted.
   */
  private async noKeyInService(call: Call, lease: Settlement): Promise<AppError> {
    this.alerts.unavailable(call.model, this.pool.keys.map((k) => k.hint));
    return await new RequestEnd(lease, this.log, {
      id: call.requestId,
      route: call.protocol.route,
      started: call.started,
    }).exit("no_key", this.config);
  }

  private admit(
    body: RequestBody,
    model: string,
    userId: string,
    validate: (user: UserRecord | null, headers: Record<string, string>) => UserRecord,
    onAdmitted: (() => void) | undefined,
    waitsForSlot: boolean,
  ): Promise<Lease> {
    const output = this.config.outputReserveTokens;
    return this.ledger.admit({
      userId,
      model,
      reserve: {
        prompt: body.promptTokens,
        output: body.outputCap === null ? output : Math.min(body.outputCap, output),
      },
      validate,
      onAdmitted,
      waitsForSlot,
    });
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

  /**
   * Takes the lease's upstream slot (UPSTREAM_CONCURRENCY), waiting in line. A request that gets
   * none in time, or whose client leaves meanwhile, is settled at once: not counted (the former)
   * or with nothing used (the latter).
   */
  private async waitForSlot(lease: Lease, call: Call, client: AbortSignal): Promise<Taken> {
    const size = call.bytes.byteLength;
    try {
      if (this.waitingBytes + size > MAX_WAITING_BYTES) throw this.tooMuchWaiting();
      this.waitingBytes += size;
      try {
        const taken = await this.slots.acquire(lease, client);
        if (!client.aborted) return taken;
        throw new ClientLeft();
      } finally {
        this.waitingBytes -= size;
      }
    } catch (err) {
      const end = new RequestEnd(lease, this.log, {
        id: call.requestId,
        route: call.protocol.route,
        started: call.started,
        queueMs: performance.now() - call.started,
      });
      if (err instanceof ClientLeft) throw await end.exit("left_waiting", this.config);
      await end.settle(null, err instanceof AppError ? err.status : 500, "not_served");
      throw slotRefusal(err, lease.headers);
    }
  }

  /**
   * count_tokens: its own limits (COUNT_TOKENS_RPM, 2 in flight; 429), then an upstream slot
   * when the model has a cap — it reaches GLM with the operator's key like any call.
   */
  private async unmetered(
    call: Call,
    user: UserRecord,
    headers: Record<string, string>,
    capped: boolean,
  ): Promise<Response> {
    const flight = await this.countTokens.take(user.id, headers);
    const signal = call.req.signal;
    let hold: SlotHold | undefined;
    const take = async () => {
      hold = await this.slots.acquireHold(user.id, call.model, signal);
      if (signal.aborted) throw new ClientLeft();
      return hold.poolKey!;
    };
    let key: PoolKey | null;
    try {
      key = capped ? await take() : await this.pool.pick();
    } catch (err) {
      await Promise.all([flight.release(), hold?.release()]);
      throw slotRefusal(err, headers);
    }
    const settlement = new Unmetered(
      user,
      call.model,
      headers,
      () => Promise.all([flight.release(), hold?.release()]),
    );
    if (!key) throw await this.noKeyInService(call, settlement);
    const again = async () => {
      if (!(await this.pool.inService()).length) return null;
      if (!capped) return this.send(call, (await this.pool.pick())!);
      await hold?.release();
      return this.send(call, await take());
    };
    return await this.forward(this.send(call, key), settlement, call, again);
  }

  /** Beyond MAX_WAITING_BYTES of bodies waiting for slots in this process: 503 at once. */
  private tooMuchWaiting(): AppError {
    return new AppError(
      "upstream_busy",
      "Too many requests are waiting for an upstream slot; retry in 5s. " +
        "Nothing was counted against your limits.",
      { "retry-after": "5" },
    );
  }

  /** The GLM keys (GLM_API_KEY), shared with the upstream slots. */
  private get pool(): KeyPool {
    return this.slots.pool;
  }

  /** Rate headers as they stand, for answers that consume nothing. */
  private currentHeaders(status: LimitStatus) {
    return rateHeaders(status.limits, status.view, this.clock());
  }

  /**
   * GET /v1/models (the allowed models) and GET /v1/models/{id} (one of them, an alias of one,
   * or 404), for any active key.
   */
  async listModels(req: Request, id?: string): Promise<Response> {
    const hash = await this.auth.hash(anthropicKey(req.headers));
    const userId = await this.auth.userIdFor(hash);
    const user = await this.kv.get<UserRecord>(keys.user(userId));
    this.auth.check(hash, userId, user.value, {});
    const body = id === undefined ? this.models.listJson : this.models.entryJson(id);
    if (body === null) {
      throw new AppError(
        "not_found",
        `model: "${id}" is not available here; GET /v1/models lists them.`,
      );
    }
    return new Response(body, { headers: { "content-type": "application/json; charset=UTF-8" } });
  }

  /** The user owning a `Bearer kw_…` key (any status), or 401 invalid_api_key. */
  authenticate(authorization: string | null | undefined): Promise<UserRecord> {
    return this.auth.user(bearerToken(authorization));
  }

  /** Starts the upstream call on a pool key (exchange.ts), tracked until it is settled. */
  private send(call: Call, key: PoolKey, client = call.req.signal): Exchange {
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
  private async forward(
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
          await end.settle(null, err instanceof AppError ? err.status : 500, "not_served");
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
      }
      await end.settle(null, refusal.error.status, "not_served", refusal.alert);
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
function slotRefusal(err: unknown, headers: Record<string, string>): unknown {
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
