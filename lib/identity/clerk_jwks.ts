/**
 * Clerk's signing keys from the Backend API, for deployments without CLERK_JWT_KEY. Anyone can
 * send tokens naming an unknown `kid`: the key set is fetched at most once per JWKS_REFRESH_MS
 * whatever arrives, so junk tokens cannot turn into calls to Clerk (or its rate limits).
 */
import { z } from "zod";
import type { Logger } from "../core/log.ts";

/** The shortest time between two fetches of the key set. */
export const JWKS_REFRESH_MS = 60_000;
const FETCH_TIMEOUT_MS = 10_000;

const jwksSchema = z.object({ keys: z.array(z.unknown()).max(100) });
const rsaKeySchema = z.object({
  kid: z.string().min(1).max(200),
  kty: z.literal("RSA"),
  n: z.string().min(1),
  e: z.string().min(1),
  alg: z.literal("RS256").optional(),
  use: z.literal("sig").optional(),
});

export class ClerkJwks {
  private keys = new Map<string, CryptoKey>();
  /** When the last fetch started (performance.now()); failed fetches count too. */
  private lastFetch = -Infinity;
  private inflight: Promise<void> | null = null;

  constructor(
    private readonly apiUrl: string,
    private readonly secretKey: string,
    private readonly log?: Logger,
  ) {}

  /** The verification key for `kid`, or null when Clerk does not list it (as of the last fetch). */
  async key(kid: string): Promise<CryptoKey | null> {
    const known = this.keys.get(kid);
    if (known) return known;
    // Single flight: tokens arriving during a fetch wait for it instead of starting another.
    if (!this.inflight) {
      if (performance.now() - this.lastFetch < JWKS_REFRESH_MS) return null;
      this.lastFetch = performance.now();
      this.inflight = this.refresh().finally(() => this.inflight = null);
    }
    await this.inflight;
    return this.keys.get(kid) ?? null;
  }

  private async refresh() {
    const url = `${this.apiUrl.replace(/\/+$/, "")}/v1/jwks`;
    try {
      const res = await fetch(url, {
        headers: { authorization: `Bearer ${this.secretKey}`, accept: "application/json" },
        signal: AbortSignal.timeout(FETCH_TIMEOUT_MS),
      });
      if (!res.ok) {
        await res.body?.cancel();
        this.log?.error("Clerk JWKS fetch failed", { status: res.status });
        return;
      }
      const parsed = jwksSchema.safeParse(await res.json());
      if (!parsed.success) {
        this.log?.error("Clerk JWKS answer is not a key set");
        return;
      }
      const next = new Map<string, CryptoKey>();
      for (const raw of parsed.data.keys) {
        const jwk = rsaKeySchema.safeParse(raw);
        if (!jwk.success) continue; // Keys of other types or uses cannot sign Clerk sessions.
        const key = await importRsaKey(jwk.data.n, jwk.data.e);
        if (key) next.set(jwk.data.kid, key);
      }
      // Replaced, not merged: a key Clerk stopped listing (rotated out) stops verifying.
      this.keys = next;
    } catch (err) {
      this.log?.error("Clerk JWKS fetch failed", { error: String(err) });
    }
  }
}

/** An RS256 verification key from a JWK's modulus and exponent; null when they do not form one. */
async function importRsaKey(n: string, e: string): Promise<CryptoKey | null> {
  try {
    return await crypto.subtle.importKey(
      "jwk",
      { kty: "RSA", n, e, alg: "RS256", ext: true },
      { name: "RSASSA-PKCS1-v1_5", hash: "SHA-256" },
      false,
      ["verify"],
    );
  } catch {
    return null;
  }
}
