/** A fake Clerk instance's token issuer: its own RS256 key pair, Clerk-shaped session tokens. */
import { encodeBase64Url } from "../../lib/core/encoding.ts";

const enc = new TextEncoder();

export interface IssuerOptions {
  kid?: string;
  issuer?: string;
}

export class ClerkIssuer {
  private constructor(
    private readonly privateKey: CryptoKey,
    /** PEM public key, the value for CLERK_JWT_KEY. */
    readonly publicKeyPem: string,
    /** The JWKS document Clerk serves at /v1/jwks. */
    readonly jwks: { keys: JsonWebKey[] },
    readonly kid: string,
    readonly issuer: string,
  ) {}

  static async create(options: IssuerOptions = {}): Promise<ClerkIssuer> {
    const pair = await crypto.subtle.generateKey(
      {
        name: "RSASSA-PKCS1-v1_5",
        modulusLength: 2048,
        publicExponent: new Uint8Array([1, 0, 1]),
        hash: "SHA-256",
      },
      true,
      ["sign", "verify"],
    );
    const spki = new Uint8Array(await crypto.subtle.exportKey("spki", pair.publicKey));
    const b64 = btoa(String.fromCharCode(...spki));
    const pem = `-----BEGIN PUBLIC KEY-----\n${
      b64.match(/.{1,64}/g)!.join("\n")
    }\n-----END PUBLIC KEY-----`;
    const kid = options.kid ?? "ins_test_" + crypto.randomUUID().slice(0, 8);
    const jwk = await crypto.subtle.exportKey("jwk", pair.publicKey);
    return new ClerkIssuer(
      pair.privateKey,
      pem,
      { keys: [{ ...jwk, kid, alg: "RS256", use: "sig" } as JsonWebKey] },
      kid,
      options.issuer ?? "https://clerk.keyway.test",
    );
  }

  /** A session token for `sub`; claims and header fields may be overridden or removed (undefined). */
  async token(
    sub: string,
    options: {
      claims?: Record<string, unknown>;
      header?: Record<string, unknown>;
      ttlSeconds?: number;
      azp?: string;
    } = {},
  ): Promise<string> {
    const now = Math.floor(Date.now() / 1000);
    const header = { alg: "RS256", typ: "JWT", kid: this.kid, ...options.header };
    const claims: Record<string, unknown> = {
      azp: options.azp ?? "http://localhost:8000",
      exp: now + (options.ttlSeconds ?? 60),
      iat: now - 1,
      nbf: now - 1,
      iss: this.issuer,
      sid: "sess_" + crypto.randomUUID().replaceAll("-", "").slice(0, 24),
      sub,
      v: 2,
      ...options.claims,
    };
    for (const [k, v] of Object.entries(claims)) if (v === undefined) delete claims[k];
    const input = `${b64url(header)}.${b64url(claims)}`;
    if (header.alg === "none") return `${input}.`;
    const sig = await crypto.subtle.sign("RSASSA-PKCS1-v1_5", this.privateKey, enc.encode(input));
    return `${input}.${encodeBase64Url(new Uint8Array(sig))}`;
  }
}

function b64url(value: unknown): string {
  return encodeBase64Url(enc.encode(JSON.stringify(value)));
}
