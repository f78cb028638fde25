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
/** An inline image counts as this many tokens, whatever its size. */
const PER_IMAGE = 1_600;
/** PDF bytes per estimated token (a 75 KB page ≈ 1,500 tokens of text and page image). */
const PDF_BYTES_PER_TOKEN = 50;
/** Audio bytes per estimated token: ≈ 12.5 tokens a second at 25.6 kbit/s, high for most audio. */
const AUDIO_BYTES_PER_TOKEN = 256;

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
  return textTokens(text, false);
}

/**
 * The estimate of a text; with `floored`, at least one token per 4 bytes of its UTF-8, which no
 * reshaping of a text (long runs without spaces, letters of two bytes, whitespace) goes below.
 * One pass, no allocation: it runs on every string of every request.
 */
function textTokens(text: string, floored: boolean): number {
  let tokens = 0;
  let word = 0; // length of the current run of word characters
  let spaces = 0; // length of the current run of whitespace
  let digits = 0;
  let bytes = text.length; // of UTF-8: one per UTF-16 unit, plus what is added below
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (c >= 0x80) bytes += c < 0x800 ? 1 : 2; // a surrogate pair: 2 + 2
    if (isWordChar(c)) {
      if (spaces > 1) tokens += 1; // indentation and blank lines: one token per run
      spaces = 0;
      word++;
      if (c >= 0x30 && c <= 0x39) digits++;
      continue;
    }
    if (word) {
      // Digits are split in groups of three; letters: one token up to 7, then one per 5 more.
      tokens += digits === word ? Math.ceil(word / 3) : 1 + Math.floor((word - 1) / 6);
      word = 0;
      digits = 0;
    }
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
  if (word) tokens += digits === word ? Math.ceil(word / 3) : 1 + Math.floor((word - 1) / 6);
  if (spaces > 1) tokens += 1;
  return Math.ceil(floored ? Math.max(tokens, bytes / 4) : tokens);
}

/** Where a value of a request body is, as far as the estimate cares (see estimatePromptTokens). */
const TOP = 0; // the body
const TEXT = 1; // anything else: every key and string is text
const MESSAGES = 2; // the messages array
const MESSAGE = 3; // a message
const BLOCKS = 4; // a message's content array (or an Anthropic tool_result's)
const BLOCK = 5; // one content block
const MEDIA_URL = 6; // OpenAI's image_url object: its `url` is counted already
const MEDIA_DATA = 7; // OpenAI's input_audio, Anthropic's source: its `data` is counted already

/** The wire format whose media blocks a body may carry; both when not given. */
export type MediaFormat = "openai" | "anthropic";

/**
 * Estimated prompt tokens of a request body (CONTRACT §5: it cannot be steered by the caller).
 * Every string counts as text, at least one token per 4 bytes, at any depth — keys too, but the
 * field names of the envelope (the body, a message, a content block), which are the wire format,
 * and the model's name. The exception is a media block's payload in the field its protocol defines
 * for it — OpenAI `image_url.url` and `input_audio.data`, Anthropic `source.data` of an `image` or
 * `document` block — which counts by kind and size; plus the chat template's per-message tokens.
 * The walk keeps its own stack: a body of any depth is walked, none overflows it.
 */
export function estimatePromptTokens(body: unknown, format?: MediaFormat): number {
  if (typeof body === "string") return textTokens(body, true);
  if (typeof body !== "object" || body === null) return 0;
  const openai = format !== "anthropic";
  const anthropic = format !== "openai";
  let tokens = 0;
  // Containers still to walk, and where each is; strings are counted as they are met.
  const containers: object[] = [body];
  const places: number[] = [TOP];
  while (containers.length) {
    const v = containers.pop()!;
    const place = places.pop()!;
    if (Array.isArray(v)) {
      const inner = place === MESSAGES ? MESSAGE : place === BLOCKS ? BLOCK : TEXT;
      if (place === MESSAGES) tokens += PER_MESSAGE * v.length;
      for (let i = 0; i < v.length; i++) {
        const item = v[i];
        if (typeof item === "string") tokens += textTokens(item, true);
        else if (typeof item === "object" && item !== null) {
          containers.push(item);
          places.push(inner);
        } // numbers, booleans: not text
      }
      continue;
    }
    const object = v as Record<string, unknown>;
    let mediaKey = ""; // the field holding this block's payload, counted here and not as text
    let mediaPlace = TEXT;
    if (place === BLOCK) {
      const media = mediaTokens(object, openai, anthropic);
      if (media > 0) {
        tokens += media;
        mediaKey = object.type === "image_url"
          ? "image_url"
          : object.type === "input_audio"
          ? "input_audio"
          : "source";
        mediaPlace = mediaKey === "image_url" ? MEDIA_URL : MEDIA_DATA;
      }
    }
    for (const key in object) {
      const item = object[key];
      let inner = TEXT;
      if (place === TEXT) tokens += textTokens(key, true);
      else if (place === TOP) {
        if (key === "model") continue;
        if (key === "messages" && Array.isArray(item)) inner = MESSAGES;
      } else if (place === MESSAGE) {
        if (key === "content" && Array.isArray(item)) inner = BLOCKS;
      } else if (place === BLOCK) {
        if (key === mediaKey) inner = mediaPlace;
        else if (
          anthropic && key === "content" && object.type === "tool_result" && Array.isArray(item)
        ) inner = BLOCKS;
      } else if (place === MEDIA_URL ? key === "url" : key === "data") continue;
      if (typeof item === "string") tokens += textTokens(item, true);
      else if (typeof item === "object" && item !== null) {
        containers.push(item);
        places.push(inner);
      }
    }
  }
  return tokens;
}

/** What a content block's media payload counts (0 when it is not a media block). */
function mediaTokens(block: Record<string, unknown>, openai: boolean, anthropic: boolean): number {
  const type = block.type;
  if (openai && type === "image_url") {
    const image = block.image_url as { url?: unknown } | null | undefined;
    return typeof image === "object" && image !== null && typeof image.url === "string"
      ? PER_IMAGE
      : 0;
  }
  if (openai && type === "input_audio") {
    const audio = block.input_audio as { data?: unknown } | null | undefined;
    return typeof audio === "object" && audio !== null && typeof audio.data === "string"
      ? Math.max(1, Math.ceil((audio.data.length * 0.75) / AUDIO_BYTES_PER_TOKEN))
      : 0;
  }
  if (anthropic && (type === "image" || type === "document")) {
    const source = block.source as { type?: unknown; data?: unknown } | null | undefined;
    if (typeof source !== "object" || source === null || source.type !== "base64") return 0;
    if (typeof source.data !== "string") return 0;
    // A document's pages, by size (≈ 1,500 tokens for a 75 KB page).
    return type === "image"
      ? PER_IMAGE
      : Math.max(PER_IMAGE, Math.ceil((source.data.length * 0.75) / PDF_BYTES_PER_TOKEN));
  }
  return 0;
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
