/**
 * Who a `kw_…` key belongs to, for the gateway: its hash, the user it indexes, and whether it is
 * still that user's key. Remembered per process (bounded, LRU): a hash belongs to one user forever,
 * and the user record is re-read and checked on every request (the admission commit checks the
 * cache epoch that every rotation and deletion bumps).
 */
import { AppError } from "../core/errors.ts";
import { keys } from "../core/kv.ts";
import { BoundedMap } from "../core/kv_ops.ts";
import { checkUserState } from "../limits/policy.ts";
import { hashApiKey, looksLikeApiKey } from "./api_keys.ts";
import type { KeyIndexValue, UserRecord } from "./users.ts";

/** Keys (and hashes) remembered per process. */
const KEY_CACHE_MAX = 50_000;

export function invalidKey(): AppError {
  return new AppError(
    "invalid_api_key",
    "Invalid API key: send your Keyway key as 'Authorization: Bearer kw_…' (or, from an " +
      "Anthropic client, 'x-api-key: kw_…').",
  );
}

export class ApiKeyAuth {
  /**
   * API key → its SHA-256 (hashing is the costliest CPU step of the hot path). The process can
   * decrypt every key anyway (KeyVault), so remembering them adds no exposure.
   */
  private readonly hashByKey = new BoundedMap<string, string>(KEY_CACHE_MAX);
  /** Key hash → user id. */
  private readonly userIdByHash = new BoundedMap<string, string>(KEY_CACHE_MAX);

  constructor(private readonly kv: Deno.Kv) {}

  /** The key's hash, or 401 invalid_api_key for anything that is not a key's shape. */
  async hash(key: string | null | undefined): Promise<string> {
    if (!key || !looksLikeApiKey(key)) throw invalidKey();
    const known = this.hashByKey.get(key);
    if (known) return known;
    const hash = await hashApiKey(key);
    this.hashByKey.set(key, hash);
    return hash;
  }

  /** The id of the user the hash indexes, or 401 invalid_api_key. */
  async userIdFor(hash: string): Promise<string> {
    const cached = this.userIdByHash.get(hash);
    if (cached) return cached;
    const index = await this.kv.get<KeyIndexValue>(keys.keyByHash(hash));
    if (!index.value) throw invalidKey();
    this.userIdByHash.set(hash, index.value.userId);
    return index.value.userId;
  }

  /**
   * The key must still be the user's current key, and the user active. Checking the user record
   * is enough: the key index entry is only ever written in the same commit as the user's `key`
   * (provision, rotate, delete).
   */
  check(
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

  /** The user owning a key (any status), or 401 invalid_api_key. */
  async user(key: string | null | undefined): Promise<UserRecord> {
    const hash = await this.hash(key);
    const userId = await this.userIdFor(hash);
    const user = (await this.kv.get<UserRecord>(keys.user(userId))).value;
    if (user?.key?.hash !== hash) {
      this.userIdByHash.delete(hash);
      throw invalidKey();
    }
    return user;
  }
}
