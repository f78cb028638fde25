/**
 * Connecting an editor without copy-paste (CONTRACT §5): PKCE authorization codes and RFC 8628
 * device codes. Each approval creates the app's own key (lib/identity/users.ts createAppKey);
 * records hold the user id and that key's id, never the key (it is read at exchange time), and
 * every code is stored as its SHA-256 so a KV dump hands out nothing.
 */
import { type Clock, systemClock } from "../core/clock.ts";
import { AppError } from "../core/errors.ts";
import { randomToken } from "../core/encoding.ts";
import { sha256Base64url } from "../core/hash.ts";
import { CONFLICT, keys, retryAtomic } from "../core/kv.ts";

export interface ConnectOptions {
  /** How long a PKCE code may be exchanged (CONTRACT: 60 s). Tests shorten it. */
  codeTtlMs?: number;
  /** How long a device code lives (CONTRACT: 600 s). */
  deviceTtlMs?: number;
  /** The polling interval handed out, in seconds (CONTRACT: 5). Tests shorten it. */
  pollIntervalS?: number;
  /** Wrong user codes a user may enter per window before the page refuses more. */
  missLimit?: number;
  missWindowMs?: number;
  /** Device authorizations anyone may start per minute, all clients together (no sign-in). */
  deviceStartsPerMinute?: number;
  /** Device authorizations one client address may start per minute (well under the above). */
  deviceStartsPerAddress?: number;
  /** The clock (ms). */
  now?: Clock;
}

/** Where a PKCE flow may send its code, and how the approve page names it. */
export interface RedirectTarget {
  url: URL;
  /** What the user is shown: `vscode://publisher.extension` or `http://127.0.0.1:53123`. */
  label: string;
  /** The CSP source the approve page's form may navigate to (`vscode:` or an http origin). */
  cspSource: string;
}

/** Who approved, and the key the approval created (null in shared mode: the master key). */
export interface Grant {
  userId: string;
  keyId: string | null;
}

interface CodeRecord {
  userId: string;
  keyId?: string | null;
  challenge: string;
  client: string;
  expiresAt: number;
}

export type DeviceStatus = "pending" | "approved" | "denied";

interface DeviceRecord {
  userCode: string;
  client: string;
  expiresAt: number;
  /** Seconds; grows by 5 on every slow_down (RFC 8628 §3.5). */
  interval: number;
  lastPollAt: number | null;
  status: DeviceStatus;
  userId: string | null;
  keyId?: string | null;
  /** When it was started (ms) and from which client address: the approve page shows both. */
  startedAt?: number;
  address?: string | null;
}

/** A pending device authorization as the approve page shows it. */
export interface DeviceRequest {
  userCode: string;
  client: string;
  status: DeviceStatus;
  /** When the request was started (ms), and the address it came from (null when unknown). */
  startedAt: number | null;
  address: string | null;
}

export interface DeviceStart {
  deviceCode: string;
  userCode: string;
  expiresIn: number;
  interval: number;
}

/** RFC 8628 §6.1: consonants only (no vowels, so no words; no 0/O, 1/I confusion). */
export const USER_CODE_ALPHABET = "BCDFGHJKLMNPQRSTVWXZ";
const USER_CODE_RE = new RegExp(`^[${USER_CODE_ALPHABET}]{8}$`);
/** Kept past expiry so late polls still read expired_token rather than invalid_grant. */
const EXPIRED_GRACE_MS = 600_000;
const PKCE_VERIFIER_RE = /^[A-Za-z0-9._~-]{43,128}$/;
const CHALLENGE_RE = /^[A-Za-z0-9_-]{43}$/;

/**
 * The redirect target when `raw` is allowed: a scheme from CONNECT_REDIRECT_SCHEMES with a host,
 * or http on 127.0.0.1 / localhost with an explicit port. No user info, no fragment, no spaces
 * or control characters (browsers strip some of them, so what was checked would not be followed).
 */
export function connectRedirect(raw: string, schemes: readonly string[]): RedirectTarget | null {
  // Printable ASCII except backslash (read as "/" by browsers) and space.
  if (raw.length > 1024 || !/^[\x21-\x5b\x5d-\x7e]+$/.test(raw)) return null;
  const url = URL.parse(raw);
  if (!url || url.username || url.password || url.hash || raw.includes("#")) return null;
  const scheme = url.protocol.slice(0, -1);
  if (scheme === "http") {
    if (url.hostname !== "127.0.0.1" && url.hostname !== "localhost") return null;
    // An explicit port: a loopback listener always has one, and port 80 belongs to whatever
    // server runs there (URL drops ":80", so it is refused too).
    if (url.port === "") return null;
    return { url, label: url.origin, cspSource: url.origin };
  }
  if (!schemes.includes(scheme) || url.host === "") return null;
  return { url, label: `${scheme}://${url.host}`, cspSource: `${scheme}:` };
}

/** `redirect_uri` with the answer's parameters added (its own query is kept). */
export function redirectWith(target: RedirectTarget, params: Record<string, string | undefined>) {
  const url = new URL(target.url.href);
  for (const [name, value] of Object.entries(params)) {
    if (value !== undefined) url.searchParams.set(name, value);
  }
  return url.href;
}

/** The S256 code challenge of a PKCE verifier (RFC 7636 §4.2). */
export const s256 = sha256Base64url;

/** Upper-case, without dashes or spaces: "bcdf-ghjk" and "BCDFGHJK" are one code. */
export function normalizeUserCode(input: string): string {
  return input.toUpperCase().replace(/[\s-]/g, "");
}

export const formatUserCode = (code: string) => `${code.slice(0, 4)}-${code.slice(4)}`;

function randomUserCode(): string {
  let out = "";
  while (out.length < 8) {
    for (const byte of crypto.getRandomValues(new Uint8Array(16))) {
      // 240 = 12 × 20: bytes above it would favour the first letters.
      if (byte < 240 && out.length < 8) out += USER_CODE_ALPHABET[byte % 20];
    }
  }
  return out;
}

const invalidGrant = () =>
  new AppError("invalid_grant", "The code is invalid, expired or already used.");

export class ConnectFlows {
  readonly codeTtlMs: number;
  readonly deviceTtlMs: number;
  readonly pollIntervalS: number;
  readonly missLimit: number;
  readonly missWindowMs: number;
  readonly deviceStartsPerMinute: number;
  readonly deviceStartsPerAddress: number;
  private readonly now: Clock;

  constructor(private readonly kv: Deno.Kv, options: ConnectOptions = {}) {
    this.codeTtlMs = options.codeTtlMs ?? 60_000;
    this.deviceTtlMs = options.deviceTtlMs ?? 600_000;
    this.pollIntervalS = options.pollIntervalS ?? 5;
    this.missLimit = options.missLimit ?? 5;
    this.missWindowMs = options.missWindowMs ?? 900_000;
    this.deviceStartsPerMinute = options.deviceStartsPerMinute ?? 600;
    this.deviceStartsPerAddress = options.deviceStartsPerAddress ?? 20;
    this.now = options.now ?? systemClock;
  }

  // ---- PKCE ----

  /** A single-use code for `userId`, bound to the PKCE challenge. */
  async issueCode(grant: Grant, challenge: string, client: string): Promise<string> {
    if (!CHALLENGE_RE.test(challenge)) throw new Error("issueCode: not an S256 challenge");
    const code = randomToken(32);
    const key = keys.connectCode(await sha256Base64url(code));
    const record: CodeRecord = {
      userId: grant.userId,
      keyId: grant.keyId,
      challenge,
      client,
      expiresAt: this.now() + this.codeTtlMs,
    };
    const res = await this.kv.atomic()
      .check({ key, versionstamp: null })
      .set(key, record, { expireIn: this.codeTtlMs })
      .commit();
    if (!res.ok) throw new Error("issueCode: a random code collided");
    return code;
  }

  /**
   * Takes a code (atomic check + delete: concurrent exchanges race to exactly one winner) and
   * returns its grant. The code is spent by any attempt, a wrong verifier included, so a
   * verifier cannot be guessed against one code.
   */
  async redeemCode(code: string, verifier: string): Promise<Grant> {
    if (code.length > 100) throw invalidGrant();
    const key = keys.connectCode(await sha256Base64url(code));
    const entry = await this.kv.get<CodeRecord>(key);
    if (!entry.value) throw invalidGrant();
    const res = await this.kv.atomic().check(entry).delete(key).commit();
    if (!res.ok) throw invalidGrant(); // only deletion ever changes it: another exchange won
    const record = entry.value;
    // expireIn removes an entry some time after it expires, not at once.
    if (this.now() >= record.expiresAt) throw invalidGrant();
    if (!PKCE_VERIFIER_RE.test(verifier) || await s256(verifier) !== record.challenge) {
      throw invalidGrant();
    }
    return { userId: record.userId, keyId: record.keyId ?? null };
  }

  // ---- Device code (RFC 8628) ----

  /**
   * Starts a device authorization for `client` from `address` (the caller's IP, null when
   * unknown). Starting needs no sign-in, and each start stores two records for 20 minutes: a cap
   * per address, well under the instance-wide cap, keeps one address from filling KV or locking
   * everyone else out; both counts are checked and written in one commit.
   */
  async startDevice(
    client: string,
    address: string | null = null,
    /** What the address's starts are counted under (an IPv6 /64); the address itself by default. */
    bucket: string | null = address,
  ): Promise<DeviceStart> {
    await retryAtomic(async () => {
      const minute = Math.floor(this.now() / 60_000);
      const wait = Math.max(1, Math.ceil(((minute + 1) * 60_000 - this.now()) / 1000));
      const fromKey = keys.deviceStartsFrom(bucket ?? "unknown", minute);
      const [entry, from] = await this.kv.getMany<[number, number]>([
        keys.deviceStarts(minute),
        fromKey,
      ]);
      const count = entry.value ?? 0;
      const fromCount = from.value ?? 0;
      if (bucket !== null && fromCount >= this.deviceStartsPerAddress) {
        throw new AppError(
          "rate_limit_exceeded",
          `Too many device authorizations started from your address this minute ` +
            `(${this.deviceStartsPerAddress} a minute); retry in ${wait}s.`,
          { "retry-after": String(wait) },
        );
      }
      if (count >= this.deviceStartsPerMinute) {
        throw new AppError(
          "rate_limit_exceeded",
          `Too many device authorizations started this minute; retry in ${wait}s.`,
          { "retry-after": String(wait) },
        );
      }
      const op = this.kv.atomic().check(entry)
        .set(keys.deviceStarts(minute), count + 1, { expireIn: 120_000 });
      if (bucket !== null) {
        op.check(from).set(fromKey, fromCount + 1, { expireIn: 120_000 });
      }
      const res = await op.commit();
      return res.ok ? true : CONFLICT;
    }, "device start count");
    const deviceCode = randomToken(32);
    const deviceHash = await sha256Base64url(deviceCode);
    const expireIn = this.deviceTtlMs + EXPIRED_GRACE_MS;
    for (let attempt = 0; attempt < 10; attempt++) {
      const userCode = randomUserCode();
      const record: DeviceRecord = {
        userCode,
        client,
        expiresAt: this.now() + this.deviceTtlMs,
        interval: this.pollIntervalS,
        lastPollAt: null,
        status: "pending",
        userId: null,
        startedAt: this.now(),
        address,
      };
      // The user code must be unique among live ones: a collision would approve someone else.
      const res = await this.kv.atomic()
        .check({ key: keys.deviceUserCode(userCode), versionstamp: null })
        .check({ key: keys.deviceCode(deviceHash), versionstamp: null })
        .set(keys.deviceUserCode(userCode), deviceHash, { expireIn })
        .set(keys.deviceCode(deviceHash), record, { expireIn })
        .commit();
      if (res.ok) {
        return {
          deviceCode,
          userCode: formatUserCode(userCode),
          expiresIn: Math.round(this.deviceTtlMs / 1000),
          interval: this.pollIntervalS,
        };
      }
    }
    throw new Error("startDevice: no free user code after 10 attempts");
  }

  /**
   * Looks up a user code a signed-in user typed. Wrong codes count against the user: after
   * `missLimit` in one window, 429 rate_limit_exceeded until the window ends. The count is read
   * and written in the same atomic commit as the look-up's verdict, so concurrent guesses
   * cannot get past the limit. Null when the code is unknown, used or expired.
   */
  async findDevice(userId: string, input: string): Promise<DeviceRequest | null> {
    const userCode = normalizeUserCode(input);
    return await retryAtomic<DeviceRequest | null>(async () => {
      const now = this.now();
      const window = Math.floor(now / this.missWindowMs);
      const missKey = keys.deviceCodeMisses(userId, window);
      const misses = await this.kv.get<number>(missKey);
      if ((misses.value ?? 0) >= this.missLimit) {
        const retryAfter = Math.ceil(((window + 1) * this.missWindowMs - now) / 1000);
        throw new AppError(
          "rate_limit_exceeded",
          `Too many wrong codes. Try again in ${Math.ceil(retryAfter / 60)} min.`,
          { "retry-after": String(retryAfter) },
        );
      }
      const found = USER_CODE_RE.test(userCode) ? await this.readDevice(userCode) : null;
      const live = found && now < found.entry.value.expiresAt ? found : null;
      const op = this.kv.atomic().check(misses);
      if (!live) {
        op.set(missKey, (misses.value ?? 0) + 1, { expireIn: this.missWindowMs * 2 });
      }
      if (!(await op.commit()).ok) return CONFLICT;
      if (!live) return null;
      const { userCode: code, client, status, startedAt, address } = live.entry.value;
      return {
        userCode: formatUserCode(code),
        client,
        status,
        startedAt: startedAt ?? null,
        address: address ?? null,
      };
    }, "device code look-up");
  }

  /**
   * Approves (with the key the approval created) or denies a pending device authorization; false
   * when it is gone or decided.
   */
  async decideDevice(input: string, decision: Grant | "deny"): Promise<boolean> {
    const approve = decision !== "deny";
    const userCode = normalizeUserCode(input);
    if (!USER_CODE_RE.test(userCode)) return false;
    return await retryAtomic(async () => {
      const found = await this.readDevice(userCode);
      if (!found) return false;
      const record = found.entry.value;
      if (record.status !== "pending" || this.now() >= record.expiresAt) return false;
      const next: DeviceRecord = {
        ...record,
        status: approve ? "approved" : "denied",
        userId: approve ? decision.userId : null,
        keyId: approve ? decision.keyId : null,
      };
      const res = await this.kv.atomic().check(found.entry)
        .set(found.key, next, { expireIn: this.remaining(record) })
        .commit();
      return res.ok ? true : CONFLICT;
    }, "device decision");
  }

  /**
   * One poll of the token endpoint: the grant once approved (the authorization is then gone),
   * or the RFC 8628 error the client must act on. Every poll records its time in KV, so
   * `slow_down` holds across processes; each one adds 5 s to the interval.
   */
  async pollDevice(deviceCode: string): Promise<Grant> {
    if (deviceCode.length > 100) throw invalidGrant();
    const key = keys.deviceCode(await sha256Base64url(deviceCode));
    const outcome = await retryAtomic<
      { grant: Grant } | { error: "slow_down" | "pending" | "denied" | "expired" }
    >(async () => {
      const entry = await this.kv.get<DeviceRecord>(key);
      const record = entry.value;
      if (!record) throw invalidGrant();
      const now = this.now();
      if (now >= record.expiresAt) return { error: "expired" };
      const tooFast = record.lastPollAt !== null &&
        now - record.lastPollAt < record.interval * 1000;
      if (record.status === "approved" && !tooFast) {
        const res = await this.kv.atomic().check(entry)
          .delete(key)
          .delete(keys.deviceUserCode(record.userCode))
          .commit();
        const grant = { userId: record.userId!, keyId: record.keyId ?? null };
        return res.ok ? { grant } : CONFLICT;
      }
      const next: DeviceRecord = {
        ...record,
        lastPollAt: now,
        interval: tooFast ? record.interval + 5 : record.interval,
      };
      const res = await this.kv.atomic().check(entry)
        .set(key, next, { expireIn: this.remaining(record) })
        .commit();
      if (!res.ok) return CONFLICT;
      if (tooFast) return { error: "slow_down" };
      return { error: record.status === "denied" ? "denied" : "pending" };
    }, "device poll");
    if ("grant" in outcome) return outcome.grant;
    switch (outcome.error) {
      case "expired":
        throw new AppError("expired_token", "The device code expired. Start again.");
      case "denied":
        throw new AppError("access_denied", "The user denied the request.");
      case "slow_down":
        throw new AppError("slow_down", "Polling too fast: wait 5 s longer between polls.");
      default:
        throw new AppError("authorization_pending", "Waiting for the user to approve.");
    }
  }

  private async readDevice(userCode: string) {
    const index = await this.kv.get<string>(keys.deviceUserCode(userCode));
    if (!index.value) return null;
    const key = keys.deviceCode(index.value);
    const entry = await this.kv.get<DeviceRecord>(key);
    return entry.value ? { key, entry: entry as Deno.KvEntry<DeviceRecord> } : null;
  }

  private remaining(record: DeviceRecord) {
    return Math.max(1, record.expiresAt - this.now()) + EXPIRED_GRACE_MS;
  }
}
