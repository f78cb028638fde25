/**
 * A fake Clerk Backend API on loopback, speaking the wire format @clerk/backend uses:
 * GET /v1/users/:id, PATCH /v1/users/:id/metadata (deep merge), GET /v1/jwks.
 */
import type { ClerkIssuer } from "./clerk_issuer.ts";

export interface FakeUserInput {
  id: string;
  email?: string;
  firstName?: string | null;
  lastName?: string | null;
}

export interface RecordedCall {
  method: string;
  path: string;
  authorization: string | null;
  /** The parsed JSON body, if any. */
  body: unknown;
  /** The body exactly as received. */
  rawBody: string;
  status: number;
}

type Json = Record<string, unknown>;

export class FakeClerkApi {
  readonly users = new Map<string, Json>();
  readonly calls: RecordedCall[] = [];
  private failures = 0;
  private hangs = 0;
  /** Answers held back by hangNext(), released (503) on close. */
  private readonly hung: Array<() => void> = [];

  private constructor(
    private readonly server: Deno.HttpServer<Deno.NetAddr>,
    readonly secretKey: string,
    private readonly issuer?: ClerkIssuer,
  ) {}

  static start(options: { secretKey: string; issuer?: ClerkIssuer }): FakeClerkApi {
    // The handler needs the instance and the instance needs the server: close the loop late.
    const ref: { fake?: FakeClerkApi } = {};
    const server = Deno.serve(
      { hostname: "127.0.0.1", port: 0, onListen: () => {} },
      (req) => ref.fake!.handle(req),
    );
    ref.fake = new FakeClerkApi(server, options.secretKey, options.issuer);
    return ref.fake;
  }

  /** Base URL for CLERK_API_URL. */
  get url(): string {
    return `http://127.0.0.1:${this.server.addr.port}`;
  }

  /** The next `n` requests get a 500 (after the auth check), to exercise retries. */
  failNext(n: number) {
    this.failures = n;
  }

  /** The next `n` requests get no answer at all (until close), like a Backend API that hangs. */
  hangNext(n: number) {
    this.hangs = n;
  }

  addUser(input: FakeUserInput): Json {
    const now = Date.now();
    const emailId = `idn_${input.id}`;
    const user: Json = {
      object: "user",
      id: input.id,
      username: null,
      first_name: input.firstName ?? null,
      last_name: input.lastName ?? null,
      image_url: "https://img.clerk.com/default",
      has_image: false,
      primary_email_address_id: input.email ? emailId : null,
      primary_phone_number_id: null,
      primary_web3_wallet_id: null,
      password_enabled: false,
      two_factor_enabled: false,
      totp_enabled: false,
      backup_code_enabled: false,
      email_addresses: input.email
        ? [{
          object: "email_address",
          id: emailId,
          email_address: input.email,
          reserved: false,
          verification: {
            object: "verification_email_code",
            status: "verified",
            strategy: "email_code",
            attempts: 1,
            expire_at: now + 600_000,
          },
          linked_to: [],
          created_at: now,
          updated_at: now,
        }]
        : [],
      phone_numbers: [],
      web3_wallets: [],
      external_accounts: [],
      enterprise_accounts: [],
      public_metadata: {},
      private_metadata: {},
      unsafe_metadata: {},
      external_id: null,
      last_sign_in_at: now,
      banned: false,
      locked: false,
      created_at: now,
      updated_at: now,
      last_active_at: now,
      delete_self_enabled: true,
      create_organization_enabled: true,
      legal_accepted_at: null,
    };
    this.users.set(input.id, user);
    return user;
  }

  /** Calls to a path (method and path, e.g. "PATCH /v1/users/u/metadata") that were answered 2xx. */
  succeeded(methodAndPath: string): RecordedCall[] {
    return this.calls.filter((c) => `${c.method} ${c.path}` === methodAndPath && c.status < 300);
  }

  async close() {
    for (const release of this.hung.splice(0)) release();
    await this.server.shutdown();
  }

  private async handle(req: Request): Promise<Response> {
    const url = new URL(req.url);
    const rawBody = await req.text();
    let body: unknown = undefined;
    if (rawBody) {
      try {
        body = JSON.parse(rawBody);
      } catch {
        body = undefined;
      }
    }
    const call: RecordedCall = {
      method: req.method,
      path: url.pathname,
      authorization: req.headers.get("authorization"),
      body,
      rawBody,
      status: 0,
    };
    this.calls.push(call);
    if (this.hangs > 0) {
      this.hangs--;
      await new Promise<void>((r) => this.hung.push(r));
      call.status = 503;
      return clerkError(503, "service_unavailable", "released at close");
    }
    const res = this.route(req.method, url.pathname, call.authorization, body);
    call.status = res.status;
    return res;
  }

  private route(method: string, path: string, authorization: string | null, body: unknown) {
    if (authorization !== `Bearer ${this.secretKey}`) {
      return clerkError(401, "authentication_invalid", "Invalid authentication");
    }
    if (this.failures > 0) {
      this.failures--;
      return clerkError(500, "internal_clerk_error", "Something went wrong");
    }
    if (method === "GET" && path === "/v1/jwks") {
      return Response.json(this.issuer?.jwks ?? { keys: [] });
    }
    const m = path.match(/^\/v1\/users\/([^/]+)(\/metadata)?$/);
    if (!m) return clerkError(404, "resource_not_found", "not found");
    const user = this.users.get(decodeURIComponent(m[1]));
    if (!user) return clerkError(404, "resource_not_found", "not found");
    if (method === "GET" && !m[2]) return Response.json(user);
    if (method === "PATCH" && m[2]) {
      if (!isObject(body)) return clerkError(422, "form_param_missing", "body required");
      for (const field of ["public_metadata", "private_metadata", "unsafe_metadata"]) {
        const patch = body[field];
        if (patch === undefined) continue;
        if (!isObject(patch)) return clerkError(422, "form_param_format_invalid", field);
        user[field] = deepMerge(isObject(user[field]) ? user[field] : {}, patch);
      }
      user.updated_at = Date.now();
      return Response.json(user);
    }
    return clerkError(405, "method_not_allowed", "method not allowed");
  }
}

function clerkError(status: number, code: string, message: string) {
  return Response.json({
    errors: [{ code, message, long_message: message, meta: {} }],
    clerk_trace_id: crypto.randomUUID(),
  }, { status });
}

function isObject(value: unknown): value is Json {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

/** Clerk's metadata merge: nested objects merge, null removes a key. */
function deepMerge(target: Json, patch: Json): Json {
  const out: Json = { ...target };
  for (const [k, v] of Object.entries(patch)) {
    if (v === null) delete out[k];
    else if (isObject(v) && isObject(out[k])) out[k] = deepMerge(out[k] as Json, v);
    else out[k] = v;
  }
  return out;
}
