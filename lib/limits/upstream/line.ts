/**
 * The line of requests waiting for a model's upstream slots, as every process sees it: KV tickets
 * (`keys.upstreamTicket(model, ticket)`, ids sorting by arrival), each with a round — right after
 * its user's own waiting tickets, never before the lowest round waiting — served by round, then
 * arrival: a user's second waiting request after every other user's first.
 */
import { commitOrConflict, keys } from "../../core/kv.ts";
import { KV_MAX_CHECKS } from "../../core/kv_ops.ts";

/** A ticket this long past its deadline belongs to an owner that died: swept. */
const STALE_AFTER_MS = 5_000;

/** A waiting request as every process sees it. */
export interface Ticket {
  deadline: number;
  user: string;
  round: number;
  /** Counted in `upstreamQueueCount("in")`: its removal counts "out". */
  counted?: true;
}

/** A live ticket as read. */
export interface InLine {
  ticket: string;
  user: string;
  round: number;
}

/** One place in line: a ticket in KV, or (first try, no ticket yet) a waiter of this process. */
export interface Place<W = unknown> {
  user: string;
  round: number;
  own?: W;
}

/**
 * The rounds of a line (its places in arrival order), and the round each user's next place
 * takes: one after the user's own last waiting place, never below the lowest round waiting (the
 * round being served); a user with none waiting joins that round.
 */
export class Rounds {
  private readonly floor: number;
  private readonly last = new Map<string, number>();

  constructor(line: ReadonlyArray<{ user: string; round: number }>) {
    let floor = Infinity;
    for (const { user, round } of line) {
      floor = Math.min(floor, round);
      this.last.set(user, Math.max(this.last.get(user) ?? -Infinity, round));
    }
    this.floor = floor === Infinity ? 0 : floor;
  }

  /** The round of the user's next place (counted: the one after is one more). */
  next(user: string): number {
    const last = this.last.get(user);
    const round = last === undefined ? this.floor : Math.max(this.floor, last + 1);
    this.last.set(user, round);
    return round;
  }
}

/** The order a line (in arrival order) is served in: by round, arrival order within one. */
export function serveOrder<T extends { round: number }>(line: readonly T[]): T[] {
  return line.map((place, i) => ({ place, i }))
    .sort((a, b) => a.place.round - b.place.round || a.i - b.i)
    .map((x) => x.place);
}

/**
 * Deletes tickets of owners that died (past their deadline by STALE_AFTER_MS), counting out the
 * ones that were counted in, each in a commit that checks it. Resolves to how many were deleted.
 */
export async function sweepDeadTickets(kv: Deno.Kv, now: number): Promise<number> {
  const stale: Deno.KvEntry<Partial<Ticket>>[] = [];
  for await (const e of kv.list<Partial<Ticket>>({ prefix: keys.upstreamQueue() })) {
    if (!((e.value?.deadline ?? 0) + STALE_AFTER_MS > now)) stale.push(e);
  }
  let deleted = 0;
  for (let i = 0; i < stale.length; i += KV_MAX_CHECKS) {
    const part = stale.slice(i, i + KV_MAX_CHECKS);
    const op = kv.atomic();
    let counted = 0;
    for (const e of part) {
      op.check(e).delete(e.key);
      if (e.value?.counted) counted++;
    }
    if (counted) op.sum(keys.upstreamQueueCount("out"), BigInt(counted));
    const res = await commitOrConflict(op).catch(() => ({ ok: false }));
    if (res.ok) deleted += part.length;
  }
  return deleted;
}

/** The live tickets of a model's line, in arrival order. */
export async function readLine(
  kv: Deno.Kv,
  model: string,
  now: number,
  queueMs: number,
): Promise<InLine[]> {
  // Tickets of requests that arrived more than UPSTREAM_QUEUE_MS ago are past their deadline
  // (their owner gave up or died): the line starts after them.
  const oldest = String(Math.max(0, now - queueMs + 1)).padStart(15, "0");
  const line: InLine[] = [];
  for await (
    const e of kv.list<Partial<Ticket>>({
      prefix: keys.upstreamTickets(model),
      start: keys.upstreamTicket(model, oldest),
    })
  ) {
    const t = e.value;
    if (t && typeof t.user === "string" && (t.deadline ?? 0) > now) {
      line.push({ ticket: String(e.key[2]), user: t.user, round: t.round ?? 0 });
    }
  }
  return line;
}
