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
}
