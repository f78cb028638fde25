/** Session verification: Clerk session tokens (RS256) or, in local mode, locally signed ones. */
import { verifyToken } from "@clerk/backend";
import { sign as signJwt, verify as verifyJwt } from "hono/jwt";
import { z } from "zod";
import type { Config } from "../core/config.ts";

export interface Session {
  userId: string;
  /** Only for local sessions: the e-mail the person signed in with. */
  email?: string;
  /** Seconds since the epoch when the token stops being valid. */
  exp: number;
}

const clerkClaims = z.object({
  sub: z.string().min(1).max(200),
  exp: z.number(),
  azp: z.string().optional(),
});

const LOCAL_ISSUER = "keyway-local";
const LOCAL_SESSION_SECONDS = 7 * 24 * 3600;
const CACHE_MAX = 10_000;

/** Verifies session tokens; verified claims are cached by token until they expire. */
export class SessionVerifier {
  private readonly cache = new Map<string, Session>();

  constructor(private readonly config: Config, private readonly localSecret?: string) {}

  async verify(token: string): Promise<Session | null> {
    if (!token || token.length > 8192) return null;
    const now = Date.now() / 1000;
    const cached = this.cache.get(token);
    if (cached) {
      if (cached.exp > now) return cached;
      this.cache.delete(token);
    }
    const session = this.config.localMode
      ? await this.verifyLocal(token)
      : await this.verifyClerk(token);
    if (session) this.remember(token, session);
    return session;
  }

  /** Issues a local-mode session token for an e-mail address (local mode only). */
  async issueLocal(email: string): Promise<{ token: string; userId: string; maxAge: number }> {
    if (!this.config.localMode || !this.localSecret) throw new Error("not in local mode");
    const userId = await localUserId(email);
    const iat = Math.floor(Date.now() / 1000);
    const token = await signJwt(
      { sub: userId, email, iss: LOCAL_ISSUER, iat, nbf: iat, exp: iat + LOCAL_SESSION_SECONDS },
      this.localSecret,
      "HS256",
    );
    return { token, userId, maxAge: LOCAL_SESSION_SECONDS };
  }

  private async verifyLocal(token: string): Promise<Session | null> {
    if (!this.localSecret) return null;
    try {
      const claims = await verifyJwt(token, this.localSecret, {
        alg: "HS256",
        iss: LOCAL_ISSUER,
      });
      if (typeof claims.sub !== "string" || typeof claims.exp !== "number") return null;
      return {
        userId: claims.sub,
        email: typeof claims.email === "string" ? claims.email : undefined,
        exp: claims.exp,
      };
    } catch {
      return null;
    }
  }

  private async verifyClerk(token: string): Promise<Session | null> {
    const { jwtKey, secretKey, apiUrl, authorizedParties } = this.config.clerk;
    if (!jwtKey && !secretKey) return null;
    try {
      const result = await verifyToken(token, {
        jwtKey,
        secretKey: jwtKey ? undefined : secretKey,
        apiUrl,
        clockSkewInMs: 5000,
      });
      // verifyToken returns the verified claims and throws on any failure.
      const claims = clerkClaims.safeParse(result);
      if (!claims.success) return null;
      // azp is checked only when present (CONTRACT §3); @clerk/backend would also reject
      // tokens without it, which Clerk issues to non-browser clients.
      const { azp } = claims.data;
      if (azp !== undefined && !authorizedParties.includes(azp)) return null;
      return { userId: claims.data.sub, exp: claims.data.exp };
    } catch {
      return null;
    }
  }

  private remember(token: string, session: Session) {
    if (this.cache.size >= CACHE_MAX) {
      // Maps iterate in insertion order: drop the oldest entry.
      this.cache.delete(this.cache.keys().next().value!);
    }
    this.cache.set(token, session);
  }
}

/** Stable local user id for an e-mail: `user_local_` + 20 hex of its SHA-256. */
export async function localUserId(email: string): Promise<string> {
  const digest = await crypto.subtle.digest(
    "SHA-256",
    new TextEncoder().encode(email.trim().toLowerCase()),
  );
  const hex = Array.from(
    new Uint8Array(digest).slice(0, 10),
    (b) => b.toString(16).padStart(2, "0"),
  ).join("");
  return `user_local_${hex}`;
}

/** The session token from `Authorization: Bearer` or the `__session` cookie. */
export function sessionTokenFrom(authorization: string | undefined, cookie: string | undefined) {
  if (authorization) {
    const m = authorization.match(/^Bearer\s+(\S+)$/i);
    return m ? m[1] : null;
  }
  return cookie || null;
}
