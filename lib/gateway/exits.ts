/**
 * Every way a gateway request ends, in one place. The table maps each cause that ends a request
 * before its answer is relayed to what the client gets (status, code, message), what the request
 * is charged (its Outcome, lib/limits/admission.ts chargeFor) and what the log line says; the
 * relay's own endings (complete, cut, cancelled, an upstream error relayed) settle through the
 * same RequestEnd. RequestEnd settles the lease and logs the request once, whoever calls first.
 */
import type { Config } from "../core/config.ts";
import { AppError, type ErrorCode } from "../core/errors.ts";
import { formatInt } from "../core/format.ts";
import type { Logger } from "../core/log.ts";
import type { Charge, Lease, Outcome } from "../limits/admission.ts";
import type { TokenUsage } from "../usage/record.ts";
import type { Metrics } from "../observe/metrics.ts";

export type Exit =
  /** The client left while the upstream was thinking: it had the prompt (charged the estimate). */
  | "client_left"
  /** The client left while its request waited for an upstream slot: never sent, nothing used. */
  | "left_waiting"
  /** The server is stopping: not the user's doing, nothing counted. */
  | "shutdown"
  /** No headers within UPSTREAM_TIMEOUT_MS (the upstream may have processed the prompt). */
  | "timeout"
  /** No headers within STREAM_MAX_MS. */
  | "deadline"
  /** The upstream could not be reached: never got the request, nothing counted. */
  | "unreachable"
  /** The upstream redirected (GLM_BASE_URL is wrong): not followed, nothing counted. */
  | "redirected"
  /** No pool key is in service (GLM refused every one): never sent, nothing counted. */
  | "no_key";

interface ExitRule {
  /** The status in the log line (499: nobody is left to answer, as nginx logs it). */
  status: number;
  outcome: Outcome;
  code: ErrorCode;
  /** The answer's status when it is not the code's usual one. */
  answerStatus?: number;
  retryAfter?: string;
  /** Only the operator can fix it: `x-should-retry: false` (CONTRACT §4). */
  noRetry?: true;
  message(config: Config): string;
  /** What the log line's detail says. */
  detail?: string;
}

const NOT_REACHED = "The upstream could not be reached. Nothing was counted against your limits.";

const EXITS: Record<Exit, ExitRule> = {
  client_left: {
    status: 499,
    outcome: "cancelled",
    code: "upstream_unavailable",
    message: () => "The client disconnected.",
    detail: "client disconnected",
  },
  left_waiting: {
    status: 499,
    outcome: "left",
    code: "upstream_unavailable",
    message: () => "The client disconnected.",
  },
  shutdown: {
    status: 503,
    outcome: "not_served",
    code: "upstream_unavailable",
    answerStatus: 503,
    retryAfter: "1",
    message: () => "The server is restarting. Nothing was counted; retry in a moment.",
    detail: "the server is restarting",
  },
  timeout: {
    status: 504,
    outcome: "timeout",
    code: "upstream_timeout",
    message: (c) => `The upstream did not answer within ${c.glm.timeoutMs} ms.`,
  },
  deadline: {
    status: 504,
    outcome: "timeout",
    code: "upstream_timeout",
    message: (c) =>
      `The upstream did not answer within STREAM_MAX_MS (${formatInt(c.glm.streamMaxMs)} ms).`,
  },
  unreachable: {
    status: 502,
    outcome: "not_served",
    code: "upstream_unavailable",
    message: () => NOT_REACHED,
  },
  no_key: {
    status: 503,
    outcome: "not_served",
    code: "upstream_unavailable",
    answerStatus: 503,
    noRetry: true,
    message: () =>
      "The service's upstream account refused this request (its operator has been told). " +
      "Please try again later. Nothing was counted against your limits.",
    detail: "no pool key in service",
  },
  redirected: {
    status: 502,
    outcome: "not_served",
    code: "upstream_unavailable",
    message: () => NOT_REACHED,
    detail: "upstream redirected",
  },
};

/** What forward() settles: a Lease, or nothing for an endpoint that is not metered. */
export type Settlement = Pick<
  Lease,
  "user" | "model" | "headers" | "relayed" | "settle" | "giveBack"
>;

/** What the request log and the metrics take from a request (lib/observe/). */
export interface Observed {
  /** The model the client asked for (before aliases). */
  requestedModel: string;
  stream: boolean;
  userAgent: string | null;
  metrics: Metrics | null;
  /** Set once a RequestEnd settled the request: it is logged and counted, not refused. */
  ended?: boolean;
}

/** The request's fields in its log line. */
export interface EndFields {
  id: string;
  route: string;
  started: number;
  queueMs?: number;
  observe?: Observed;
}

/**
 * A request's one ending: its lease settled (the usage committed) and its log line written,
 * once; later calls get the first call's promise. A failed settlement is logged; the lease then
 * expires and is charged its estimate.
 */
export class RequestEnd {
  private ended: Promise<void> | null = null;
  /** From the upstream call being sent to its answer's headers (ms), once they arrived. */
  ttfbMs: number | null = null;

  constructor(
    private readonly lease: Settlement,
    private readonly log: Logger,
    private readonly fields: EndFields,
    /** Runs first, whatever the ending (the watchdog stops, the call is forgotten). */
    private readonly onEnd: () => void = () => {},
  ) {}

  get done(): boolean {
    return this.ended !== null;
  }

  /** `code`: the error the client got, for the request log and the metrics (none: null). */
  settle(
    usage: TokenUsage | null,
    status: number,
    outcome: Outcome,
    detail?: string,
    code: string | null = null,
  ) {
    return this.ended ??= this.run(usage, status, outcome, detail, code);
  }

  /** Ends by a cause of the table; resolves to the error the client gets. */
  async exit(exit: Exit, config: Config): Promise<AppError> {
    const rule = EXITS[exit];
    // A client that left got no answer: no code to log (status 499 says it).
    await this.settle(
      null,
      rule.status,
      rule.outcome,
      rule.detail,
      rule.status === 499 ? null : rule.code,
    );
    const headers = {
      ...this.lease.headers,
      ...(rule.retryAfter ? { "retry-after": rule.retryAfter } : {}),
      ...(rule.noRetry ? { "x-should-retry": "false" } : {}),
    };
    return new AppError(rule.code, rule.message(config), headers, rule.answerStatus);
  }

  private async run(
    usage: TokenUsage | null,
    status: number,
    outcome: Outcome,
    detail: string | undefined,
    code: string | null,
  ) {
    this.onEnd();
    const { id, route, started, queueMs, observe } = this.fields;
    if (observe) observe.ended = true;
    const durationMs = Math.round(performance.now() - started);
    const ttfbMs = this.ttfbMs === null ? null : Math.round(this.ttfbMs);
    let charged: Charge | undefined;
    try {
      charged = await this.lease.settle(
        usage,
        outcome,
        observe && {
          id,
          endpoint: route,
          requestedModel: observe.requestedModel,
          stream: observe.stream,
          status,
          code,
          durationMs,
          ttfbMs,
          queueMs: Math.round(queueMs ?? 0),
          userAgent: observe.userAgent,
        },
      );
    } catch (err) {
      this.log.error("usage not recorded now; the lease will be charged its estimate", {
        id,
        userId: this.lease.user.id,
        model: this.lease.model,
        error: err instanceof Error ? err.message : String(err),
      });
    }
    this.log.info("gateway", {
      id,
      route,
      userId: this.lease.user.id,
      model: this.lease.model,
      status,
      outcome,
      promptTokens: charged?.promptTokens ?? 0,
      completionTokens: charged?.completionTokens ?? 0,
      ...(charged?.estimated ? { estimated: true } : {}),
      ...(queueMs !== undefined ? { queueMs: Math.round(queueMs) } : {}),
      ms: Math.round((performance.now() - started) * 10) / 10,
      ...(detail ? { detail } : {}),
    });
    observe?.metrics?.ended({
      endpoint: route,
      model: this.lease.model,
      status,
      code,
      durationMs,
      ttfbMs,
      queueMs,
      charged,
    });
  }
}
