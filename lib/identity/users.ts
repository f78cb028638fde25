/** Users and their keys in KV: provisioning, rotation, revocation, status and limit overrides. */
import { CacheEpoch } from "./cache_epoch.ts";
import { AppError } from "../core/errors.ts";
import { formatCount } from "../core/format.ts";
import { type Clock, systemClock } from "../core/clock.ts";
import {
  generateApiKey,
  hashApiKey,
  keyPrefix,
  type KeyVault,
  looksLikeApiKey,
} from "./api_keys.ts";
import { CONFLICT, keys, retryAtomic } from "../core/kv.ts";
import { encodeBase64Url } from "../core/encoding.ts";
import { BoundedMap } from "../core/kv_ops.ts";
import type { Events } from "../alerts/deliver.ts";
import {
  type AppKey,
  keyIdOf,
  type KeyIndexValue,
  type LimitOverrides,
  type Profile,
  type StoredKey,
  type UserRecord,
} from "./user_record.ts";

export type {
  AppKey,
  KeyIndexValue,
  LimitOverrides,
  Profile,
  StoredKey,
  UserRecord,
  UserStatus,
} from "./user_record.ts";

export interface ProvisionResult {
  user: UserRecord;
  apiKey: string;
  created: boolean;
  /** Set when `apiKey` is a connected app's key rather than the default one. */
  app?: AppKey;
}

/** How long a revoked app key's name is kept for its past usage (longer than /api/usage's 90 days). */
const REVOKED_NAME_KEEP_MS = 100 * 86_400_000;

const CACHE_MAX = 50_000;
const HOUR_MS = 3_600_000;
/** Key rotations a user may make per clock hour. */
export const ROTATIONS_PER_HOUR = 10;

export class Users {
  /**
   * User id → their provisioned key, so GET /api/key needs neither a KV read nor a decryption.
   * Dropped on every invalidating write (here at once, in other processes within the epoch's
   * interval — see lib/identity/cache_epoch.ts).
   */
  private readonly cache = new BoundedMap<string, ProvisionResult>(CACHE_MAX);

  constructor(
    private readonly kv: Deno.Kv,
    private readonly vault: KeyVault,
    readonly epoch: CacheEpoch = new CacheEpoch(kv),
    /** Lifecycle events ride in the commits below, so each is sent once, when its change lands. */
    private readonly events?: Events,
    private readonly clock: Clock = systemClock,
  ) {
    epoch.onChange((userIds) => {
      if (userIds === null) this.cache.clear();
      else for (const id of userIds) this.cache.delete(id);
    });
  }

  async get(userId: string): Promise<UserRecord | null> {
    return (await this.kv.get<UserRecord>(keys.user(userId))).value;
  }

  /**
   * Creates the user and their key if needed, in one atomic commit; concurrent callers all get
   * the one key that won. Deleted users stay deleted (user_deleted).
   */
  async provision(
    userId: string,
    profile?: Profile,
    /** `fresh`: read KV, not this process's cache (a key handed to an editor must be current). */
    options: { fresh?: boolean } = {},
  ): Promise<ProvisionResult> {
    await this.epoch.fresh();
    const hit = options.fresh ? undefined : this.cache.get(userId);
    if (hit) return hit;
    const generation = this.epoch.generationOf(userId);
    const result = await this.provisionInKv(userId, profile);
    if (generation === this.epoch.generationOf(userId)) {
      this.cache.set(userId, { ...result, created: false });
    }
    return result;
  }

  private async provisionInKv(userId: string, profile?: Profile): Promise<ProvisionResult> {
    return await retryAtomic<ProvisionResult>(async () => {
      const entry = await this.kv.get<UserRecord>(keys.user(userId));
      const existing = entry.value;
      if (existing?.status === "deleted") {
        throw new AppError("user_deleted", "This account has been deleted.");
      }
      if (existing?.key) {
        const apiKey = await this.vault.decrypt(existing.key.ciphertext, userId);
        return { user: existing, apiKey, created: false };
      }
      const now = new Date(this.clock()).toISOString();
      const apiKey = generateApiKey();
      const key = await this.storedKey(apiKey, userId, now);
      const user: UserRecord = existing ? { ...existing, key, updatedAt: now } : {
        id: userId,
        email: profile?.email ?? null,
        firstName: profile?.firstName ?? null,
        lastName: profile?.lastName ?? null,
        status: "active",
        createdAt: now,
        updatedAt: now,
        key,
        limits: {},
        profileKnown: profile !== undefined,
        clerkUpdatedAt: profile?.clerkUpdatedAt ?? null,
      };
      const op = this.kv.atomic()
        .check(entry)
        .check({ key: keys.keyByHash(key.hash), versionstamp: null })
        .set(keys.user(userId), user)
        .set(keys.keyByHash(key.hash), { userId } satisfies KeyIndexValue);
      // Only the commit that creates the key reports it: a race of any number of callers and
      // webhooks sends one user.provisioned.
      this.events?.add(op, {
        type: "user.provisioned",
        userId,
        email: user.email,
        firstName: user.firstName,
        lastName: user.lastName,
        keyPrefix: this.events.keyMode === "proxy" ? key.prefix : null,
        mode: this.events.keyMode,
      });
      const res = await op.commit();
      return res.ok ? { user, apiKey, created: true } : CONFLICT;
    }, "provision");
  }

  /**
   * Replaces the user's key; the old hash is removed in the same commit so it stops at once. At
   * most ROTATIONS_PER_HOUR per user and clock hour (429 with Retry-After beyond): a stolen
   * session cannot churn keys, or the caches of every process, without end.
   */
  async rotate(userId: string): Promise<ProvisionResult> {
    return await retryAtomic<ProvisionResult>(async () => {
      const hour = Math.floor(this.clock() / HOUR_MS);
      const [entry, rotations] = await this.kv.getMany<[UserRecord, number]>([
        keys.user(userId),
        keys.keyRotations(userId, hour),
      ]);
      const rotated = rotations.value ?? 0;
      if (rotated >= ROTATIONS_PER_HOUR) {
        const wait = Math.ceil(((hour + 1) * HOUR_MS - this.clock()) / 1000);
        throw new AppError(
          "rate_limit_exceeded",
          `A key can be rotated ${
            formatCount(ROTATIONS_PER_HOUR, "time")
          } an hour; retry in ${wait}s.`,
          { "retry-after": String(Math.max(1, wait)) },
        );
      }
      const user = entry.value;
      if (!user) throw new AppError("not_found", "No key has been provisioned for this user yet.");
      if (user.status === "deleted") {
        throw new AppError("user_deleted", "This account has been deleted.");
      }
      const now = new Date(this.clock()).toISOString();
      const apiKey = generateApiKey();
      const key = await this.storedKey(apiKey, userId, now);
      const next: UserRecord = { ...user, key, updatedAt: now };
      const op = this.kv.atomic()
        .check(entry)
        .check(rotations)
        .check({ key: keys.keyByHash(key.hash), versionstamp: null })
        .set(keys.user(userId), next)
        .set(keys.keyByHash(key.hash), { userId } satisfies KeyIndexValue)
        .set(keys.keyRotations(userId, hour), rotated + 1, { expireIn: 2 * HOUR_MS });
      if (user.key) op.delete(keys.keyByHash(user.key.hash));
      this.events?.add(op, {
        type: "key.rotated",
        userId,
        keyPrefix: this.events.keyMode === "proxy" ? key.prefix : null,
      });
      const res = await this.epoch.bump(op, userId).commit();
      return res.ok ? { user: next, apiKey, created: true } : CONFLICT;
    }, "rotate").finally(() => this.epoch.invalidate([userId]));
  }

  /**
   * Stores Clerk's e-mail and names; a deleted user's profile stays dropped, and a profile older
   * than the stored one (by Clerk's `updated_at`: Svix may deliver out of order) changes nothing.
   */
  async updateProfile(userId: string, profile: Profile): Promise<UserRecord | null> {
    return await this.update(userId, (user) => {
      if (user.status === "deleted" || isOlder(profile, user)) return null;
      return { ...user, ...profile, profileKnown: true };
    });
  }

  /**
   * Revokes every key, marks the user deleted and drops personal data; usage stays for billing.
   * Works for users never seen before too, so a late user.created cannot bring them back.
   */
  async markDeleted(userId: string): Promise<void> {
    await retryAtomic(async () => {
      const entry = await this.kv.get<UserRecord>(keys.user(userId));
      const user = entry.value;
      if (user?.status === "deleted") return undefined;
      const now = new Date(this.clock()).toISOString();
      const tombstone: UserRecord = {
        id: userId,
        email: null,
        firstName: null,
        lastName: null,
        status: "deleted",
        createdAt: user?.createdAt ?? now,
        updatedAt: now,
        key: null,
        apps: [],
        limits: user?.limits ?? {},
        profileKnown: true,
      };
      const op = this.kv.atomic().check(entry).set(keys.user(userId), tombstone);
      if (user?.key) op.delete(keys.keyByHash(user.key.hash));
      // Every connected app's key goes with it (at most MAX_KEYS_PER_USER deletes).
      for (const app of user?.apps ?? []) op.delete(keys.keyByHash(app.hash));
      // A tombstone for an id Keyway never knew is no news to the operator's backend.
      if (user) this.events?.add(op, { type: "user.deleted", userId });
      return (await this.epoch.bump(op, userId).commit()).ok ? undefined : CONFLICT;
    }, "delete user").finally(() => this.epoch.invalidate([userId]));
  }

  /** Disables or enables a user; `by` is the operator who did it (reported in the event). */
  async setStatus(
    userId: string,
    status: "active" | "disabled",
    by: string | null = null,
  ): Promise<UserRecord> {
    const user = await this.update(userId, (u) => {
      if (u.status === "deleted") {
        throw new AppError("user_deleted", "This account has been deleted.");
      }
      return { ...u, status };
    }, (op, before) => {
      // Disabling a disabled user changes nothing, so it reports nothing.
      if (before.status === status) return;
      this.events?.add(op, {
        type: status === "disabled" ? "user.disabled" : "user.enabled",
        userId,
        by,
      });
    });
    if (!user) throw new AppError("not_found", `No user ${userId}.`);
    return user;
  }

  /** Applies limit overrides; a null value clears that override. */
  async setLimits(
    userId: string,
    patch: { [K in keyof LimitOverrides]?: number | null },
  ): Promise<UserRecord> {
    const user = await this.update(userId, (u) => {
      // As for enable: a deleted account has nothing left to limit.
      if (u.status === "deleted") {
        throw new AppError("user_deleted", "This account has been deleted.");
      }
      const limits: LimitOverrides = { ...u.limits };
      for (
        const [name, value] of Object.entries(patch) as [keyof LimitOverrides, number | null][]
      ) {
        if (value === null) delete limits[name];
        else if (value !== undefined) limits[name] = value;
      }
      return { ...u, limits };
    });
    if (!user) throw new AppError("not_found", `No user ${userId}.`);
    return user;
  }

  /** The user owning an API key, or null for a malformed, unknown or revoked key. */
  async resolveKey(apiKey: string): Promise<UserRecord | null> {
    if (!looksLikeApiKey(apiKey)) return null;
    const hash = await hashApiKey(apiKey);
    const index = await this.kv.get<KeyIndexValue>(keys.keyByHash(hash));
    if (!index.value) return null;
    const user = await this.get(index.value.userId);
    return user && keyIdOf(user, hash) !== null ? user : null;
  }

  /**
   * A new key for a connected app, named as the user saw the client, in one atomic commit with
   * the index entry and the key.created event. The user must be provisioned and active, and hold
   * fewer than `maxKeys` keys (the default key counts): beyond, 403 forbidden and nothing created.
   */
  async createAppKey(
    userId: string,
    app: { name: string; flow: AppKey["flow"] },
    maxKeys: number,
  ): Promise<ProvisionResult & { app: AppKey }> {
    return await retryAtomic<ProvisionResult & { app: AppKey }>(async () => {
      const entry = await this.kv.get<UserRecord>(keys.user(userId));
      const user = entry.value;
      if (!user) throw new AppError("not_found", `No user ${userId}.`);
      if (user.status === "deleted") {
        throw new AppError("user_deleted", "This account has been deleted.");
      }
      if (user.status === "disabled") {
        throw new AppError("user_disabled", "This account has been disabled.");
      }
      if (keyCount(user) >= maxKeys) throw tooManyKeys(maxKeys);
      const now = new Date(this.clock()).toISOString();
      const apiKey = generateApiKey();
      const stored = await this.storedKey(apiKey, userId, now);
      const created: AppKey = {
        ...stored,
        id: newKeyId(),
        name: uniqueName(app.name, user.apps ?? []),
        client: app.name,
        flow: app.flow,
      };
      const next: UserRecord = { ...user, apps: [...(user.apps ?? []), created], updatedAt: now };
      const op = this.kv.atomic()
        .check(entry)
        .check({ key: keys.keyByHash(stored.hash), versionstamp: null })
        .set(keys.user(userId), next)
        .set(keys.keyByHash(stored.hash), { userId, keyId: created.id } satisfies KeyIndexValue);
      this.events?.add(op, {
        type: "key.created",
        userId,
        keyId: created.id,
        name: created.name,
        keyPrefix: created.prefix,
      });
      // Other processes may remember the record without this key: they read it again.
      const res = await this.epoch.bump(op, userId).commit();
      return res.ok ? { user: next, apiKey, created: true, app: created } : CONFLICT;
    }, "create app key").finally(() => this.epoch.invalidate([userId]));
  }

  /** A connected app's key as the connect flows hand it over, or null when it was revoked. */
  async appKey(userId: string, keyId: string): Promise<ProvisionResult | null> {
    const user = await this.get(userId);
    const app = user?.apps?.find((k) => k.id === keyId);
    if (!user || !app) return null;
    return { user, apiKey: await this.vault.decrypt(app.ciphertext, userId), created: false, app };
  }

  /**
   * Revokes one connected app's key: gone from the record and the index in one commit that bumps
   * the cache epoch, so every process refuses it on its next request. 404 for an id the user
   * does not hold; the default key is rotated, never revoked (400).
   */
  async revokeAppKey(userId: string, keyId: string): Promise<AppKey> {
    if (keyId === "default") {
      throw new AppError(
        "invalid_request",
        "id: the default key cannot be deleted; rotate it instead (POST /api/key/rotate).",
      );
    }
    return await retryAtomic<AppKey>(async () => {
      const entry = await this.kv.get<UserRecord>(keys.user(userId));
      const user = entry.value;
      const app = user?.apps?.find((k) => k.id === keyId);
      if (!user || !app) throw new AppError("not_found", `id: no key ${keyId} on this account.`);
      const now = new Date(this.clock()).toISOString();
      const next: UserRecord = {
        ...user,
        apps: user.apps!.filter((k) => k.id !== keyId),
        updatedAt: now,
      };
      const op = this.kv.atomic()
        .check(entry)
        .set(keys.user(userId), next)
        .delete(keys.keyByHash(app.hash))
        .delete(keys.keyLastUsed(userId, keyId))
        .set(
          keys.revokedKey(userId, keyId),
          { name: app.name, keyPrefix: app.prefix, revokedAt: now } satisfies RevokedKey,
          { expireIn: REVOKED_NAME_KEEP_MS },
        );
      this.events?.add(op, {
        type: "key.revoked",
        userId,
        keyId,
        name: app.name,
        keyPrefix: app.prefix,
      });
      const res = await this.epoch.bump(op, userId).commit();
      return res.ok ? app : CONFLICT;
    }, "revoke app key").finally(() => this.epoch.invalidate([userId]));
  }

  async *list(): AsyncGenerator<UserRecord> {
    for await (const entry of this.kv.list<UserRecord>({ prefix: keys.users() })) {
      yield entry.value;
    }
  }

  async revealKey(user: UserRecord): Promise<string | null> {
    return user.key ? await this.vault.decrypt(user.key.ciphertext, user.id) : null;
  }

  private async storedKey(apiKey: string, userId: string, now: string): Promise<StoredKey> {
    return {
      hash: await hashApiKey(apiKey),
      prefix: keyPrefix(apiKey),
      ciphertext: await this.vault.encrypt(apiKey, userId),
      createdAt: now,
    };
  }

  private async update(
    userId: string,
    change: (user: UserRecord) => UserRecord | null,
    /** Adds to the commit (an event) once the change is known. */
    alongside?: (op: Deno.AtomicOperation, before: UserRecord) => void,
  ): Promise<UserRecord | null> {
    return await retryAtomic<UserRecord | null>(async () => {
      const entry = await this.kv.get<UserRecord>(keys.user(userId));
      if (!entry.value) return null;
      const next = change(entry.value);
      if (!next) return null;
      next.updatedAt = new Date(this.clock()).toISOString();
      const op = this.kv.atomic().check(entry).set(keys.user(userId), next);
      alongside?.(op, entry.value);
      const res = await this.epoch.bump(op, userId).commit();
      return res.ok ? next : CONFLICT;
    }, "update user").finally(() => this.epoch.invalidate([userId]));
  }
}

/** What is kept of a revoked app key: its name and prefix, for its past usage. */
export interface RevokedKey {
  name: string;
  keyPrefix: string;
  revokedAt: string;
}

/** Keys a user holds: the default key (once provisioned) and one per connected app. */
export function keyCount(user: Pick<UserRecord, "key" | "apps">): number {
  return (user.key ? 1 : 0) + (user.apps?.length ?? 0);
}

/** `name`, or `name (2)`, `name (3)`… when another of the user's app keys has it already. */
function uniqueName(name: string, apps: AppKey[]): string {
  const taken = new Set(apps.map((a) => a.name));
  if (!taken.has(name)) return name;
  let n = 2;
  while (taken.has(`${name} (${n})`)) n++;
  return `${name} (${n})`;
}

/** `k_` + 16 random bytes, base64url: a connected app's key id (never secret). */
function newKeyId(): string {
  return "k_" + encodeBase64Url(crypto.getRandomValues(new Uint8Array(16)));
}

/** MAX_KEYS_PER_USER reached: what the approval pages say. */
export function tooManyKeys(maxKeys: number): AppError {
  return new AppError(
    "forbidden",
    `This account already holds ${formatCount(maxKeys, "key")}, the most it may have. ` +
      "Revoke a connected app you no longer use on your dashboard, then try again.",
  );
}

/** True when both carry Clerk's `updated_at` and the profile's is the earlier. */
function isOlder(profile: Profile, user: UserRecord): boolean {
  const incoming = profile.clerkUpdatedAt;
  const stored = user.clerkUpdatedAt;
  return incoming != null && stored != null && incoming < stored;
}

/** A secret generated once and kept in KV (local mode only: session signing, key encryption). */
export async function localSecret(kv: Deno.Kv, name: string): Promise<string> {
  const key = keys.localSecret(name);
  const existing = await kv.get<string>(key);
  if (existing.value) return existing.value;
  const fresh = Array.from(
    crypto.getRandomValues(new Uint8Array(32)),
    (b) => b.toString(16).padStart(2, "0"),
  ).join("");
  await kv.atomic().check({ key, versionstamp: null }).set(key, fresh).commit();
  // Whoever won the race, everyone uses the stored value.
  return (await kv.get<string>(key)).value!;
}
