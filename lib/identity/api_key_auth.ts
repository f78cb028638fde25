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
import { DEFAULT_KEY_ID, keyIdOf } from "./user_record.ts";

/** Whose key it is, and which of theirs: "default" or a connected app's `k_…` id. */
export interface KeyOwner {
  userId: string;
  keyId: string;
}

/** The gateway's auth result: the user (any status) and the id of the key they used. */
export interface KeyAuth {
  user: UserRecord;
  keyId: string;
}

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
  /** Key hash → its user and key id. */
  private readonly ownerByHash = new BoundedMap<string, KeyOwner>(KEY_CACHE_MAX);

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

  /** The user and key id the hash indexes, or 401 invalid_api_key. */
  async owner(hash: string): Promise<KeyOwner> {
    const cached = this.ownerByHash.get(hash);
    if (cached) return cached;
    const index = await this.kv.get<KeyIndexValue>(keys.keyByHash(hash));
    if (!index.value) throw invalidKey();
    const owner = { userId: index.value.userId, keyId: index.value.keyId ?? DEFAULT_KEY_ID };
    this.ownerByHash.set(hash, owner);
    return owner;
  }

  /** The id of the user the hash indexes, or 401 invalid_api_key. */
  async userIdFor(hash: string): Promise<string> {
    return (await this.owner(hash)).userId;
  }

  /**
   * The key must still be one of the user's keys (the default or a connected app's), and the
   * user active. Checking the user record is enough: the key index entry is only ever written in
   * the same commit as the user's `key` or `apps` (provision, rotate, connect, revoke, delete).
   */
  check(
    hash: string,
    userId: string,
    user: UserRecord | null,
    headers: Record<string, string>,
  ): UserRecord {
    if (!user || user.id !== userId || keyIdOf(user, hash) === null) {
      this.ownerByHash.delete(hash);
      throw invalidKey();
    }
    return checkUserState(user, headers);
  }

  /** The user owning a key (any status), or 401 invalid_api_key. */
  async user(key: string | null | undefined): Promise<UserRecord> {
    return (await this.resolve(key)).user;
  }

  /** The user owning a key (any status) and which key it is, or 401 invalid_api_key. */
  async resolve(key: string | null | undefined): Promise<KeyAuth> {
    const hash = await this.hash(key);
    const { userId } = await this.owner(hash);
    const user = (await this.kv.get<UserRecord>(keys.user(userId))).value;
    const keyId = user ? keyIdOf(user, hash) : null;
    if (!user || keyId === null) {
      this.ownerByHash.delete(hash);
      throw invalidKey();
    }
    return { user, keyId };
  }
}
