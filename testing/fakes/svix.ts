/** Signs Clerk webhook deliveries the way Svix does (svix-id, svix-timestamp, svix-signature). */
import { Webhook } from "svix";

export const WEBHOOK_SECRET = "whsec_" + btoa("keyway-test-webhook-secret-32bytes!!");

/** A POST of `event` (JSON-encoded unless already a string) with valid Svix headers. */
export function signedDelivery(
  event: unknown,
  options: { secret?: string; id?: string; at?: Date } = {},
): RequestInit & { headers: Record<string, string>; body: string } {
  const body = typeof event === "string" ? event : JSON.stringify(event);
  const id = options.id ?? `msg_${crypto.randomUUID()}`;
  const at = options.at ?? new Date();
  const signature = new Webhook(options.secret ?? WEBHOOK_SECRET).sign(id, at, body);
  return {
    method: "POST",
    headers: {
      "content-type": "application/json",
      "svix-id": id,
      "svix-timestamp": String(Math.floor(at.getTime() / 1000)),
      "svix-signature": signature,
    },
    body,
  };
}

/** A Clerk `user.created` event as Clerk sends it (trimmed to the fields Keyway reads). */
export function userCreated(id: string, email = `${id}@example.com`) {
  return {
    type: "user.created",
    object: "event",
    timestamp: Date.now(),
    data: {
      id,
      object: "user",
      email_addresses: [{ id: `idn_${id}`, email_address: email, object: "email_address" }],
      primary_email_address_id: `idn_${id}`,
      first_name: "Test",
      last_name: id,
      public_metadata: {},
      created_at: Date.now(),
      updated_at: Date.now(),
    },
  };
}
