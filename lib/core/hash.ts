/** SHA-256 digests, encoded by the runtime (Uint8Array.prototype.toHex / toBase64). */

const encoder = new TextEncoder();

/** The SHA-256 of a text (as UTF-8) or of bytes. */
export async function sha256(data: string | Uint8Array<ArrayBuffer>): Promise<Uint8Array> {
  const bytes = typeof data === "string" ? encoder.encode(data) : data;
  return new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
}

/** The SHA-256 as 64 lower-case hex digits. */
export async function sha256Hex(data: string | Uint8Array<ArrayBuffer>): Promise<string> {
  return (await sha256(data)).toHex();
}

/** The SHA-256 as unpadded base64url (43 characters). */
export async function sha256Base64url(data: string | Uint8Array<ArrayBuffer>): Promise<string> {
  return (await sha256(data)).toBase64({ alphabet: "base64url", omitPadding: true });
}
