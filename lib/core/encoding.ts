/** Base64url (the runtime's, unpadded), random tokens and byte joins; JSON text walkers below. */

export function encodeBase64Url(bytes: Uint8Array): string {
  return bytes.toBase64({ alphabet: "base64url", omitPadding: true });
}

/** Bytes of an unpadded base64url string, or null when it is not one. */
export function decodeBase64Url(text: string): Uint8Array<ArrayBuffer> | null {
  // fromBase64 would also take padding and skip whitespace: neither is in an unpadded token.
  if (!/^[A-Za-z0-9_-]*$/.test(text) || text.length % 4 === 1) return null;
  return Uint8Array.fromBase64(text, { alphabet: "base64url" });
}

export function randomToken(bytes = 32): string {
  return encodeBase64Url(crypto.getRandomValues(new Uint8Array(bytes)));
}

/** The chunks joined into one buffer of `size` bytes (their total length). */
export function concatBytes(chunks: Uint8Array[], size: number): Uint8Array<ArrayBuffer> {
  const whole = new Uint8Array(size);
  let offset = 0;
  for (const chunk of chunks) {
    whole.set(chunk, offset);
    offset += chunk.byteLength;
  }
  return whole;
}

/** Where a string of a JSON text is, and what it is (see walkJsonStrings). */
interface JsonString {
  /** Index of its opening quote. */
  start: number;
  /** Index of its closing quote. */
  end: number;
  /** An object key (else a value, or an array element). */
  key: boolean;
  /** Nesting depth: 1 in the top-level object or array. */
  depth: number;
  /** The object it is in (numbered in opening order; -1 in an array or at the top). */
  object: number;
  /** The text between its quotes, escapes as written. */
  raw: string;
}

/**
 * Walks the strings of a valid JSON text in order; `visit` returning true stops the walk, and so
 * does nesting deeper than `maxDepth` (then it returns false). One pass, its own stack (a text of
 * any depth is walked); strings are skipped with indexOf.
 */
function walkJsonStrings(
  text: string,
  visit: (s: JsonString) => boolean | void,
  maxDepth = Infinity,
): boolean {
  const stack: number[] = []; // the object's number per open object, -1 per open array
  let objects = 0;
  let expectKey = false;
  let i = 0;
  while (i < text.length) {
    const c = text.charCodeAt(i);
    if (c === 0x22) {
      // A string: find its closing quote (one not escaped by an odd run of backslashes).
      let end = i;
      for (;;) {
        end = text.indexOf('"', end + 1);
        if (end < 0) return true; // not valid JSON; the caller parsed it already
        let slashes = 0;
        for (let j = end - 1; text.charCodeAt(j) === 0x5c; j--) slashes++;
        if (slashes % 2 === 0) break;
      }
      const object = stack.length ? stack[stack.length - 1] : -1;
      const key = expectKey && object >= 0;
      const raw = text.slice(i + 1, end);
      if (visit({ start: i, end, key, depth: stack.length, object, raw })) return true;
      if (key) expectKey = false;
      i = end + 1;
      continue;
    }
    if (c === 0x7b || c === 0x5b) {
      if (stack.length >= maxDepth) return false;
      stack.push(c === 0x7b ? objects++ : -1);
      expectKey = c === 0x7b;
    } else if (c === 0x7d || c === 0x5d) {
      stack.pop();
      expectKey = false;
    } else if (c === 0x2c) {
      expectKey = (stack[stack.length - 1] ?? -1) >= 0;
    }
    i++;
  }
  return true;
}

/** A JSON string's text between its quotes as the string it stands for. */
function unescapeJson(raw: string): string {
  return raw.includes("\\") ? JSON.parse(`"${raw}"`) as string : raw;
}

/**
 * The first key that appears twice in one object of a valid JSON text, or null. JSON.parse keeps
 * the last of duplicates while other parsers keep the first: a body is only forwarded when what
 * was checked is all there is.
 */
export function duplicateJsonKey(text: string): string | null {
  return firstDuplicateKey(text, Infinity).duplicate;
}

/** A request body may nest this many levels (CONTRACT §5), the body itself being the first. */
export const MAX_BODY_DEPTH = 64;

/**
 * What makes a valid JSON body unfit to forward, for a person to read, or null: nesting deeper
 * than `maxDepth` levels, or a key twice in one object (see duplicateJsonKey). One pass.
 */
export function jsonStructureProblem(text: string, maxDepth = MAX_BODY_DEPTH): string | null {
  const { tooDeep, duplicate } = firstDuplicateKey(text, maxDepth);
  if (tooDeep) return `nested deeper than ${maxDepth} levels`;
  if (duplicate === null) return null;
  return `the key ${JSON.stringify(duplicate).slice(0, 100)} appears twice in one object`;
}

function firstDuplicateKey(
  text: string,
  maxDepth: number,
): { tooDeep: boolean; duplicate: string | null } {
  const keys = new Map<number, Set<string>>(); // per object
  let duplicate: string | null = null;
  const tooDeep = !walkJsonStrings(text, ({ key, object, raw }) => {
    if (!key) return;
    const name = unescapeJson(raw);
    let set = keys.get(object);
    if (!set) keys.set(object, set = new Set());
    if (set.has(name)) {
      duplicate = name;
      return true;
    }
    set.add(name);
  }, maxDepth);
  return { tooDeep, duplicate };
}

/**
 * The text with the string value of the top-level object's `key` replaced, everything else byte
 * for byte as it was (numbers beyond 2^53, escapes, spacing); null when there is no such value.
 */
export function withTopLevelString(text: string, key: string, value: string): string | null {
  let after = false;
  let out: string | null = null;
  walkJsonStrings(text, (s) => {
    if (s.depth !== 1) return;
    if (s.key) {
      after = unescapeJson(s.raw) === key;
      return;
    }
    if (!after) return;
    out = text.slice(0, s.start) + JSON.stringify(value) + text.slice(s.end + 1);
    return true;
  });
  return out;
}
