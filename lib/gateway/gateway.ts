/**
 * The GLM gateway: an OpenAI- and Anthropic-compatible proxy in front of the operator's GLM
 * account, one Protocol module per endpoint (lib/gateway/protocols/).
 *
 * auth → admit → slot → exchange → settle. A request is checked in the contract's order — key
 * (401) → user state (403) → model (400) → request limits, concurrency, quotas (429; 403 when
 * spent until a reset) → upstream — and admitted as a Lease (lib/limits/admission.ts) that holds a slot and reserves its estimated
 * tokens. The body is forwarded as the bytes that arrived (re-serialized only when an alias or
 * another casing of the model was asked for); the answer is relayed (relay.ts) while its
 * protocol's meter watches for `usage`, and the lease is settled — its usage committed — before
 * the answer's last byte. Every way a request ends goes through one RequestEnd (exits.ts).
 */
import { type Clock, systemClock } from "../core/clock.ts";
import type { Config } from "../core/config.ts";
import { AppError } from "../core/errors.ts";
import { keys } from "../core/kv.ts";
import type { Logger } from "../core/log.ts";
import { ApiKeyAuth, type KeyAuth, type KeyOwner } from "../identity/api_key_auth.ts";
import type { UserRecord } from "../identity/users.ts";
import type { Lease, Ledger } from "../limits/admission.ts";
import { rateHeaders } from "../limits/policy.ts";
import { type LimitStatus, limitStatus } from "../limits/status.ts";
import { CountTokensLimiter } from "../limits/count_tokens.ts";
import { CountTokensCalls } from "./count_tokens_calls.ts";
import { ClientLeft, type Taken, type UpstreamSlots } from "../limits/upstream/slots.ts";
import type { KeyPool } from "../limits/upstream/pool.ts";
import { Exchange } from "./exchange.ts";
import { type Observed, RequestEnd } from "./exits.ts";
import { ModelCatalog } from "./models.ts";
import { bearerToken, type Protocol } from "./protocol.ts";
import { anthropicKey } from "./protocols/anthropic_messages.ts";
import { answerWhileWaiting } from "./waiting_stream.ts";
import { type Call, slotRefusal, UpstreamCalls } from "./upstream_calls.ts";
import { declaredLength, readBody, type RequestBody, tooLarge, withModel } from "./request_body.ts";
import { RefusalAlerts, type UpstreamNotifier } from "./upstream_errors.ts";
import type { RequestLog } from "../observe/request_log.ts";
import type { Metrics } from "../observe/metrics.ts";

export type { UpstreamNotifier };

/** The most bytes of request bodies that may wait for upstream slots in one process (CONTRACT §5). */
const MAX_WAITING_BYTES = 256 * 1024 * 1024;

interface GatewayDeps {
  config: Config;
  kv: Deno.Kv;
  log: Logger;
  ledger: Ledger;
  slots: UpstreamSlots;
  notify?: UpstreamNotifier;
  clock?: Clock;
  /** The per-request log (refusals; admitted requests are logged by their settlement). */
  requestLog?: RequestLog;
  metrics?: Metrics;
}

/** What a request showed before it ended, for logging a refusal (set as it is learned). */
interface Seen {
  started: number;
  userId: string | null;
  keyId: string | null;
  /** A lease was taken: its settlement logs the request, not the refusal path. */
  admitted: boolean;
  /** What its RequestEnd reports to (it marks the request ended: not a refusal then). */
  observed: Observed | null;
  requestedModel: string | null;
  model: string | null;
  stream: boolean;
}

export class Gateway {
  private readonly config: Config;
  private readonly kv: Deno.Kv;
  private readonly log: Logger;
  private readonly ledger: Ledger;
  private readonly slots: UpstreamSlots;
  private readonly countTokens: CountTokensCalls;
  private readonly auth: ApiKeyAuth;
  private readonly alerts: RefusalAlerts;
  readonly models: ModelCatalog;
  /** The operator's key and content type, per endpoint (built once). */

  /** The calls to GLM: sent, relayed, sent again on another key, cut at shutdown. */
  private readonly upstream: UpstreamCalls;
  /** Bytes of the bodies of this process's requests waiting for an upstream slot. */
  private waitingBytes = 0;
  private readonly clock: Clock;
  private readonly requestLog: RequestLog | null;
  private readonly metrics: Metrics | null;

  constructor(deps: GatewayDeps) {
    this.config = deps.config;
    this.kv = deps.kv;
    this.log = deps.log;
    this.ledger = deps.ledger;
    this.slots = deps.slots;
    this.auth = new ApiKeyAuth(deps.kv);
    this.clock = deps.clock ?? systemClock;
    this.alerts = new RefusalAlerts(deps.log, deps.notify, this.clock);
    this.upstream = new UpstreamCalls(deps.config, deps.log, deps.slots.pool, this.alerts);
    this.countTokens = new CountTokensCalls(
      new CountTokensLimiter(deps.kv, deps.config, { log: deps.log }),
      deps.slots,
      this.upstream,
    );
    this.models = new ModelCatalog(deps.config);
    this.requestLog = deps.requestLog ?? null;
    this.metrics = deps.metrics ?? null;
  }

  /**
   * Serves one gateway endpoint: the key (401), the body, then one admission — user state
   * (403), model (400), request limits, concurrency and quotas (429; 403 when spent until a reset)
   * — and the upstream call, relayed and settled. Unmetered endpoints check the same but take no lease.
   * A refusal before admission is logged (lib/observe/request_log.ts) and counted as it passes.
   */
  handle(protocol: Protocol, req: Request, requestId = ""): Promise<Response> {
    const seen: Seen = {
      started: performance.now(),
      userId: null,
      keyId: null,
      admitted: false,
      observed: null,
      requestedModel: null,
      model: null,
      stream: false,
    };
    return this.serve(protocol, req, requestId, seen).catch((err) => {
      if (err instanceof AppError && !seen.admitted && !seen.observed?.ended) {
        this.refused(protocol, req, requestId, seen, err);
      }
      throw err;
    });
  }

  private async serve(
    protocol: Protocol,
    req: Request,
    requestId: string,
    seen: Seen,
  ): Promise<Response> {
    const started = seen.started;
    const maxBytes = this.config.maxRequestBytes;
    if ((declaredLength(req) ?? 0) > maxBytes) throw tooLarge(maxBytes); // refused unread
    if (!this.pool.size && !this.config.glm.apiKeys.length) {
      this.log.warn("gateway not configured: GLM_API_KEY is not set", { id: requestId });
      throw new AppError("not_configured", "The gateway has no upstream key (GLM_API_KEY).");
    }
    const hash = await this.auth.hash(protocol.apiKey(req.headers));
    // Read the body while the key is looked up; its errors are reported after the key checks.
    const [body, { userId, keyId }] = await Promise.all([
      readBody(req, protocol, maxBytes),
      this.auth.owner(hash),
    ]);
    seen.userId = userId;
    seen.keyId = keyId;
    /** The model the request is forwarded, limited, metered and priced as (or the refusal). */
    const target = body instanceof AppError ? body : this.models.resolve(body.model);
    if (!(body instanceof AppError)) {
      seen.requestedModel = body.model;
      seen.stream = body.stream === true;
      if (!(target instanceof AppError)) seen.model = target;
    }
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
    const observe: Observed = {
      requestedModel: body.model,
      stream: body.stream === true,
      userAgent: req.headers.get("user-agent"),
      metrics: this.metrics,
    };
    seen.observed = observe;
    const call: Call = { protocol, req, bytes, requestId, started, model: target, observe };
    // A model with an upstream cap waits for its slot (on a pool key): no call before that.
    const capped = this.slots.capOf(target) > 0;
    if (!protocol.metered) {
      const status = await limitStatus(this.kv, this.config, userId);
      const rate = this.currentHeaders(status);
      const user = validate(status.user, rate);
      return await this.countTokens.serve(call, user, rate, capped);
    }
    /**
     * Uncapped, the upstream call starts as soon as the snapshot admits the request — while the
     * admission commit is in flight (CONTRACT §5): its latency hides behind the upstream's.
     * Nothing of the answer is relayed, and nothing counted, before the admission is durable.
     */
    const key = capped ? null : await this.pool.pick();
    let early: Exchange | undefined;
    const onAdmitted = key ? () => void (early ??= this.upstream.send(call, key)) : undefined;
    const lease = await this.admit(body, target, { userId, keyId }, validate, onAdmitted, capped)
      .catch((err) => {
        // A change that landed before the commit (a disable, another process taking the last of
        // the allowance) refused it after all: the call is cancelled at once, nothing counted.
        if (early) {
          this.upstream.cancel(early);
          this.log.info("admission refused after the upstream call began; call cancelled", {
            id: requestId,
            userId,
            model: target,
            error: err instanceof AppError ? err.code : String(err),
          });
        }
        throw err;
      });
    seen.admitted = true;
    if (!capped) {
      if (!key) throw await this.upstream.noKeyInService(call, lease);
      const again = async () => {
        const next = await this.pool.pick();
        return next ? this.upstream.send(call, next) : null;
      };
      return await this.upstream.forward(
        early ??= this.upstream.send(call, key),
        lease,
        call,
        again,
      );
    }
    if (!(await this.pool.inService()).length) {
      throw await this.upstream.noKeyInService(call, lease);
    }
    // The client as the wait sees it: its request's signal, or the early answer's hang-up.
    const left = new AbortController();
    const client = AbortSignal.any([req.signal, left.signal]);
    const waiting = this.waitForSlot(lease, call, client);
    /** Its pool key refused: the slot goes back, and the request waits for one on another key. */
    const again = async () => {
      if (!(await this.pool.inService()).length) return null;
      await this.ledger.slots.detach(lease);
      return this.upstream.send(call, (await this.slots.acquire(lease, client)).key, client);
    };
    const forward = (taken: Taken) =>
      this.upstream.forward(
        this.upstream.send(call, taken.key, client),
        lease,
        call,
        again,
        taken.waitedMs,
      );
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
    { userId, keyId }: KeyOwner,
    validate: (user: UserRecord | null, headers: Record<string, string>) => UserRecord,
    onAdmitted: (() => void) | undefined,
    waitsForSlot: boolean,
  ): Promise<Lease> {
    const output = this.config.outputReserveTokens;
    return this.ledger.admit({
      userId,
      keyId,
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
        observe: call.observe,
      });
      if (err instanceof ClientLeft) throw await end.exit("left_waiting", this.config);
      const [status, code] = err instanceof AppError
        ? [err.status, err.code]
        : [500, "internal_error"];
      await end.settle(null, status, "not_served", undefined, code);
      throw slotRefusal(err, lease.headers);
    }
  }

  /**
   * A refusal before admission: counted in the metrics, and logged for its user (not a 401:
   * nobody to log it for). A refusal before the key was looked up (the body too large, no
   * GLM_API_KEY) looks its user up off the answer's path.
   */
  private refused(protocol: Protocol, req: Request, id: string, seen: Seen, err: AppError) {
    const refusal = {
      id,
      keyId: seen.keyId ?? "default",
      endpoint: protocol.route,
      model: seen.model,
      requestedModel: seen.requestedModel,
      stream: seen.stream,
      status: err.status,
      code: err.code,
      durationMs: Math.round(performance.now() - seen.started),
      userAgent: req.headers.get("user-agent"),
    };
    this.metrics?.refused(refusal);
    const log = this.requestLog;
    if (!log?.enabled || err.status === 401) return;
    if (seen.userId !== null) return log.refused(seen.userId, refusal);
    this.auth.hash(protocol.apiKey(req.headers))
      .then((hash) => this.auth.owner(hash))
      .then(({ userId, keyId }) => log.refused(userId, { ...refusal, keyId }), () => {});
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

  /** The user owning a `Bearer kw_…` key (any status) and the key's id, or 401. */
  authenticateKey(authorization: string | null | undefined): Promise<KeyAuth> {
    return this.auth.resolve(bearerToken(authorization));
  }

  /**
   * Cuts every call in flight (a shutdown past its grace period): see UpstreamCalls.shutdown.
   */
  shutdown(waitMs = 5_000): Promise<void> {
    return this.upstream.shutdown(waitMs);
  }
}
