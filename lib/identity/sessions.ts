/** Session verification: Clerk session tokens (RS256) or, in local mode, locally signed ones. */
import { verifyToken } from "@clerk/backend";
import { sign as signJwt, verify as verifyJwt } from "hono/jwt";
import { z } from "zod";
import type { Config } from "../core/config.ts";
import { type Clock, systemClock } from "../core/clock.ts";
import { decodeBase64Url } from "../core/encoding.ts";
import { sha256 } from "../core/hash.ts";
import { keys } from "../core/kv.ts";
import { BoundedMap } from "../core/kv_ops.ts";
import type { Logger } from "../core/log.ts";
import { ClerkJwks } from "./clerk_jwks.ts";

export interface Session {
  userId: string;
  /** Only for local sessions: the e-mail the person signed in with. */
  email?: string;
  /** Seconds since the epoch when the token stops being valid. */
  exp: number;
  /** Only for local sessions: the id sign-out revokes (Clerk ends its own sessions). */
  sid?: string;
}

const clerkHeader = z.object({
  alg: z.literal("RS256"),
  kid: z.string().min(1).max(200).optional(),
});

const clerkClaims = z.object({
  sub: z.string().min(1).max(200),
  exp: z.number(),
  nbf: z.number().optional(),
  iat: z.number().optional(),
  azp: z.string().optional(),
  iss: z.string().max(500).refine(isClerkIssuer),
  /** Session status: "pending" while the user still has session tasks to finish. */
  sts: z.string().optional(),
});

/** A Clerk token whose shape and claims passed every check that needs no key. */
interface ClerkToken {
  kid?: string;
  claims: z.infer<typeof clerkClaims>;
  signedPart: Uint8Array<ArrayBuffer>;
  signature: Uint8Array<ArrayBuffer>;
}

const LOCAL_ISSUER = "keyway-local";
const LOCAL_SESSION_SECONDS = 7 * 24 * 3600;
const CACHE_MAX = 10_000;
/** Clock skew tolerated on exp, nbf and iat (CONTRACT §3). */
const SKEW_SECONDS = 5;

/** Verifies session tokens; verified claims are cached by token until they expire. */
export class SessionVerifier {
  private readonly cache = new BoundedMap<string, Session>(CACHE_MAX);
  private readonly localSecret?: string;
  /** Clerk's keys from the Backend API, when there is no CLERK_JWT_KEY to verify with. */
  private readonly jwks?: ClerkJwks;
  private readonly clock: Clock;

  constructor(
    private readonly config: Config,
    private readonly kv: Deno.Kv,
    options: { localSecret?: string; log?: Logger; clock?: Clock } = {},
  ) {
    this.localSecret = options.localSecret;
    this.clock = options.clock ?? systemClock;
    const { jwtKey, secretKey, apiUrl } = config.clerk;
    if (!config.localMode && !jwtKey && secretKey) {
      this.jwks = new ClerkJwks(apiUrl, secretKey, options.log);
    }
  }

  async verify(token: string): Promise<Session | null> {
    if (!token || token.length > 8192) return null;
    let session = this.cache.get(token);
    if (session && session.exp <= this.clock() / 1000) {
      this.cache.delete(token);
      session = undefined;
    }
    if (!session) {
      const verified = this.config.localMode
        ? await this.verifyLocal(token)
        : await this.verifyClerk(token);
      if (!verified) return null;
      this.cache.set(token, verified);
      session = verified;
    }
    // Revocations live in KV, not in the cache: a sign-out in any process ends the session here.
    if (session.sid !== undefined && await this.isRevoked(session.sid)) return null;
    return session;
  }

  /** Issues a local-mode session token for an e-mail address (local mode only). */
  async issueLocal(email: string): Promise<{ token: string; userId: string; maxAge: number }> {
    if (!this.config.localMode || !this.localSecret) throw new Error("not in local mode");
    const userId = await localUserId(email);
    const iat = Math.floor(this.clock() / 1000);
    const token = await signJwt(
      {
        sub: userId,
        email,
        sid: crypto.randomUUID(),
        iss: LOCAL_ISSUER,
        iat,
        nbf: iat,
        exp: iat + LOCAL_SESSION_SECONDS,
      },
      this.localSecret,
      "HS256",
    );
    return { token, userId, maxAge: LOCAL_SESSION_SECONDS };
  }

  /**
   * Ends a local session for good: deleting the cookie alone would leave a copied token valid for
   * its whole week. The id is remembered only as long as the token would have lived anyway.
   */
  async revoke(token: string): Promise<void> {
    const session = await this.verify(token);
    if (session?.sid === undefined) return;
    const remainingMs = Math.ceil(session.exp * 1000 - this.clock());
    if (remainingMs <= 0) return;
    await this.kv.set(keys.revokedSession(session.sid), true, { expireIn: remainingMs });
    this.cache.delete(token);
  }

  private async isRevoked(sid: string): Promise<boolean> {
    return (await this.kv.get(keys.revokedSession(sid))).versionstamp !== null;
  }

  private async verifyLocal(token: string): Promise<Session | null> {
    if (!this.localSecret) return null;
    try {
      const claims = await verifyJwt(token, this.localSecret, {
        alg: "HS256",
        iss: LOCAL_ISSUER,
      });
      if (typeof claims.sub !== "string" || typeof claims.exp !== "number") return null;
      // Tokens without a session id (issued before sign-out could revoke them) cannot be ended.
      if (typeof claims.sid !== "string" || !claims.sid || claims.sid.length > 100) return null;
      return {
        userId: claims.sub,
        email: typeof claims.email === "string" ? claims.email : undefined,
        exp: claims.exp,
        sid: claims.sid,
      };
    } catch {
      return null;
    }
  }

  private async verifyClerk(token: string): Promise<Session | null> {
    const { jwtKey } = this.config.clerk;
    if (!jwtKey && !this.jwks) return null;
    // Everything that needs no key is checked first, so junk costs no key import and no fetch.
    const parsed = readClerkToken(token, this.config.clerk.authorizedParties, this.clock());
    if (!parsed) return null;
    const session = { userId: parsed.claims.sub, exp: parsed.claims.exp };
    if (jwtKey) {
      try {
        // verifyToken throws on any failure; the claims it returns are the ones read above.
        await verifyToken(token, { jwtKey, clockSkewInMs: SKEW_SECONDS * 1000 });
        return session;
      } catch {
        return null;
      }
    }
    if (!parsed.kid) return null;
    const key = await this.jwks!.key(parsed.kid);
    if (!key) return null;
    const valid = await crypto.subtle.verify(
      "RSASSA-PKCS1-v1_5",
      key,
      parsed.signature,
      parsed.signedPart,
    );
    return valid ? session : null;
  }
}

/**
 * A Clerk session token's header and claims, or null when it cannot be a valid session whatever
 * its signature: malformed, not RS256, expired or not yet valid (± 5 s), an `azp` that is not an
 * authorized party, an issuer that is no https origin, or a `pending` session (unfinished session
 * tasks count as signed out, as in Clerk's own SDK).
 */
function readClerkToken(
  token: string,
  authorizedParties: string[],
  nowMs: number,
): ClerkToken | null {
  const parts = token.split(".");
  if (parts.length !== 3) return null;
  const header = jsonPart(parts[0], clerkHeader);
  const claims = jsonPart(parts[1], clerkClaims);
  const signature = decodeBase64Url(parts[2]);
  if (!header || !claims || !signature?.length) return null;
  const now = nowMs / 1000;
  if (claims.exp + SKEW_SECONDS <= now) return null;
  if (claims.nbf !== undefined && claims.nbf - SKEW_SECONDS > now) return null;
  if (claims.iat !== undefined && claims.iat - SKEW_SECONDS > now) return null;
  // azp is checked only when present (CONTRACT §3): Clerk omits it for non-browser clients.
  if (claims.azp !== undefined && !authorizedParties.includes(claims.azp)) return null;
  if (claims.sts === "pending") return null;
  return {
    kid: header.kid,
    claims,
    signedPart: new TextEncoder().encode(`${parts[0]}.${parts[1]}`),
    signature,
  };
}

function jsonPart<S extends z.ZodType>(part: string, schema: S): z.infer<S> | null {
  const bytes = decodeBase64Url(part);
  if (!bytes) return null;
  try {
    const parsed = schema.safeParse(JSON.parse(new TextDecoder().decode(bytes)));
    return parsed.success ? parsed.data : null;
  } catch {
    return null;
  }
}

/** Clerk's `iss` is its Frontend API origin (or a proxy URL): https, no credentials or query. */
function isClerkIssuer(iss: string): boolean {
  const url = URL.parse(iss);
  return url !== null && url.protocol === "https:" && !url.username && !url.password &&
    !url.search && !url.hash;
}

/** Stable local user id for an e-mail: `user_local_` + 20 hex of its SHA-256. */
export async function localUserId(email: string): Promise<string> {
  const digest = await sha256(email.trim().toLowerCase());
  return `user_local_${digest.subarray(0, 10).toHex()}`;
}

/** The session token from `Authorization: Bearer` or the `__session` cookie. */
export function sessionTokenFrom(authorization: string | undefined, cookie: string | undefined) {
  if (authorization) {
    const m = authorization.match(/^Bearer\s+(\S+)$/i);
    return m ? m[1] : null;
  }
  return cookie || null;
}
