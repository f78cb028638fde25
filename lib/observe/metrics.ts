/**
 * Prometheus metrics (CONTRACT §10), built with prom-client: one registry per app (tests run
 * several in one process). Everything is this process's, except `keyway_upstream_inflight` and
 * `keyway_upstream_waiting`, read from the KV counters every process shares at scrape time
 * (lib/limits/upstream/slots.ts). Label values never carry a user id, an e-mail or a key: models
 * are the configured ones (anything else is "other", so a caller cannot mint label values), pool
 * keys are their last 4 characters.
 */
import { Counter, Gauge, Histogram, Registry } from "prom-client";
import type { Config } from "../core/config.ts";
import { keys } from "../core/kv.ts";
import { costUsd, type Pricing } from "../usage/pricing.ts";
import { heldSum } from "../limits/lease_record.ts";

/** What the metrics read at scrape time. */
export interface MetricSources {
  kv: Deno.Kv;
  /** The pool keys: their KV ids and last 4 characters. */
  poolKeys(): ReadonlyArray<{ id: string; hint: string }>;
  /** This process's leases in flight. */
  activeLeases(): number;
  clock(): number;
}

/** What a settled request was charged (lib/limits/charge.ts). */
interface Charged {
  promptTokens: number;
  completionTokens: number;
  cachedTokens?: number;
  spared?: boolean;
}

const seconds = (ms: number) => ms / 1000;

export class Metrics {
  readonly registry = new Registry();
  private readonly pricing: Pricing;
  /** Models that may appear as label values (the configured ones). */
  private readonly models: Set<string>;
  private sources: MetricSources | null = null;

  private readonly requests = new Counter({
    name: "keyway_requests_total",
    help: "Gateway requests that ended, by endpoint, model, status and error code.",
    labelNames: ["endpoint", "model", "status", "code"] as const,
    registers: [this.registry],
  });
  private readonly duration = new Histogram({
    name: "keyway_request_duration_seconds",
    help: "Gateway requests from arrival to settlement, by endpoint.",
    labelNames: ["endpoint"] as const,
    buckets: [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600],
    registers: [this.registry],
  });
  private readonly ttfb = new Histogram({
    name: "keyway_upstream_ttfb_seconds",
    help: "From sending a call upstream to its answer's headers, by endpoint.",
    labelNames: ["endpoint"] as const,
    buckets: [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120],
    registers: [this.registry],
  });
  private readonly tokens = new Counter({
    name: "keyway_tokens_total",
    help: "Tokens charged, by model and kind (prompt, completion, cached: part of prompt).",
    labelNames: ["model", "kind"] as const,
    registers: [this.registry],
  });
  private readonly cost = new Counter({
    name: "keyway_cost_usd_total",
    help: "Cost charged in USD (the pricing table), by model.",
    labelNames: ["model"] as const,
    registers: [this.registry],
  });
  private readonly refusals = new Counter({
    name: "keyway_refusals_total",
    help: "Gateway requests refused before admission, by error code.",
    labelNames: ["code"] as const,
    registers: [this.registry],
  });
  private readonly wait = new Histogram({
    name: "keyway_upstream_wait_seconds",
    help: "Time requests waited for an upstream slot (UPSTREAM_CONCURRENCY).",
    buckets: [0.005, 0.025, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 60],
    registers: [this.registry],
  });
  private readonly commits = new Histogram({
    name: "keyway_kv_commit_seconds",
    help: "KV commits of admissions, settlements and the request log.",
    buckets: [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5],
    registers: [this.registry],
  });

  constructor(config: Config) {
    this.pricing = config.pricing;
    this.models = new Set([
      ...config.allowedModels,
      ...Object.keys(config.pricing),
      ...Object.keys(config.glm.concurrency),
    ].filter((m) => m !== "*"));
    const inflight = async (gauge: Gauge<"model" | "key">) => {
      gauge.reset();
      const s = this.sources;
      if (!s) return;
      const hints = new Map(s.poolKeys().map((k) => [k.id, k.hint]));
      for await (const e of s.kv.list({ prefix: keys.upstreamKeyHelds() }, { batchSize: 500 })) {
        const hint = hints.get(String(e.key[2]));
        if (hint === undefined) continue; // a key no longer in GLM_API_KEY
        gauge.inc({ model: this.model(String(e.key[1])), key: hint }, heldSum(e.value));
      }
    };
    const waiting = async (gauge: Gauge<"model">) => {
      gauge.reset();
      const s = this.sources;
      if (!s) return;
      const now = s.clock();
      for await (const e of s.kv.list({ prefix: keys.upstreamHelds() }, { batchSize: 500 })) {
        gauge.set({ model: this.model(String(e.key[1])) }, 0);
      }
      const tickets = s.kv.list<{ deadline: number }>({ prefix: keys.upstreamQueue() }, {
        batchSize: 500,
      });
      for await (const t of tickets) {
        if (t.value.deadline > now) gauge.inc({ model: this.model(String(t.key[1])) });
      }
    };
    const leases = () => this.sources?.activeLeases() ?? 0;
    new Gauge({
      name: "keyway_upstream_inflight",
      help:
        "Requests in flight to GLM, all processes, by model and pool key (its last 4 characters).",
      labelNames: ["model", "key"] as const,
      registers: [this.registry],
      collect() {
        return inflight(this);
      },
    });
    new Gauge({
      name: "keyway_upstream_waiting",
      help: "Requests waiting for an upstream slot, all processes, by model.",
      labelNames: ["model"] as const,
      registers: [this.registry],
      collect() {
        return waiting(this);
      },
    });
    new Gauge({
      name: "keyway_leases_active",
      help: "Admitted requests in flight in this process (leases not yet settled).",
      registers: [this.registry],
      collect() {
        this.set(leases());
      },
    });
  }

  /** Where the gauges read at scrape time (set once the services exist). */
  watch(sources: MetricSources) {
    this.sources = sources;
  }

  /** A model as a label value: a configured model, else "other"; "" when there is none. */
  model(model: string | null): string {
    if (model === null) return "";
    return this.models.has(model) ? model : "other";
  }

  /** An admitted request settled (lib/gateway/exits.ts). */
  ended(o: {
    endpoint: string;
    model: string;
    status: number;
    code: string | null;
    durationMs: number;
    ttfbMs: number | null;
    queueMs?: number;
    charged?: Charged;
  }) {
    const model = this.model(o.model);
    this.requests.inc({ endpoint: o.endpoint, model, status: o.status, code: o.code ?? "" });
    this.duration.observe({ endpoint: o.endpoint }, seconds(o.durationMs));
    if (o.ttfbMs !== null) this.ttfb.observe({ endpoint: o.endpoint }, seconds(o.ttfbMs));
    if (o.queueMs !== undefined) this.wait.observe(seconds(o.queueMs));
    const c = o.charged;
    if (!c || c.spared) return;
    const cached = Math.min(c.cachedTokens ?? 0, c.promptTokens);
    if (c.promptTokens) this.tokens.inc({ model, kind: "prompt" }, c.promptTokens);
    if (c.completionTokens) this.tokens.inc({ model, kind: "completion" }, c.completionTokens);
    if (cached) this.tokens.inc({ model, kind: "cached" }, cached);
    const usd = costUsd(this.pricing, o.model, c.promptTokens, c.completionTokens, cached);
    if (usd > 0) this.cost.inc({ model }, usd);
  }

  /** A request refused before admission (401 included). */
  refused(o: { endpoint: string; model: string | null; status: number; code: string }) {
    const model = this.model(o.model);
    this.requests.inc({ endpoint: o.endpoint, model, status: o.status, code: o.code });
    this.refusals.inc({ code: o.code });
  }

  /** One KV commit took `ms`. */
  commit(ms: number) {
    this.commits.observe(seconds(ms));
  }

  /** The text format (CONTRACT §10). */
  async text(): Promise<{ contentType: string; body: string }> {
    return { contentType: this.registry.contentType, body: await this.registry.metrics() };
  }
}
