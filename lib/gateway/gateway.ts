/**
 * The GLM gateway: an OpenAI- and Anthropic-compatible proxy in front of the operator's GLM
 * account, one Protocol module per endpoint (lib/gateway/protocols/).
 *
 * auth → admit → forward → settle. A request is checked in the contract's order — key (401) →
 * user state (403) → model (400) → request limits, concurrency, quotas (429) → upstream — and
 * admitted as a Lease (lib/limits/admission.ts) that holds a slot and reserves its estimated
 * tokens. The body is forwarded as the bytes that arrived (re-serialized only when an alias or
 * another casing of the model was asked for); the answer is relayed chunk by chunk
 * while a meter watches for `usage` (JSON body or SSE `data:` lines) and estimates what was
 * relayed, and the lease is settled — its usage committed — before the answer's last byte: before
 * a JSON answer is returned, before an SSE stream's end event (`data: [DONE]`, `message_stop`) or
 * its end, and at once when the client leaves or the upstream fails. The upstream call may start
 * while the admission commits (see handle()).
 */
import type { Config } from "../core/config.ts";
import { concatBytes, duplicateJsonKey, withTopLevelString } from "../core/encoding.ts";
import { AppError } from "../core/errors.ts";
import { hashApiKey, looksLikeApiKey } from "../identity/api_keys.ts";
import { keys } from "../core/kv.ts";
import type { Charge, Lease, Ledger, Outcome } from "../limits/admission.ts";
import { limitStatus } from "../limits/status.ts";
import { checkUserState, rateHeaders } from "../limits/policy.ts";
import { type Logger, redacted } from "../core/log.ts";
import { ChunkReader, erroredStream, IdleTimer, type Stall, UsageMeter } from "./relay.ts";
import { ClientLeft, type SlotHold, type UpstreamSlots } from "../limits/upstream_slots.ts";
import { CountTokensLimiter } from "../limits/count_tokens.ts";
import {
  classifyRefusal,
  needsClassifying,
  type UpstreamAlert,
  type UpstreamRefusal,
} from "./upstream_errors.ts";
import type { TokenUsage } from "../usage/usage.ts";
import type { KeyIndexValue, UserRecord } from "../identity/users.ts";
import { ModelCatalog } from "./models.ts";
import { bearerToken, type ParsedRequest, type Protocol } from "./protocol.ts";
import { anthropicKey } from "./protocols/anthropic_messages.ts";

export const MAX_BODY_BYTES = 1024 * 1024;
const KEY_CACHE_MAX = 50_000;

/** Upstream response headers worth relaying (content-length/-encoding are the runtime's). */
const RELAYED_HEADERS = ["content-type", "cache-control", "retry-after"];

export type { TokenUsage };

/** Tells the operator about an upstream problem (lib/alerts: de-duplicated per type and hour). */
export type UpstreamNotifier = (
  alert: UpstreamAlert,
  fields: { model: string; status: number; upstreamCode: string | null; message: string },
) => void;

interface GatewayDeps {
  config: Config;
  kv: Deno.Kv;
  log: Logger;
  ledger: Ledger;
  slots: UpstreamSlots;
  notify?: UpstreamNotifier;
}

/** Error bodies read to classify a refusal (GLM's are a few hundred bytes). */
const MAX_ERROR_BODY = 64 * 1024;
/** Throttled answers within THROTTLE_WINDOW_MS that make throttling "sustained" (an alert). */
const THROTTLE_SUSTAINED = 5;
const THROTTLE_WINDOW_MS = 60_000;

/** An upstream call begun by send(): forward() relays it once the admission is durable. */
interface UpstreamCall {
  protocol: Protocol;
  response: Promise<Response>;
  abort: AbortController;
  idle: IdleTimer;
  state: {
    timedOut: boolean;
    clientGone: boolean;
    /** STREAM_MAX_MS passed. */
    overtime: boolean;
    /** Cuts the answer being relayed (set by forward() once it relays a body). */
    cut: ((stall: Stall) => void) | null;
    /** Cut because the server is stopping (Gateway.shutdown). */
    shuttingDown: boolean;
  };
  /** Stops the call (its admission was refused after all). */
  cancel(): void;
}

/** What forward() settles: a Lease, or nothing for an endpoint that is not metered. */
type Settlement = Pick<
  Lease,
  "user" | "model" | "headers" | "relayed" | "settle" | "giveBack"
>;

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
  private readonly notify: UpstreamNotifier | undefined;
  /** When this process's recent throttled answers came (sustained throttling is alerted). */
  private throttled: number[] = [];
  /** The clock minute of this process's last alert try of each type. */
  private readonly alerted = new Map<UpstreamAlert, number>();
  readonly models: ModelCatalog;
  /** The operator's key and content type, per endpoint (built once). */
  private readonly upstreamHeaders = new Map<Protocol, Record<string, string>>();
  /**
   * Key hash → user id. Safe to keep per process: a hash belongs to one user forever, and the
   * key index entry and user record are re-read and checked atomically on every request.
   */
  private readonly userIdByHash = new Map<string, string>();
  /** Upstream calls whose answers are not settled yet (what shutdown() cuts). */
  private readonly calls = new Set<UpstreamCall>();
  /**
   * API key → its SHA-256 (hashing is the costliest CPU step of the hot path). The process can
   * decrypt every key anyway (KeyVault), so remembering them adds no exposure; bounded.
   */
  private readonly hashByKey = new Map<string, string>();

  constructor(deps: GatewayDeps) {
    this.config = deps.config;
    this.kv = deps.kv;
    this.log = deps.log;
    this.ledger = deps.ledger;
    this.slots = deps.slots;
    this.countTokens = new CountTokensLimiter(deps.kv, deps.config, { log: deps.log });
    this.notify = deps.notify;
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
    const hash = await this.keyHash(protocol.apiKey(req.headers));
    // Read the body while the key is looked up; its errors are reported after the key checks.
    const [body, userId] = await Promise.all([readBody(req, protocol), this.userIdFor(hash)]);
    /** The model the request is forwarded, limited, metered and priced as (or the refusal). */
    let target: string | AppError = body instanceof AppError
      ? body
      : this.models.resolve(body.model);
    const validate = (user: UserRecord | null, headers: Record<string, string>) => {
      const checked = this.checkKeyAndUser(hash, userId, user, headers);
      if (target instanceof AppError) throw new AppError(target.code, target.message, headers);
      return checked;
    };
    if (body instanceof AppError || target instanceof AppError) {
      // Refused on the key, the user's state or the body, in that order: nothing to admit.
      const status = await limitStatus(this.kv, this.config, userId);
      validate(status.user, this.currentHeaders(status));
      throw target; // unreachable: validate() threw
    }
    const parsed: ParsedRequest & { bytes: Uint8Array<ArrayBuffer> } = body;
    target = target as string;
    const bytes = target === parsed.model ? parsed.bytes : withModel(parsed.bytes, target);
    let upstreamHeaders = this.upstreamHeaders.get(protocol);
    if (!upstreamHeaders) {
      upstreamHeaders = { ...protocol.upstreamAuth(masterKey), "content-type": "application/json" };
      this.upstreamHeaders.set(protocol, upstreamHeaders);
    }
    for (const name of protocol.relayedHeaders) {
      const value = req.headers.get(name);
      if (value !== null) upstreamHeaders = { ...upstreamHeaders, [name]: value };
    }
    const headers = upstreamHeaders;
    /**
     * The upstream call, started as soon as the snapshot admits the request — while the admission
     * commit is in flight (CONTRACT §5): its latency hides behind the upstream's. Nothing of the
     * answer is relayed, and nothing counted, before the admission is durable.
     */
    let call: UpstreamCall | undefined;
    const send = () => call ??= this.send(protocol, req, bytes, headers, started);
    let settlement: Settlement;
    // A model with an upstream cap waits for its slot after admission: no call before that.
    const capped = this.slots.capOf(target) > 0;
    let queueMs: number | undefined;
    if (protocol.metered) {
      const output = this.config.outputReserveTokens;
      try {
        settlement = await this.ledger.admit({
          userId,
          model: target,
          reserve: {
            prompt: parsed.promptTokens,
            output: parsed.outputCap === null ? output : Math.min(parsed.outputCap, output),
          },
          validate,
          onAdmitted: capped ? undefined : send,
          waitsForSlot: capped,
        });
      } catch (err) {
        // A change that landed before the commit (a disable, another process taking the last of
        // the allowance) refused it after all: the call is cancelled at once, nothing counted.
        if (call) {
          call.cancel();
          this.log.info("admission refused after the upstream call began; call cancelled", {
            id: requestId,
            userId,
            model: target,
            error: err instanceof AppError ? err.code : String(err),
          });
        }
        throw err;
      }
      if (capped) queueMs = await this.waitForSlot(settlement as Lease, req, requestId, started);
    } else {
      const status = await limitStatus(this.kv, this.config, userId);
      const rate = this.currentHeaders(status);
      settlement = await this.unmetered(validate(status.user, rate), target, rate, capped, req);
    }
    return await this.forward(send(), settlement, requestId, started, queueMs);
  }

  /**
   * Takes the lease's upstream slot (UPSTREAM_CONCURRENCY), waiting in line. A request that gets
   * none in time, or whose client leaves meanwhile, is settled at once: not counted (the former)
   * or with nothing used (the latter).
   */
  private async waitForSlot(
    lease: Lease,
    req: Request,
    requestId: string,
    started: number,
  ): Promise<number> {
    const outcome = (err: unknown): Outcome => err instanceof ClientLeft ? "left" : "not_served";
    try {
      const waited = await this.slots.acquire(lease, req.signal);
      if (!req.signal.aborted) return waited;
      throw new ClientLeft();
    } catch (err) {
      await lease.settle(null, outcome(err)).catch(() => {});
      const status = err instanceof AppError ? err.status : err instanceof ClientLeft ? 499 : 500;
      this.log.info("gateway", {
        id: requestId,
        userId: lease.user.id,
        model: lease.model,
        status,
        outcome: outcome(err),
        queueMs: Math.round(performance.now() - started),
        ms: Math.round((performance.now() - started) * 10) / 10,
      });
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

  /**
   * Logs an upstream refusal for the operator (GLM's own message included) and alerts: the
   * account's problems at once, throttling when it is sustained (THROTTLE_SUSTAINED answers
   * within a minute in this process).
   */
  private upstreamRefused(
    refusal: UpstreamRefusal,
    model: string,
    status: number,
    requestId: string,
  ) {
    const fields = {
      model,
      status,
      upstreamCode: refusal.upstreamCode,
      message: refusal.upstreamMessage ?? `HTTP ${status}`,
    };
    this.log.warn("upstream refused the operator's account", {
      id: requestId,
      ...fields,
      answered: refusal.error.code,
    });
    if (!this.notify) return;
    if (refusal.alert === "upstream.throttled") {
      const now = Date.now();
      this.throttled = this.throttled.filter((t) => t > now - THROTTLE_WINDOW_MS);
      this.throttled.push(now);
      if (this.throttled.length < THROTTLE_SUSTAINED) return;
      this.throttled = [];
    }
    // Alerts go out once per type and hour anyway (lib/alerts): during an outage every refused
    // request would otherwise try a KV commit to learn that. One try a minute per process still
    // gets an alert out if an earlier try failed.
    const minute = Math.floor(Date.now() / 60_000);
    if (this.alerted.get(refusal.alert) === minute) return;
    this.alerted.set(refusal.alert, minute);
    try {
      this.notify(refusal.alert, fields);
    } catch (err) {
      this.log.error("upstream alert failed", { error: String(err) });
    }
  }

  /** Rate headers as they stand, for answers that consume nothing. */
  private currentHeaders(status: Awaited<ReturnType<typeof limitStatus>>) {
    return rateHeaders(status.limits, status.view, Date.now());
  }

  /**
   * GET /v1/models (the allowed models) and GET /v1/models/{id} (one of them, an alias of one,
   * or 404), for any active key.
   */
  async listModels(req: Request, id?: string): Promise<Response> {
    const hash = await this.keyHash(anthropicKey(req.headers));
    const userId = await this.userIdFor(hash);
    const user = await this.kv.get<UserRecord>(keys.user(userId));
    this.checkKeyAndUser(hash, userId, user.value, {});
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
  async authenticate(authorization: string | null | undefined): Promise<UserRecord> {
    const hash = await this.keyHash(bearerToken(authorization));
    const userId = await this.userIdFor(hash);
    const user = (await this.kv.get<UserRecord>(keys.user(userId))).value;
    if (user?.key?.hash !== hash) {
      this.userIdByHash.delete(hash);
      throw invalidKey();
    }
    return user;
  }

  private async keyHash(key: string | null | undefined): Promise<string> {
    if (!key || !looksLikeApiKey(key)) throw invalidKey();
    const known = this.hashByKey.get(key);
    if (known) return known;
    const hash = await hashApiKey(key);
    if (this.hashByKey.size >= KEY_CACHE_MAX) this.hashByKey.clear();
    this.hashByKey.set(key, hash);
    return hash;
  }

  private async userIdFor(hash: string): Promise<string> {
    const cached = this.userIdByHash.get(hash);
    if (cached) return cached;
    const index = await this.kv.get<KeyIndexValue>(keys.keyByHash(hash));
    if (!index.value) throw invalidKey();
    if (this.userIdByHash.size >= KEY_CACHE_MAX) this.userIdByHash.clear();
    this.userIdByHash.set(hash, index.value.userId);
    return index.value.userId;
  }

  /**
   * The key must still be the user's current key. Checking the user record is enough: the key
   * index entry is only ever written in the same commit as the user's `key` (provision, rotate,
   * delete), and the admission commit checks the cache epoch every rotation and deletion bumps.
   */
  private checkKeyAndUser(
    hash: string,
    userId: string,
    user: UserRecord | null,
    headers: Record<string, string>,
  ): UserRecord {
    if (!user || user.id !== userId || user.key?.hash !== hash) {
      this.userIdByHash.delete(hash);
      throw invalidKey();
    }
    return checkUserState(user, headers);
  }

  /**
   * Starts the upstream call: its watchdog (UPSTREAM_TIMEOUT_MS for the headers, then for each
   * next piece of the answer) and the cancellation when the client leaves before the headers.
   */
  private send(
    protocol: Protocol,
    req: Request,
    bytes: Uint8Array<ArrayBuffer>,
    headers: Record<string, string>,
    started: number,
  ): UpstreamCall {
    const abort = new AbortController();
    const state: UpstreamCall["state"] = {
      timedOut: false,
      clientGone: false,
      overtime: false,
      cut: null,
      shuttingDown: false,
    };
    const glm = this.config.glm;
    const idle = new IdleTimer(glm.timeoutMs, glm.streamMaxMs, (stall) => {
      if (stall === "upstream") state.timedOut = true;
      if (stall === "deadline") state.overtime = true;
      // While an answer is relayed, cutting it cancels the upstream call too.
      if (state.cut) state.cut(stall);
      else abort.abort();
    }, started);
    // A client that leaves while the upstream is still thinking cancels the upstream call. Only
    // until the headers arrive: after that the relay's cancel() does it. (deno.json opts out of
    // Deno's legacy behaviour of also aborting request.signal once a response has been sent.)
    const onClientGone = () => {
      state.clientGone = true;
      abort.abort();
    };
    if (req.signal.aborted) onClientGone();
    else req.signal.addEventListener("abort", onClientGone, { once: true });
    const response = fetch(protocol.upstreamUrl(this.config), {
      method: "POST",
      headers,
      body: bytes,
      signal: abort.signal,
      // Never followed: the master key must not go to another origin (see forward()).
      redirect: "manual",
    });
    response.catch(() => {}); // awaited by forward(), unless the admission was refused
    const done = () => req.signal.removeEventListener("abort", onClientGone);
    response.then(done, done);
    const call: UpstreamCall = {
      protocol,
      response,
      abort,
      idle,
      state,
      cancel: () => {
        idle.stop();
        abort.abort();
        this.calls.delete(call);
      },
    };
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
    for (const call of this.calls) {
      call.state.shuttingDown = true;
      call.idle.fire("shutdown");
    }
    const until = Date.now() + waitMs;
    while (this.calls.size && Date.now() < until) await new Promise((r) => setTimeout(r, 20));
  }

  private async forward(
    call: UpstreamCall,
    lease: Settlement,
    requestId: string,
    started: number,
    queueMs?: number,
  ): Promise<Response> {
    const { protocol, abort, idle, state } = call;
    const userId = lease.user.id;
    const model = lease.model;
    const timeoutMs = this.config.glm.timeoutMs;
    /**
     * Every way out of forward() ends here, once, before the answer's last byte: the watchdog
     * stops and the lease is settled (the usage committed). A failed settlement is logged; the
     * lease then expires and is charged its estimate.
     */
    const end = async (
      usage: TokenUsage | null,
      status: number,
      outcome: Outcome,
      detail?: string,
    ) => {
      idle.stop();
      let charged;
      try {
        charged = await lease.settle(usage, outcome);
      } catch (err) {
        this.log.error("usage not recorded now; the lease will be charged its estimate", {
          id: requestId,
          userId,
          model,
          error: err instanceof Error ? err.message : String(err),
        });
      }
      this.log.info("gateway", {
        id: requestId,
        route: protocol.route,
        userId,
        model,
        status,
        outcome,
        promptTokens: charged?.promptTokens ?? 0,
        completionTokens: charged?.completionTokens ?? 0,
        ...(charged?.estimated ? { estimated: true } : {}),
        ...(queueMs !== undefined ? { queueMs: Math.round(queueMs) } : {}),
        ms: Math.round((performance.now() - started) * 10) / 10,
        ...(detail ? { detail } : {}),
      });
      this.calls.delete(call);
    };
    let upstream: Response;
    try {
      upstream = await call.response;
    } catch (err) {
      const timedOut = state.timedOut || state.overtime;
      const code = timedOut ? "upstream_timeout" : "upstream_unavailable";
      if (state.clientGone) {
        // Not an upstream failure: nobody is left to answer (nginx's 499 in the log line). The
        // upstream had the prompt: charged its estimate.
        await end(null, 499, "cancelled", "client disconnected");
        throw new AppError(code, "The client disconnected.", lease.headers);
      }
      if (state.shuttingDown) {
        // The server is stopping: not the user's doing, nothing counted; another instance (or
        // this one, restarted) takes the retry.
        await end(null, 503, "not_served", "the server is restarting");
        throw new AppError(
          "upstream_unavailable",
          "The server is restarting. Nothing was counted; retry in a moment.",
          { ...lease.headers, "retry-after": "1" },
          503,
        );
      }
      this.log.warn("upstream failed", {
        id: requestId,
        userId,
        model,
        error: code,
        detail: err instanceof Error ? err.name : "error",
      });
      // Never reached the upstream: not the user's doing, nothing counted.
      await end(null, timedOut ? 504 : 502, timedOut ? "timeout" : "not_served");
      throw new AppError(
        code,
        state.overtime
          ? `The upstream did not answer within STREAM_MAX_MS (${this.config.glm.streamMaxMs} ms).`
          : timedOut
          ? `The upstream did not answer within ${timeoutMs} ms.`
          : "The upstream could not be reached. Nothing was counted against your limits.",
        lease.headers,
      );
    }
    idle.rest();

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
      await end(null, 502, "not_served", "upstream redirected");
      throw new AppError(
        "upstream_unavailable",
        "The upstream could not be reached. Nothing was counted against your limits.",
        lease.headers,
      );
    }
    // An upstream 5xx is not counted (outcome "not_served" below): its answer says so already.
    if (status >= 500) lease.giveBack();
    // One plain record, converted once by the Response (a Headers object would be validated
    // twice: when built and again when the Response copies it). It also carries the framing
    // headers routes/mod.ts would otherwise set one by one (see `framed` there).
    const headers: Record<string, string> = {
      ...lease.headers,
      "x-request-id": requestId,
      "x-content-type-options": "nosniff",
    };
    const upstreamHeaders = upstream.headers;
    for (const name of RELAYED_HEADERS) {
      const value = upstreamHeaders.get(name);
      if (value !== null) headers[name] = value;
    }
    const upstreamId = upstreamHeaders.get("x-request-id") ?? upstreamHeaders.get("request-id");
    if (upstreamId) headers["x-upstream-request-id"] = upstreamId;
    // Where the Anthropic SDK looks for it (_request_id, error.requestID).
    if (protocol.format === "anthropic") headers["request-id"] = requestId;
    const ok = status < 400;
    if (status >= 500) {
      this.log.warn("upstream error", { id: requestId, userId, model, status });
    }
    if (needsClassifying(status)) {
      // The operator's account refused, or is throttled: the user gets Keyway's own answer.
      const bytes = await readErrorBody(upstream.body, idle);
      const refusal = classifyRefusal(status, bytes, upstreamHeaders.get("retry-after"));
      await end(null, refusal.error.status, "not_served", refusal.alert);
      this.upstreamRefused(refusal, model, status, requestId);
      throw new AppError(
        refusal.error.code,
        refusal.error.message,
        { ...lease.headers, ...refusal.error.headers },
        refusal.error.status,
      );
    }
    const source = upstream.body;
    if (!ok) {
      // The user's own mistake (4xx) generated nothing; an upstream failure (5xx) is not counted
      // at all. An error answer is small: read whole (up to 64 KiB), and the master key taken
      // out should the upstream ever echo it.
      const bytes = source ? await readErrorBody(source, idle) : null;
      await end(null, status, status >= 500 ? "not_served" : "refused");
      return new Response(this.withoutMasterKey(bytes), { status, headers });
    }
    if (!source) {
      await end(null, status, "complete");
      return new Response(null, { status, headers });
    }
    /** Why the watchdog fired, as the log line and a cut stream's error event say it. */
    const why = (stall: Stall) =>
      stall === "client"
        ? `the client read nothing for ${timeoutMs} ms`
        : stall === "deadline"
        ? `the answer took longer than STREAM_MAX_MS (${this.config.glm.streamMaxMs} ms)`
        : stall === "shutdown"
        ? "the server is restarting"
        : `upstream sent nothing for ${timeoutMs} ms`;
    const stalled = () =>
      state.overtime ? why("deadline") : state.timedOut ? why("upstream") : undefined;
    const contentType = headers["content-type"] ?? "";
    const sse = contentType.includes("text/event-stream");
    const meter = new UsageMeter(protocol.format, sse);
    // A compressed answer arrives decompressed: its content-length is not the length read.
    const declared = sse || upstreamHeaders.has("content-encoding")
      ? null
      : upstreamHeaders.get("content-length");
    const reader = new ChunkReader(source, declared);
    /** The next piece of the answer, under the watchdog. */
    const read = async () => {
      idle.wait();
      const chunk = await reader.read();
      idle.rest();
      return chunk;
    };
    let pending: Uint8Array | null = null;
    if (!sse) {
      // A JSON answer usually arrives whole in its first read. When that read holds every byte
      // the upstream declared, relay it as bytes: the runtime then answers natively instead of
      // pumping a JS stream (≈ a third of the relay's cost). Nothing waits for more data than
      // has arrived; anything else is streamed below, the first chunk included.
      let first: Uint8Array | null;
      try {
        first = await read();
      } catch (err) {
        await end(null, status, "cut", stalled());
        return new Response(erroredStream(err), { status, headers });
      }
      if (!first) {
        await end(null, status, "complete");
        return new Response(null, { status, headers });
      }
      if (reader.complete) {
        reader.cancel(); // at its end already: frees the upstream connection
        meter.push(first);
        await end(meter.usage(), status, "complete");
        return new Response(first as Uint8Array<ArrayBuffer>, { status, headers });
      }
      pending = first;
    }
    let finished: Promise<void> | null = null;
    const finish = (outcome: Outcome, detail?: string) => {
      if (finished) return finished;
      const usage = meter.usage();
      if (!usage) lease.relayed(meter.relayedTokens());
      return finished = end(usage, status, outcome, detail);
    };
    /** Relays a chunk; the one that ends the answer waits for the settlement first. */
    const relay = async (
      controller: ReadableStreamDefaultController<Uint8Array>,
      chunk: Uint8Array,
    ) => {
      meter.push(chunk);
      if (meter.ended || reader.complete) await finish("complete");
      else if (sse) lease.relayed(meter.relayedTokens());
      controller.enqueue(chunk);
    };
    /** The stream has ended one way or another (nothing more is enqueued). */
    let closed = false;
    let out: ReadableStreamDefaultController<Uint8Array>;
    // The watchdog cuts the answer where it stands: the upstream call is cancelled and the lease
    // settled (the estimate of what was relayed). A stalled upstream or an answer past
    // STREAM_MAX_MS ends an SSE stream with an error event its SDK reports; a client that reads
    // nothing gets its connection closed.
    state.cut = (stall) => {
      abort.abort();
      reader.cancel();
      if (closed) return;
      closed = true;
      const detail = why(stall);
      finish(stall === "client" ? "cancelled" : "cut", detail).then(() => {
        try {
          if (stall !== "client" && sse) {
            const code = stall === "shutdown" ? "upstream_unavailable" : "upstream_timeout";
            out.enqueue(sseError(protocol.format, code, `The answer was cut: ${detail}.`));
            out.close();
          } else out.error(new Error(detail));
        } catch { /* the client is gone already */ }
      });
    };
    const body = new ReadableStream<Uint8Array>({
      start: (controller) => {
        out = controller;
      },
      pull: async (controller) => {
        if (closed) return;
        if (pending) {
          const chunk = pending;
          pending = null;
          return await relay(controller, chunk);
        }
        let chunk: Uint8Array | null;
        try {
          chunk = await read();
        } catch (err) {
          if (closed) return; // cut by the watchdog
          closed = true;
          await finish("cut", stalled());
          controller.error(err);
          return;
        }
        if (closed) return;
        if (!chunk) {
          closed = true;
          await finish("complete");
          controller.close();
          return;
        }
        await relay(controller, chunk);
      },
      cancel: async (reason) => {
        // The client went away: stop the upstream call too, and settle at once.
        closed = true;
        abort.abort();
        reader.cancel(reason);
        await finish("cancelled");
      },
    });
    return new Response(body, { status, headers });
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

/** An SSE event that ends a cut stream in the endpoint's own error shape. */
function sseError(format: "openai" | "anthropic", code: string, message: string): Uint8Array {
  const text = format === "anthropic"
    ? `event: error\ndata: ${
      JSON.stringify({ type: "error", error: { type: "api_error", message } })
    }\n\n`
    : `data: ${JSON.stringify({ error: { code, type: code, message } })}\n\n`;
  return new TextEncoder().encode(text);
}

/** An upstream error body, up to MAX_ERROR_BODY bytes, under the watchdog (null: none). */
async function readErrorBody(
  body: ReadableStream<Uint8Array> | null,
  idle: IdleTimer,
): Promise<Uint8Array<ArrayBuffer> | null> {
  if (!body) return null;
  const chunks: Uint8Array[] = [];
  let size = 0;
  idle.wait();
  try {
    for await (const chunk of body) {
      chunks.push(chunk);
      size += chunk.byteLength;
      if (size >= MAX_ERROR_BODY) break;
    }
  } catch {
    // Cut or stalled: classify what arrived.
  }
  idle.rest();
  return concatBytes(chunks, size);
}

function invalidKey(): AppError {
  return new AppError(
    "invalid_api_key",
    "Invalid API key: send your Keyway key as 'Authorization: Bearer kw_…' (or, from an " +
      "Anthropic client, 'x-api-key: kw_…').",
  );
}

/** Reads and checks the request body; a problem is returned (not thrown) to keep the order. */
async function readBody(
  req: Request,
  protocol: Protocol,
): Promise<(ParsedRequest & { bytes: Uint8Array<ArrayBuffer> }) | AppError> {
  let bytes: Uint8Array<ArrayBuffer> | null;
  try {
    bytes = await readCapped(req, MAX_BODY_BYTES);
  } catch {
    return new AppError("invalid_request", "body: could not be read");
  }
  if (!bytes) return tooLarge();
  let json: unknown;
  const text = decoder.decode(bytes);
  try {
    json = JSON.parse(text);
  } catch {
    return new AppError("invalid_request", "body: not valid JSON");
  }
  // What is forwarded must be what was checked (JSON.parse keeps the last of two keys).
  const duplicate = duplicateJsonKey(text);
  if (duplicate !== null) {
    return new AppError(
      "invalid_request",
      `body: the key ${JSON.stringify(duplicate).slice(0, 100)} appears twice in one object`,
    );
  }
  const parsed = protocol.parseBody(json);
  return parsed instanceof AppError ? parsed : { ...parsed, bytes };
}

/**
 * The body with its top-level `model` replaced (an alias or a differently cased id resolved),
 * every other byte as the client sent it (a `seed` beyond 2^53, `1.0`, `\u00e9` stay as written).
 */
function withModel(bytes: Uint8Array<ArrayBuffer>, model: string): Uint8Array<ArrayBuffer> {
  const text = withTopLevelString(decoder.decode(bytes), "model", model);
  if (text === null) throw new Error("withModel: the body has no top-level model string");
  return new TextEncoder().encode(text) as Uint8Array<ArrayBuffer>;
}

const tooLarge = () => new AppError("payload_too_large", "Request body is larger than 1 MiB.");

/** The body length the request declares, or null when it is chunked or does not say. */
function declaredLength(req: Request): number | null {
  const declared = req.headers.get("content-length");
  return declared === null || req.headers.has("transfer-encoding") ? null : Number(declared);
}

/**
 * The body, or null when it is longer than `max` bytes. A declared length is trusted (the
 * runtime enforces it); a chunked body is read chunk by chunk and given up at the limit.
 */
async function readCapped(req: Request, max: number): Promise<Uint8Array<ArrayBuffer> | null> {
  if (!req.body) return new Uint8Array(0);
  if (declaredLength(req) !== null) {
    const bytes = new Uint8Array(await req.arrayBuffer());
    return bytes.byteLength > max ? null : bytes;
  }
  const chunks: Uint8Array[] = [];
  let size = 0;
  for await (const chunk of req.body) {
    size += chunk.byteLength;
    if (size > max) return null;
    chunks.push(chunk);
  }
  return concatBytes(chunks, size);
}

const decoder = new TextDecoder();
