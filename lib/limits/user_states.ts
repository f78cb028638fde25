/**
 * What one process knows of the users it admits: their entries as it last read or wrote them
 * (user record, rate entry, refunds, held sums), under the cache epoch they were valid under, so
 * a user busy with one process is admitted without a read per request; which users conflicted
 * lately (another process is busy with them); which users have a quota (their counters are read
 * up front). A decision on remembered entries is only written if the commit's checks prove them
 * current, and a refusal decided on them is decided again on a fresh read (admission.ts).
 */
import type { Config } from "../core/config.ts";
import { keys, u64 } from "../core/kv.ts";
import { BoundedMap, getManyChunked, KV_GET_MANY_MAX } from "../core/kv_ops.ts";
import type { UserRecord } from "../identity/users.ts";
import type { RateState } from "./gcra.ts";
import { type Held, HELD_FIELDS, heldSum, usedKeys } from "./lease_record.ts";
import { effectiveLimits, hasQuota } from "./policy.ts";

/** Users whose entries, conflicts and quota hints this process remembers (LRU). */
const REMEMBERED_USERS = 100_000;
/** After a conflict on a user, how long this process does not start calls before commits land. */
const CONTENDED_MS = 5_000;

/** Users' entries as this process last read or wrote them. */
export interface Known {
  /**
   * The cache epoch's versionstamp the user record was valid under. Every disable, limit change
   * and rotation moves the epoch: a record known under another epoch is read again.
   */
  epoch: string | null;
  userEntry: Deno.KvEntryMaybe<UserRecord>;
  rateEntry: Deno.KvEntryMaybe<RateState>;
  /** The user's refund counter as last read. */
  refunds: number;
  /** Held sums as of that read, plus this process's changes since. */
  held: Held;
}

export interface Snapshot extends Known {
  /** Charged this day and month (read for users with a quota). */
  used: { tokens: number; nano: number } | null;
  /** Decided on what this process remembers (not read in this attempt). */
  remembered: boolean;
}

export class UserStates {
  private readonly known = new BoundedMap<string, Known>(REMEMBERED_USERS);
  /** Users whose commits conflicted lately (another process is busy with them): no speculation. */
  private readonly contended = new BoundedMap<string, number>(REMEMBERED_USERS);
  /** Users seen with a quota, whose counters are read up front (a hint; never decides). */
  private readonly quotaUsers = new BoundedMap<string, true>(REMEMBERED_USERS);
  private readonly defaultQuota: boolean;
  /** The cache epoch entry as last read (its versionstamp proves user records unchanged). */
  private epochSeen: Deno.KvEntryMaybe<unknown> | null = null;

  constructor(private readonly kv: Deno.Kv, private readonly config: Config) {
    this.defaultQuota = hasQuota(effectiveLimits(config, { limits: {} }));
  }

  /** Whether another process has been busy with the user lately (its commits conflicted). */
  contendedAt(userId: string, now: number): boolean {
    return (this.contended.get(userId) ?? 0) >= now;
  }

  /** Forgets the users' entries (their commit threw). */
  forget(userIds: string[]) {
    for (const id of userIds) this.known.delete(id);
  }

  /** Their commit conflicted: read everything again, and no speculation for a while. */
  conflicted(userIds: string[], now: number) {
    for (const id of userIds) {
      this.known.delete(id);
      this.contended.set(id, now + CONTENDED_MS);
    }
    this.epochSeen = null;
  }

  /**
   * What this process knows after its commit: the rate entries it wrote, the user records and
   * held sums it read, updated with its own changes (a refusal decided on them is re-read).
   */
  remember(
    rates: Map<string, RateState>,
    held: Map<string, Held>,
    refunds: Map<string, number>,
    snaps: Map<string, Snapshot>,
    versionstamp: string,
    epoch: string | null,
  ) {
    for (const [userId, snap] of snaps) {
      const next = rates.get(userId);
      this.known.set(userId, {
        epoch,
        userEntry: snap.userEntry,
        rateEntry: next ? { key: keys.rate(userId), value: next, versionstamp } : snap.rateEntry,
        refunds: snap.refunds,
        held: snap.held,
      });
    }
    for (const [userId, d] of held) {
      const k = snaps.has(userId) ? undefined : this.known.get(userId);
      if (k) { for (const f of HELD_FIELDS) k.held[f] += d[f]; }
    }
    // Requests given back here are known at once (other processes see them on their next read).
    for (const [userId, n] of refunds) {
      const k = this.known.get(userId);
      if (k) k.refunds += n;
    }
  }

  /** Reads what the admissions of a batch need that this process does not remember. */
  async snapshots(
    admitting: string[],
    now: number,
    fresh: Set<string>,
  ): Promise<{ snaps: Map<string, Snapshot>; epoch: Deno.KvEntryMaybe<unknown> | null }> {
    const snaps = new Map<string, Snapshot>();
    if (!admitting.length) return { snaps, epoch: null };
    const groups: Deno.KvKey[][] = [];
    const reads: Array<{ id: string; k: Known | undefined; entries: boolean; used: boolean }> = [];
    for (const id of admitting) {
      // Remembered entries count only under the epoch they were known under (a disable or limit
      // change since then moved it), and that epoch is checked again: read with the counters, or
      // by the commit.
      const seen = this.epochSeen;
      const known = fresh.has(id) || !seen ? undefined : this.known.get(id);
      const k = known?.epoch === seen?.versionstamp ? known : undefined;
      const r = { id, k, entries: !k, used: this.defaultQuota || this.quotaUsers.has(id) };
      const group: Deno.KvKey[] = [];
      if (r.entries) {
        group.push(
          keys.user(id),
          keys.rate(id),
          keys.rateRefunds(id),
          ...HELD_FIELDS.map((f) => keys.leaseHeld(id, f)),
        );
      }
      if (r.used) group.push(...usedKeys(id, now));
      if (group.length) groups.push(group);
      reads.push(r);
    }
    let epoch = this.epochSeen;
    let entries: Deno.KvEntryMaybe<unknown>[] = [];
    if (groups.length) {
      const got = await readGroups(this.kv, groups);
      entries = got.entries;
      // Every group was read with the epoch: they agree unless a change landed in between.
      if (!got.consistent || (epoch && epoch.versionstamp !== got.epoch.versionstamp)) {
        for (const id of admitting) fresh.add(id);
        this.epochSeen = null;
        return await this.snapshots(admitting, now, fresh);
      }
      epoch = got.epoch;
    }
    this.epochSeen = epoch;
    const missing: string[] = [];
    let i = 0;
    for (const r of reads) {
      const k = r.k;
      let snap: Snapshot;
      if (r.entries) {
        const userEntry = entries[i++] as Deno.KvEntryMaybe<UserRecord>;
        const rateEntry = entries[i++] as Deno.KvEntryMaybe<RateState>;
        const refunds = u64(entries[i++].value);
        const held = {
          count: heldSum(entries[i++].value),
          tokens: heldSum(entries[i++].value),
          nano: heldSum(entries[i++].value),
        };
        const under = epoch?.versionstamp ?? null;
        snap = { epoch: under, userEntry, rateEntry, refunds, held, used: null, remembered: false };
      } else snap = { ...k!, held: { ...k!.held }, used: null, remembered: true };
      if (r.used) snap.used = { tokens: u64(entries[i++].value), nano: u64(entries[i++].value) };
      else if (hasQuota(effectiveLimits(this.config, snap.userEntry.value ?? { limits: {} }))) {
        missing.push(r.id);
      }
      snaps.set(r.id, snap);
    }
    if (missing.length) {
      // The quota hint missed these users: read their counters too (a second round trip; safe,
      // the counters only matter as a bound, see the top of the file).
      const more = await getManyChunked(this.kv, missing.flatMap((id) => usedKeys(id, now)));
      missing.forEach((id, n) => {
        snaps.get(id)!.used = { tokens: u64(more[2 * n].value), nano: u64(more[2 * n + 1].value) };
        this.quotaUsers.set(id, true);
      });
    }
    return { snaps, epoch };
  }
}

/**
 * Reads groups of keys in as few getMany calls as KV allows (10 keys each, all in parallel),
 * never splitting a group, each call also reading the cache epoch: the calls saw one state of
 * the user records when their epochs agree.
 */
async function readGroups(
  kv: Deno.Kv,
  groups: Deno.KvKey[][],
): Promise<
  { entries: Deno.KvEntryMaybe<unknown>[]; epoch: Deno.KvEntryMaybe<unknown>; consistent: boolean }
> {
  const calls: Deno.KvKey[][] = [];
  let call: Deno.KvKey[] = [keys.cacheEpoch()];
  for (const group of groups) {
    if (call.length + group.length > KV_GET_MANY_MAX) {
      calls.push(call);
      call = [keys.cacheEpoch()];
    }
    call.push(...group);
  }
  calls.push(call);
  const results = await Promise.all(calls.map((c) => kv.getMany(c)));
  const epoch = results[0][0];
  return {
    entries: results.flatMap((r) => r.slice(1)),
    epoch,
    consistent: results.every((r) => r[0].versionstamp === epoch.versionstamp),
  };
}
