/**
 * The user records Keyway keeps in KV (keys.user, keys.keyByHash): shapes only, so modules that
 * read them (events, policy, reports) need not import the Users service.
 */

export type UserStatus = "active" | "disabled" | "deleted";

export interface StoredKey {
  hash: string;
  prefix: string;
  /** AES-GCM ciphertext of the key (KeyVault), so /api/key can hand it out again. */
  ciphertext: string;
  createdAt: string;
}

/** The default key's id (CONTRACT: it survives rotation); connected apps have `k_…` ids. */
export const DEFAULT_KEY_ID = "default";

/** A connected app's key (CONTRACT §5 Connecting an editor), kept in its user's record. */
export interface AppKey extends StoredKey {
  /** `k_` + 22 base64url characters. */
  id: string;
  /**
   * How it is listed: the client's name as the user saw it on the approval page, numbered when
   * another of the user's keys has that name already ("VS Code (2)").
   */
  name: string;
  /** The client's name as it gave it. */
  client?: string;
  /** How it was connected. */
  flow: "redirect" | "device";
}

export interface LimitOverrides {
  rpm?: number;
  rpd?: number;
  /** 0 means unlimited, as with the environment defaults. */
  tokensPerDay?: number;
  budgetUsdMonthly?: number;
}

export interface UserRecord {
  id: string;
  email: string | null;
  firstName: string | null;
  lastName: string | null;
  status: UserStatus;
  createdAt: string;
  updatedAt: string;
  key: StoredKey | null;
  /**
   * Connected apps' keys (absent on records from before them). In the record, not beside it: the
   * gateway re-reads the record on every request and every change to it bumps the cache epoch, so
   * a revoked app key stops at once everywhere, as a rotated default key does.
   */
  apps?: AppKey[];
  limits: LimitOverrides;
  /** True once e-mail and names came from Clerk (webhook or Backend API). */
  profileKnown: boolean;
  /** Clerk's `updated_at` (ms) of the stored profile; absent on records from before it. */
  clerkUpdatedAt?: number | null;
}

export interface Profile {
  email: string | null;
  firstName: string | null;
  lastName: string | null;
  /** Clerk's `updated_at` (ms) of this profile, when it came from Clerk. */
  clerkUpdatedAt?: number | null;
}

/** Looks up a user by key hash; the hash index holds only the user id. */
export interface KeyIndexValue {
  userId: string;
  /** The key's id; absent for the default key. */
  keyId?: string;
}

/** The id of the user's key with this hash, or null when it is none of theirs (any more). */
export function keyIdOf(user: Pick<UserRecord, "key" | "apps">, hash: string): string | null {
  if (user.key?.hash === hash) return DEFAULT_KEY_ID;
  return user.apps?.find((k) => k.hash === hash)?.id ?? null;
}
