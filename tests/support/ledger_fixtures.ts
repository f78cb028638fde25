/** Users, admissions and limits for the tests that drive the Ledger and the GCRA directly. */
import { AppError } from "../../lib/core/errors.ts";
import { keys } from "../../lib/core/kv.ts";
import type { AdmitRequest } from "../../lib/limits/admission.ts";
import type { EffectiveLimits } from "../../lib/limits/policy.ts";
import type { UserRecord } from "../../lib/identity/users.ts";

export const limits = (rpm: number, rpd = 1000): EffectiveLimits => ({
  rpm,
  rpd,
  tokensPerDay: null,
  budgetUsdMonthly: null,
});
export const NOON = Date.UTC(2026, 10, 25, 12, 0, 0);

export async function seedUser(kv: Deno.Kv, id: string, overrides: UserRecord["limits"] = {}) {
  const user: UserRecord = {
    id,
    email: null,
    firstName: null,
    lastName: null,
    status: "active",
    createdAt: new Date(NOON).toISOString(),
    updatedAt: new Date(NOON).toISOString(),
    key: null,
    limits: overrides,
    profileKnown: false,
  };
  await kv.set(keys.user(id), user);
}

export const request = (userId: string, reserve = { prompt: 0, output: 0 }): AdmitRequest => ({
  userId,
  model: "glm-4.6",
  reserve,
  validate: (user) => user!,
});

export const codeOf = (err: unknown) => err instanceof AppError ? err.code : String(err);
