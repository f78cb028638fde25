/**
 * `deno task report --user`: a user id or an e-mail (the one an operator knows). One that matches
 * no user is an error naming it, not an empty report.
 */
import { keys } from "../core/kv.ts";
import type { UserRecord } from "../identity/users.ts";

export type ReportUser =
  /** `known`: a user record has this id or e-mail; else only usage may name it (checked later). */
  | { userId: string; known: boolean }
  | { ambiguous: string[] };

/** The user `--user` names: by id first, then by e-mail (any case). */
export async function resolveReportUser(kv: Deno.Kv, given: string): Promise<ReportUser> {
  const byId = await kv.get<UserRecord>(keys.user(given));
  if (byId.value) return { userId: given, known: true };
  if (given.includes("@")) {
    const wanted = given.toLowerCase();
    const ids: string[] = [];
    for await (const e of kv.list<UserRecord>({ prefix: keys.users() }, { batchSize: 1000 })) {
      if (e.value.email?.toLowerCase() === wanted) ids.push(e.value.id);
    }
    if (ids.length === 1) return { userId: ids[0], known: true };
    if (ids.length > 1) return { ambiguous: ids };
  }
  // Usage can outlive (or predate) a user record: the report itself tells whether there is any.
  return { userId: given, known: false };
}
