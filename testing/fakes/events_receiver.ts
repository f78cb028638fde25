/**
 * The operator's backend on loopback (CONTRACT §7 Events): verifies every delivery with svix,
 * records the accepted ones, and can fail or stall attempts on purpose.
 */
import { Webhook } from "svix";

export const EVENTS_SECRET = "whsec_" + btoa("keyway-events-test-secret-32-bytes!");

export interface Delivery {
  id: string;
  timestamp: string;
  signed: boolean;
  /** The exact bytes received, as text. */
  raw: string;
  body: Record<string, unknown>;
}

/** The operator's backend: verifies every delivery with svix and records the accepted ones. */
export class Receiver {
  readonly deliveries: Delivery[] = [];
  /** Attempts per webhook-id (failed ones included). */
  readonly attempts = new Map<string, number>();
  /** Deliveries whose signature did not verify (answered 400). */
  rejected = 0;
  /** Answer 503 to the first N attempts of every event. */
  failFirst = 0;
  /** Leave the first N requests unanswered until close() (a receiver that stalls). */
  stallFirst = 0;
  private stalled = 0;
  private release!: () => void;
  private readonly released = new Promise<void>((r) => this.release = r);
  private readonly server: Deno.HttpServer<Deno.NetAddr>;
  private readonly verifier: Webhook | null;

  constructor(secret: string | null = EVENTS_SECRET) {
    this.verifier = secret ? new Webhook(secret) : null;
    this.server = Deno.serve(
      { hostname: "127.0.0.1", port: 0, onListen: () => {} },
      (req) => this.handle(req),
    );
  }

  get url(): string {
    return `http://127.0.0.1:${this.server.addr.port}/keyway-events`;
  }

  private async handle(req: Request): Promise<Response> {
    const raw = await req.text();
    if (this.stalled < this.stallFirst) {
      this.stalled++;
      await this.released;
      return new Response("too late", { status: 503 });
    }
    const headers = Object.fromEntries(req.headers);
    if (this.verifier) {
      try {
        this.verifier.verify(raw, headers);
      } catch {
        this.rejected++;
        return new Response("bad signature", { status: 400 });
      }
    }
    const id = headers["webhook-id"];
    const n = (this.attempts.get(id) ?? 0) + 1;
    this.attempts.set(id, n);
    if (n <= this.failFirst) return new Response("try again later", { status: 503 });
    this.deliveries.push({
      id,
      timestamp: headers["webhook-timestamp"],
      signed: "webhook-signature" in headers,
      raw,
      body: JSON.parse(raw),
    });
    return new Response(null, { status: 204 });
  }

  ofType(type: string): Delivery[] {
    return this.deliveries.filter((d) => d.body.type === type);
  }

  /** Stalled requests seen so far. */
  get stalls(): number {
    return this.stalled;
  }

  async close() {
    this.release();
    await this.server.shutdown();
  }
}
