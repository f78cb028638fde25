/** Per-user API keys: generation, SHA-256 look-up hash, AES-GCM encryption at rest. */
import { decodeBase64Url, encodeBase64Url } from "../core/encoding.ts";
import { sha256Base64url } from "../core/hash.ts";

const encoder = new TextEncoder();

/** A new `kw_` key: 32 random bytes, base64url (43 characters). */
export function generateApiKey(): string {
  return "kw_" + encodeBase64Url(crypto.getRandomValues(new Uint8Array(32)));
}

export function keyPrefix(apiKey: string): string {
  return apiKey.slice(0, 7);
}

/** Shape check before any hashing: `kw_` plus 43 base64url characters. */
export function looksLikeApiKey(value: string): boolean {
  return /^kw_[A-Za-z0-9_-]{43}$/.test(value);
}

/** The key's look-up hash (keys.keyByHash): its SHA-256, base64url. */
export function hashApiKey(apiKey: string): Promise<string> {
  return sha256Base64url(apiKey);
}

/** Encrypts and decrypts keys with an AES-256-GCM key derived (HKDF) from a secret. */
export class KeyVault {
  private constructor(private readonly key: CryptoKey) {}

  static async fromSecret(secret: string): Promise<KeyVault> {
    const material = await crypto.subtle.importKey("raw", encoder.encode(secret), "HKDF", false, [
      "deriveKey",
    ]);
    const key = await crypto.subtle.deriveKey(
      {
        name: "HKDF",
        hash: "SHA-256",
        salt: encoder.encode("keyway/api-keys"),
        info: encoder.encode("aes-256-gcm v1"),
      },
      material,
      { name: "AES-GCM", length: 256 },
      false,
      ["encrypt", "decrypt"],
    );
    return new KeyVault(key);
  }

  /** `v1.<iv>.<ciphertext>`, both base64url; the user id is bound as additional data. */
  async encrypt(plain: string, userId: string): Promise<string> {
    const iv = crypto.getRandomValues(new Uint8Array(12));
    const sealed = await crypto.subtle.encrypt(
      { name: "AES-GCM", iv, additionalData: encoder.encode(userId) },
      this.key,
      encoder.encode(plain),
    );
    return `v1.${encodeBase64Url(iv)}.${encodeBase64Url(new Uint8Array(sealed))}`;
  }

  async decrypt(sealed: string, userId: string): Promise<string> {
    const [version, iv, data] = sealed.split(".");
    if (version !== "v1" || !iv || !data) throw new Error("unknown key ciphertext format");
    const plain = await crypto.subtle.decrypt(
      { name: "AES-GCM", iv: decodeBase64UrlBytes(iv), additionalData: encoder.encode(userId) },
      this.key,
      decodeBase64UrlBytes(data),
    );
    return new TextDecoder().decode(plain);
  }
}

function decodeBase64UrlBytes(s: string): Uint8Array<ArrayBuffer> {
  const bytes = decodeBase64Url(s);
  if (!bytes) throw new Error("unknown key ciphertext format");
  return bytes;
}
