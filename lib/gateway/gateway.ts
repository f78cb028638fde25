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
import { ClientLeft, type SlotHold, type UpstreamSlots } from "../limits/upstream/slots.ts";
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
  private readonly upstreamHeaders = new Map<Protocol, Record<string, string>>();
  /** Upstream calls whose answers are not settled yet (what shutdown() cuts). */
  private readonly calls = new Set<Exchange>();
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
    const masterKey = this.config.glm.apiKey;
    if (!masterKey) {
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
    const headers = this.headersFor(protocol, masterKey, req);
    /**
     * The upstream call, started as soon as the snapshot admits the request — while the admission
     * commit is in flight (CONTRACT §5): its latency hides behind the upstream's. Nothing of the
     * answer is relayed, and nothing counted, before the admission is durable.
     */
    let call: Exchange | undefined;
    const send = (client = req.signal) =>
      call ??= this.send(protocol, client, bytes, headers, started);
    // A model with an upstream cap waits for its slot: no call before that.
    const capped = this.slots.capOf(target) > 0;
    if (!protocol.metered) {
      const status = await limitStatus(this.kv, this.config, userId);
      const rate = this.currentHeaders(status);
      const user = validate(status.user, rate);
      const settlement = await this.unmetered(user, target, rate, capped, req);
      return await this.forward(send(), settlement, protocol, requestId, started);
    }
    const onAdmitted = capped ? undefined : () => void send();
    const lease = await this.admit(body, target, userId, validate, onAdmitted)
      .catch((err) => {
        // A change that landed before the commit (a disable, another process taking the last of
        // the allowance) refused it after all: the call is cancelled at once, nothing counted.
        if (call) {
          call.cancel();
          this.calls.delete(call);
          this.log.info("admission refused after the upstream call began; call cancelled", {
            id: requestId,
            userId,
            model: target,
            error: err instanceof AppError ? err.code : String(err),
          });
        }
        throw err;
      });
    if (!capped) return await this.forward(send(), lease, protocol, requestId, started);
    // The client as the wait sees it: its request's signal, or the early answer's hang-up.
    const left = new AbortController();
    const client = AbortSignal.any([req.signal, left.signal]);
    const waiting = this.waitForSlot(lease, protocol, client, requestId, started);
    const forward = (queueMs: number) =>
      this.forward(send(client), lease, protocol, requestId, started, queueMs);
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

  private admit(
    body: RequestBody,
    model: string,
    userId: string,
    validate: (user: UserRecord | null, headers: Record<string, string>) => UserRecord,
    onAdmitted: (() => void) | undefined,
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
      waitsForSlot: onAdmitted === undefined,
    });
  }

  /** The upstream request's headers: the operator's key, and the caller's relayed headers. */
  private headersFor(protocol: Protocol, masterKey: string, req: Request) {
    let headers = this.upstreamHeaders.get(protocol);
    if (!headers) {
      headers = { ...protocol.upstreamAuth(masterKey), "content-type": "application/json" };
      this.upstreamHeaders.set(protocol, headers);
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
  private async waitForSlot(
    lease: Lease,
    protocol: Protocol,
    client: AbortSignal,
    requestId: string,
    started: number,
  ): Promise<number> {
    try {
      const waited = await this.slots.acquire(lease, client);
      if (!client.aborted) return waited;
      throw new ClientLeft();
    } catch (err) {
      const queueMs = performance.now() - started;
      const end = new RequestEnd(lease, this.log, {
        id: requestId,
        route: protocol.route,
        started,
        queueMs,
      });
      if (err instanceof ClientLeft) throw await end.exit("left_waiting", this.config);
      await end.settle(null, err instanceof AppError ? err.status : 500, "not_served");
      throw slotRefusal(err, lease.headers);
    }
  }

  /**
   * count_tokens: its own limits (COUNT_TOKENS_RPM, 2 in flight; 429), then an upstream slot
   * when the model has a cap — it reaches GLM with the master key like any call.
   */
  private async unmetered(
    user: UserRecord,
    model: string,
    headers: Record<string, string>,
    capped: boolean,
    req: Request,
  ): Promise<Settlement> {
    const flight = await this.countTokens.take(user.id, headers);
    let hold: SlotHold | undefined;
    if (capped) {
      try {
        hold = await this.slots.acquireHold(user.id, model, req.signal);
        if (req.signal.aborted) throw new ClientLeft();
      } catch (err) {
        await Promise.all([flight.release(), hold?.release()]);
        throw slotRefusal(err, headers);
      }
    }
    return new Unmetered(
      user,
      model,
      headers,
      () => Promise.all([flight.release(), hold?.release()]),
    );
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

  /** Starts the upstream call (exchange.ts), tracked until its answer is settled. */
  private send(
    protocol: Protocol,
    client: AbortSignal,
    bytes: Uint8Array<ArrayBuffer>,
    headers: Record<string, string>,
    started: number,
  ): Exchange {
    const call = new Exchange({
      url: protocol.upstreamUrl(this.config),
      headers,
      body: bytes,
      client,
      timeoutMs: this.config.glm.timeoutMs,
      streamMaxMs: this.config.glm.streamMaxMs,
      started,
    });
    this.calls.add(call);
    return call;
  }

  /** An upstream error body with any copy of GLM_API_KEY replaced (it reaches users). */
  private withoutMasterKey(bytes: Uint8Array<ArrayBuffer> | null): Uint8Array<ArrayBuffer> | null {
    if (!bytes) return bytes;
    const text = decoder.decode(bytes);
    const clean = redacted(text, this.config.glm.apiKey);
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

  /** Waits for the upstream's answer and relays it; every ending settles through one RequestEnd. */
  private async forward(
    call: Exchange,
    lease: Settlement,
    protocol: Protocol,
    requestId: string,
    started: number,
    queueMs?: number,
  ): Promise<Response> {
    const model = lease.model;
    const end = new RequestEnd(lease, this.log, {
      id: requestId,
      route: protocol.route,
      started,
      queueMs,
    }, () => {
      call.idle.stop();
      this.calls.delete(call);
    });
    let upstream: Response;
    try {
      upstream = await call.response;
    } catch (err) {
      const stop = call.stopped;
      const exit: Exit = stop === "client_left"
        ? "client_left"
        : stop === "shutdown"
        ? "shutdown"
        : stop === "upstream"
        ? "timeout"
        : stop === "deadline"
        ? "deadline"
        : "unreachable";
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
    call.idle.rest();
    const status = upstream.status;
    if (status >= 300 && status < 400) {
      // GLM does not redirect API calls: a redirect means GLM_BASE_URL or something in front of
      // it is wrong. Not followed (the master key stays here), not counted.
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
    if (needsClassifying(status)) {
      // The operator's account refused, or is throttled: the user gets Keyway's own answer.
      const bytes = await readErrorBody(upstream.body, call.idle);
      const refusal = classifyRefusal(status, bytes, upstream.headers.get("retry-after"));
      await end.settle(null, refusal.error.status, "not_served", refusal.alert);
      this.alerts.refused(refusal, model, status, requestId);
      throw new AppError(
        refusal.error.code,
        refusal.error.message,
        { ...lease.headers, ...refusal.error.headers },
        refusal.error.status,
      );
    }
    return await relayAnswer(upstream, {
      protocol,
      exchange: call,
      end,
      lease,
      headers: this.answerHeaders(upstream.headers, lease, protocol, requestId),
      timeoutMs: this.config.glm.timeoutMs,
      streamMaxMs: this.config.glm.streamMaxMs,
      clean: (bytes) => this.withoutMasterKey(bytes),
    });
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
