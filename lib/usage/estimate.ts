/**
 * Token estimates without a tokenizer: what a request reserves at admission, and what a request
 * is charged when the upstream never reported `usage` (the client left, the stream was cut).
 *
 * A BPE tokenizer (GLM's, like OpenAI's) spends about one token on a common word with its leading
 * space, one to two on a long or rare word, about 0.8 per Chinese or Japanese character, and about
 * one per punctuation mark in code. The estimate counts exactly that, per character class, in one
 * pass over the text. Its measured error against the o200k_base tokenizer on English prose,
 * Chinese prose and TypeScript is in the README (tests/usage/estimate_test.ts measures it); it is
 * meant to err a little high, so a reservation rarely falls short of what a request uses.
 */

/** Tokens a chat template adds per message (role markers and separators). */
const PER_MESSAGE = 4;
/** An image sent inline (data: URL) counts as this many tokens, whatever its size. */
const PER_IMAGE = 1_600;

const isCjk = (c: number) =>
  (c >= 0x3040 && c <= 0x30ff) || // kana
  (c >= 0x3400 && c <= 0x9fff) || // CJK ideographs
  (c >= 0xac00 && c <= 0xd7af) || // hangul
  (c >= 0xf900 && c <= 0xfaff) ||
  (c >= 0xff00 && c <= 0xffef) || // full-width forms and punctuation
  (c >= 0x3000 && c <= 0x303f); // CJK punctuation

const isWordChar = (c: number) =>
  (c >= 0x61 && c <= 0x7a) || (c >= 0x41 && c <= 0x5a) || (c >= 0x30 && c <= 0x39) ||
  c === 0x5f || (c >= 0xc0 && c < 0x2000);

const isSpace = (c: number) => c === 0x20 || c === 0x0a || c === 0x09 || c === 0x0d;

/** Estimated tokens of a text. */
export function estimateTextTokens(text: string): number {
  let tokens = 0;
  let word = 0; // length of the current run of word characters
  let spaces = 0; // length of the current run of whitespace
  let digits = 0;
  const endWord = () => {
    // Digits are split in groups of three; letters: one token up to 7, then one per 5 more.
    if (word) tokens += digits === word ? Math.ceil(word / 3) : 1 + Math.floor((word - 1) / 6);
    word = 0;
    digits = 0;
  };
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (isWordChar(c)) {
      if (spaces > 1) tokens += 1; // indentation and blank lines: one token per run
      spaces = 0;
      word++;
      if (c >= 0x30 && c <= 0x39) digits++;
      continue;
    }
    endWord();
    if (isSpace(c)) {
      spaces++;
      continue;
    }
    if (spaces > 1) tokens += 1;
    spaces = 0;
    if (isCjk(c)) tokens += 0.8; // GLM and o200k: 0.6–0.8 per character
    else if (c >= 0xd800 && c <= 0xdbff) {
      tokens += 2; // emoji and other astral characters: two or three tokens each
      i++;
    } else tokens += c < 0x80 ? 0.75 : 1; // punctuation merges in pairs now and then
  }
  endWord();
  if (spaces > 1) tokens += 1;
  return Math.ceil(tokens);
}

/**
 * Estimated prompt tokens of a request body: every string in it but the model's name (message
 * contents, tool schemas, system prompts), an inline image as a fixed amount, and the chat
 * template's per-message tokens. Field names cost nothing: they are the wire format, not the
 * prompt.
 */
export function estimatePromptTokens(body: unknown): number {
  let tokens = 0;
  const walk = (v: unknown, depth: number) => {
    if (typeof v === "string") {
      tokens += isInlineBinary(v) ? PER_IMAGE : estimateTextTokens(v);
    } else if (Array.isArray(v)) {
      for (const item of v) walk(item, depth + 1);
    } else if (typeof v === "object" && v !== null && depth < 64) {
      const document = base64Document(v);
      if (document !== null) {
        // An Anthropic PDF block: its pages, by size (≈ 1,500 tokens for a 75 KB page).
        tokens += Math.max(PER_IMAGE, Math.ceil((document.length * 0.75) / PDF_BYTES_PER_TOKEN));
        return;
      }
      for (const key in v) walk((v as Record<string, unknown>)[key], depth + 1);
    }
  };
  const b = body as { messages?: unknown; model?: unknown };
  if (typeof b === "object" && b !== null && !Array.isArray(b)) {
    for (const key in b) if (key !== "model") walk((b as Record<string, unknown>)[key], 1);
  } else walk(body, 0);
  if (Array.isArray(b?.messages)) tokens += PER_MESSAGE * b.messages.length;
  return tokens;
}

/** PDF bytes per estimated token (a 75 KB page ≈ 1,500 tokens of text and page image). */
const PDF_BYTES_PER_TOKEN = 50;
/** Base64 text, line breaks allowed: what an inline image or file is sent as. */
const BASE64 = /^[A-Za-z0-9+/\r\n]+={0,2}$/;

/**
 * An inline image or file: a `data:` URL (OpenAI's image_url), or a long run of bare base64
 * (Anthropic's `source.data`, which GLM also takes in image_url). Text this long always has
 * spaces or punctuation base64 has not.
 */
function isInlineBinary(v: string): boolean {
  if (v.length <= 64) return false;
  if (v.startsWith("data:")) return true;
  return v.length >= 1024 && BASE64.test(v);
}

/** The base64 data of an Anthropic `document` block, or null for anything else. */
function base64Document(v: object): string | null {
  const block = v as { type?: unknown; source?: { type?: unknown; data?: unknown } };
  if (block.type !== "document" || block.source?.type !== "base64") return null;
  return typeof block.source.data === "string" ? block.source.data : null;
}

/** Fields of streamed and whole answers that carry generated text (OpenAI, GLM, Anthropic). */
const TEXT_FIELD = /"(?:content|reasoning_content|text|arguments|partial_json|thinking)":"/g;

/**
 * Estimated completion tokens in a piece of relayed answer text: the generated strings found in
 * it (escapes counted as written). A string cut by a chunk boundary is counted up to the cut.
 */
export function estimateRelayedTokens(text: string): number {
  let tokens = 0;
  TEXT_FIELD.lastIndex = 0;
  let m: RegExpExecArray | null;
  while ((m = TEXT_FIELD.exec(text)) !== null) {
    const start = m.index + m[0].length;
    let end = start;
    while (end < text.length) {
      const c = text.charCodeAt(end);
      if (c === 0x22) break; // closing quote
      end += c === 0x5c ? 2 : 1; // skip what a backslash escapes
    }
    if (end > start) tokens += estimateTextTokens(text.slice(start, end));
    TEXT_FIELD.lastIndex = end;
  }
  return tokens;
}
