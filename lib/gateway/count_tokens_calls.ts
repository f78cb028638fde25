/**
 * POST /v1/messages/count_tokens: counted against no limit but its own (COUNT_TOKENS_RPM a
 * minute, 2 in flight per user: lib/limits/count_tokens.ts), metered never, but sent to GLM with
 * the operator's key like any call — so it takes an upstream slot when its model has a cap.
 */
import type { UserRecord } from "../identity/users.ts";
import type { Charge } from "../limits/admission.ts";
import type { CountTokensLimiter } from "../limits/count_tokens.ts";
import type { PoolKey } from "../limits/upstream/pool.ts";
import { ClientLeft, type SlotHold, type UpstreamSlots } from "../limits/upstream/slots.ts";
import type { Settlement } from "./exits.ts";
import { type Call, slotRefusal, type UpstreamCalls } from "./upstream_calls.ts";

/**
 * count_tokens: relayed with the rate headers as they stand; nothing counted. Settling ends its
 * own limits' flight and frees its upstream slot.
 */
class Unmetered implements Settlement {
  private settled: Promise<Charge> | null = null;
  constructor(
    readonly user: UserRecord,
    readonly model: string,
    readonly headers: Record<string, string>,
    private readonly release: () => Promise<unknown>,
  ) {}
  settle(): Promise<Charge> {
    return this.settled ??= this.release().then(() => ({
      promptTokens: 0,
      completionTokens: 0,
      estimated: false,
    }));
  }
  relayed(): void {}
  giveBack(): void {}
}

export class CountTokensCalls {
  constructor(
    private readonly limiter: CountTokensLimiter,
    private readonly slots: UpstreamSlots,
    private readonly upstream: UpstreamCalls,
  ) {}

  /**
   * count_tokens: its own limits (COUNT_TOKENS_RPM, 2 in flight; 429), then an upstream slot
   * when the model has a cap — it reaches GLM with the operator's key like any call.
   */
  async serve(
    call: Call,
    user: UserRecord,
    headers: Record<string, string>,
    capped: boolean,
  ): Promise<Response> {
    const flight = await this.limiter.take(user.id, headers);
    const signal = call.req.signal;
    let hold: SlotHold | undefined;
    const take = async () => {
      hold = await this.slots.acquireHold(user.id, call.model, signal);
      if (signal.aborted) throw new ClientLeft();
      return hold.poolKey!;
    };
    let key: PoolKey | null;
    try {
      key = capped ? await take() : await this.slots.pool.pick();
    } catch (err) {
      await Promise.all([flight.release(), hold?.release()]);
      throw slotRefusal(err, headers);
    }
    const settlement = new Unmetered(
      user,
      call.model,
      headers,
      () => Promise.all([flight.release(), hold?.release()]),
    );
    if (!key) throw await this.upstream.noKeyInService(call, settlement);
    const again = async () => {
      if (!(await this.slots.pool.inService()).length) return null;
      if (!capped) return this.upstream.send(call, (await this.slots.pool.pick())!);
      await hold?.release();
      return this.upstream.send(call, await take());
    };
    return await this.upstream.forward(this.upstream.send(call, key), settlement, call, again);
  }
}
