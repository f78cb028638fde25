/**
 * Who is an operator (CONTRACT §5 Operator): a user id in ADMIN_USER_IDS whose own user record is
 * not disabled or deleted. The list alone is not enough: a disabled operator could otherwise
 * enable themselves again, and a deleted one's still-valid session could change limits. An id in
 * the list with no record yet (never provisioned) is an operator.
 */
import type { Config } from "../core/config.ts";
import type { Users } from "./users.ts";

export type OperatorCheck =
  | { operator: true }
  | { operator: false; why: "not_listed" | "disabled" | "deleted" };

/** Reads the user record only for ids in ADMIN_USER_IDS (everyone else is refused unread). */
export async function operatorCheck(
  config: Config,
  users: Users,
  userId: string,
): Promise<OperatorCheck> {
  if (!config.adminUserIds.has(userId)) return { operator: false, why: "not_listed" };
  const status = (await users.get(userId))?.status;
  if (status === "disabled" || status === "deleted") return { operator: false, why: status };
  return { operator: true };
}

/** The refusal's words, for the 403 JSON and the 403 page alike. */
export function operatorRefusal(why: "not_listed" | "disabled" | "deleted"): string {
  switch (why) {
    case "not_listed":
      return "Operators only: your user id is not in ADMIN_USER_IDS.";
    case "disabled":
      return "Operators only: your own account is disabled, so it has no operator rights until another operator enables it.";
    case "deleted":
      return "Operators only: your own account has been deleted, so it has no operator rights.";
  }
}
