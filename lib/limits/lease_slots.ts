/**
 * How an upstream slot (lib/limits/upstream/slots.ts) attaches to a lease: written into the
 * lease's own entry in the commit that takes the slot, so the lease's settlement — or the reaper,
 * when its process died — gives the slot back. The Ledger's leases are written here and in
 * admission.ts only.
 */
import { commitOrConflict, keys } from "../core/kv.ts";
import type { HeldLease, Lease } from "./lease.ts";
import { type LeaseRecord, signed, slotCounters } from "./lease_record.ts";
import type { Liveness } from "./liveness.ts";

export class LeaseSlots {
  constructor(
    private readonly kv: Deno.Kv,
    private readonly liveness: Liveness,
    /** The live lease behind a Lease (throws for one that is not this process's). */
    private readonly held: (lease: Lease) => HeldLease,
  ) {}

  /** The check a commit that attaches slots makes, or null while no heartbeat is current. */
  check(): Deno.AtomicCheck | null {
    return this.liveness.currentCheck();
  }

  /**
   * Adds to `op` the lease's entry recording its upstream slot on pool key `keyId` (the commit
   * takes the slot).
   */
  attach(op: Deno.AtomicOperation, lease: Lease, slot: string, keyId?: string): void {
    const held = this.held(lease);
    op.set(keys.lease(this.liveness.procId, held.id), { ...held.record, slot, slotKey: keyId });
  }

  /** The commit of attach() landed: the lease holds its slot (its settlement frees it). */
  attached(lease: Lease, slot: string, keyId?: string): void {
    const record = this.held(lease).record;
    record.slot = slot;
    record.slotKey = keyId;
  }

  /** The commit of attach() threw and could not be read back: its settlement reads first. */
  unsure(lease: Lease): void {
    this.held(lease).uncertain = true;
  }

  /**
   * Gives the lease's slot back now, the lease going on without one (its pool key was refused;
   * it waits for a slot on another): one commit, checked on the lease's entry.
   */
  async detach(lease: Lease): Promise<void> {
    const held = this.held(lease);
    const { slot, slotKey } = held.record;
    if (!slot) return;
    const key = keys.lease(this.liveness.procId, held.id);
    const entry = await this.kv.get<LeaseRecord>(key);
    if (!entry.value || entry.value.slot !== slot) return; // reaped, or never written
    const record = { ...held.record, slot: undefined, slotKey: undefined };
    const op = this.kv.atomic().check(entry).set(key, record);
    for (const k of slotCounters(slot, held.user.id, slotKey)) op.sum(k, signed(-1));
    const res = await commitOrConflict(op);
    if (!res.ok) throw new Error("ledger: the lease's slot changed while it was given back");
    held.record.slot = undefined;
    held.record.slotKey = undefined;
  }

  /** The upstream slot the lease's entry in KV records, and its versionstamp (read back). */
  async inKv(
    lease: Lease,
  ): Promise<{ slot: string | null; keyId: string | null; versionstamp: string | null }> {
    const entry = await this.kv.get<LeaseRecord>(keys.lease(this.liveness.procId, lease.id));
    return {
      slot: entry.value?.slot ?? null,
      keyId: entry.value?.slotKey ?? null,
      versionstamp: entry.versionstamp,
    };
  }
}
