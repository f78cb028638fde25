/** Clerk's user object: the schema Keyway reads it with, and the Profile it takes from it. */
import { z } from "zod";
import type { Profile } from "../identity/user_record.ts";

export const clerkId = z.string().min(1).max(200);

/** The part of Clerk's user object Keyway reads: webhook `data` and Backend API JSON alike. */
export const clerkUserSchema = z.object({
  id: clerkId,
  email_addresses: z.array(z.object({ id: z.string(), email_address: z.string().max(320) }))
    .nullish(),
  primary_email_address_id: z.string().nullish(),
  first_name: z.string().max(200).nullish(),
  last_name: z.string().max(200).nullish(),
  /** ms since the epoch; orders profile updates that Svix delivers out of order. */
  updated_at: z.number().int().nonnegative().nullish(),
});
export type ClerkUserJson = z.infer<typeof clerkUserSchema>;

/** E-mail (the primary address, else the first) and names from a Clerk user. */
export function clerkProfile(user: ClerkUserJson): Profile {
  const emails = user.email_addresses ?? [];
  const primary = emails.find((e) => e.id === user.primary_email_address_id) ?? emails[0];
  return {
    email: primary?.email_address || null,
    firstName: user.first_name || null,
    lastName: user.last_name || null,
    clerkUpdatedAt: user.updated_at ?? null,
  };
}
