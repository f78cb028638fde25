/**
 * An upstream slot held by a call that has no lease (count_tokens, which counts against no other
 * limit): its own small record in KV, `keys.upstreamHold(model, id)` = `{userId, exp}`, written
 * in the commit that takes the slot (lib/limits/upstream/slots.ts). Its process renews `exp`
 * while the call lasts; a record whose `exp` passed belongs to a process that died or stalled,
 * and is swept (sweepHolds) with the slot counts it held — each record is deleted by exactly one
 * commit that checks it, so a slot is never given back twice.
 */
import { systemClock } from "../../core/clock.ts";
import { commitOrConflict, keys } from "../../core/kv.ts";
import type { Logger } from "../../core/log.ts";
import { signed, slotCounters } from "../lease_record.ts";
import type { PoolKey } from "./pool.ts";
import { KV_MAX_CHECKS } from "../../core/kv_ops.ts";

/** A hold not renewed for this long is taken for dead. */
export const HOLD_TTL_MS = 30_000;
const RENEW_MS = 10_000;
const RELEASE_ATTEMPTS = 8;

export interface HoldRecord {
  userId: string;
  exp: number;
  /** The pool key (its id) the slot is on. */
  keyId?: string;
}

export class SlotHold {
  readonly id = crypto.randomUUID();
  /** The versionstamp of its record as last written (null: not held, or swept). */
  private stamp: string | null = null;
  /** The commit that took it threw and could not be read back: release() reads first. */
  unsure = false;
  private released: Promise<void> | null = null;
  private timer: ReturnType<typeof setInterval> | undefined;

  constructor(
    private readonly kv: Deno.Kv,
    readonly model: string,
    readonly userId: string,
    private readonly log?: Logger,
  ) {}

  get key(): Deno.KvKey {
    return keys.upstreamHold(this.model, this.id);
  }

  /** The pool key the slot is on, once taken. */
  poolKey: PoolKey | null = null;
  private keyId: string | undefined;

  /** Its record, as the commit that takes the slot writes it. */
  record(now: number, keyId = this.keyId): HoldRecord {
    return { userId: this.userId, exp: now + HOLD_TTL_MS, keyId };
  }

  /** The commit that took the slot (on `key`) landed at `versionstamp`: renewed until released. */
  attached(versionstamp: string, key: PoolKey) {
    this.stamp = versionstamp;
    this.poolKey = key;
    this.keyId = key.id;
    this.timer = setInterval(() => this.renew(), RENEW_MS);
    Deno.unrefTimer(this.timer);
  }

  private async renew() {
    const stamp = this.stamp;
    if (!stamp) return;
    try {
      const res = await commitOrConflict(
        this.kv.atomic().check({ key: this.key, versionstamp: stamp })
          .set(this.key, this.record(systemClock())),
      );
      if (res.ok && this.stamp === stamp) this.stamp = res.versionstamp;
      else if (!res.ok && this.stamp === stamp) {
        // Swept: this process was taken for dead (stalled past HOLD_TTL_MS). Nothing to free.
        this.stamp = null;
        clearInterval(this.timer);
      }
    } catch {
      // KV unreachable: the next renewal tries again (HOLD_TTL_MS leaves room for two).
    }
  }

  /** Gives the slot back (once; later calls get the first call's promise). */
  release(): Promise<void> {
    return this.released ??= this.free();
  }

  private async free() {
    clearInterval(this.timer);
    for (let attempt = 1; attempt <= RELEASE_ATTEMPTS; attempt++) {
      try {
        if (this.unsure || attempt > 1) {
          this.stamp = (await this.kv.get(this.key)).versionstamp;
          this.unsure = false;
        }
        const stamp = this.stamp;
        if (!stamp) return; // never taken, or swept (its counts with it)
        const op = this.kv.atomic().check({ key: this.key, versionstamp: stamp }).delete(this.key);
        for (const k of slotCounters(this.model, this.userId, this.keyId)) op.sum(k, signed(-1));
        const res = await commitOrConflict(op);
        if (res.ok) {
          this.stamp = null;
          return;
        }
        // A renewal moved it meanwhile, or a sweep took it: read it again.
      } catch (err) {
        if (attempt === RELEASE_ATTEMPTS) {
          // Its record stays: once it is not renewed any more, a sweep frees the slot.
          this.log?.warn("upstream hold not released; swept once it expires", {
            model: this.model,
            error: String(err),
          });
          return;
        }
        await new Promise((r) => setTimeout(r, 250 * attempt));
      }
    }
  }
}

/**
 * Frees the slots of a model's holds that were not renewed in time (their process died), each in
 * a commit that checks its record. Resolves to how many were freed.
 */
export async function sweepHolds(kv: Deno.Kv, model: string, now: number): Promise<number> {
  const expired: Deno.KvEntry<HoldRecord>[] = [];
  for await (const e of kv.list<HoldRecord>({ prefix: keys.upstreamHolds(model) })) {
    if (!(e.value?.exp > now)) expired.push(e);
  }
  let freed = 0;
  for (let i = 0; i < expired.length; i += KV_MAX_CHECKS) {
    const part = expired.slice(i, i + KV_MAX_CHECKS);
    const op = kv.atomic();
    const counts = new Map<string, { key: Deno.KvKey; n: number }>();
    for (const e of part) {
      op.check(e).delete(e.key);
      const user = String(e.value?.userId ?? "");
      for (const key of slotCounters(model, user, e.value?.keyId)) {
        const id = JSON.stringify(key);
        counts.set(id, { key, n: (counts.get(id)?.n ?? 0) + 1 });
      }
    }
    for (const { key, n } of counts.values()) op.sum(key, signed(-n));
    const res = await commitOrConflict(op).catch(() => ({ ok: false }));
    if (res.ok) freed += part.length;
  }
  return freed;
}
