/**
 * CONTRACT §5, "The prompt estimate cannot be steered by the caller": the same ~340 KB of prose,
 * reshaped every way a caller could (a `data:` prefix, line breaks, base64-looking runs, deep
 * nesting, many small strings, property names), never reserves less than its text does; only a
 * media block's payload, in the field its protocol defines for it, counts by kind and size. A body
 * nested deeper than 64 levels is refused with 400 — 400,000 levels included — never a 500.
 */
import assert from "node:assert/strict";
import { jsonStructureProblem } from "../../lib/core/encoding.ts";
import { estimatePromptTokens } from "../../lib/usage/estimate.ts";
import { json, type ServedGateway, serveGateway } from "../support/helpers.ts";

const english = Deno.readTextFileSync(
  new URL("../support/fixtures/estimate/english.txt", import.meta.url),
);
/** ~340 KB of English prose. */
const PROSE = english.repeat(Math.ceil(340_000 / english.length));
const utf8 = new TextEncoder();
/** The least a text may count: one token per 4 bytes of UTF-8. */
const floor = (...texts: string[]) =>
  texts.reduce((n, text) => n + Math.ceil(utf8.encode(text).length / 4), 0);

const words = PROSE.split(/\s+/).filter(Boolean);
/** Only the base64 alphabet left: what a bare-base64 heuristic takes for an inline file. */
const alnum = PROSE.replace(/[^A-Za-z0-9]/g, "");
const chunks = (text: string, size: number) => {
  const out: string[] = [];
  for (let i = 0; i < text.length; i += size) out.push(text.slice(i, i + size));
  return out;
};

const openai = (content: unknown, extra: Record<string, unknown> = {}) => ({
  model: "glm-4.6",
  max_tokens: 16,
  messages: [{ role: "user", content }],
  ...extra,
});
const anthropic = (content: unknown) => ({
  model: "glm-4.6",
  max_tokens: 16,
  messages: [{ role: "user", content }],
});
/** `leaf` inside `levels` more containers of a JSON schema, objects and arrays by turns. */
const nested = (levels: number, leaf: unknown): unknown => {
  let v = leaf;
  for (let i = 0; i < levels; i++) v = i % 2 ? [v] : { type: "array", items: v };
  return v;
};
/** An OpenAI body whose one tool's parameters are `parameters` (5 levels down in the body). */
const withTool = (parameters: unknown) =>
  openai("hi", { tools: [{ type: "function", function: { name: "f", parameters } }] });

interface Shape {
  name: string;
  endpoint: "/v1/chat/completions" | "/v1/messages";
  body: unknown;
  /** The prose-derived strings it sends: its estimate is at least their floor. */
  texts: string[];
  /** It sends every character of the prose: its estimate is at least plain prose's. */
  whole: boolean;
}

/** The shapes of the prose; `depth` bounds the tool-schema nesting (70 in-process, 64 on HTTP). */
function shapes(depth: number): Shape[] {
  const chat = "/v1/chat/completions" as const;
  const messages = "/v1/messages" as const;
  const lines = chunks(alnum, 76).join("\r\n");
  const keyChunks = chunks(PROSE, 32);
  return [
    { name: "plain", endpoint: chat, body: openai(PROSE), texts: [PROSE], whole: true },
    {
      name: "a data: prefix",
      endpoint: chat,
      body: openai(`data:${PROSE}`),
      texts: [PROSE],
      whole: true,
    },
    {
      name: "a data:…;base64, prefix in a text part",
      endpoint: chat,
      body: openai([{ type: "text", text: `data:image/png;base64,${PROSE}` }]),
      texts: [PROSE],
      whole: true,
    },
    {
      name: "words joined by \\n",
      endpoint: chat,
      body: openai(words.join("\n")),
      texts: [words.join("\n")],
      whole: false,
    },
    {
      name: "words joined by \\r\\n",
      endpoint: chat,
      body: openai(words.join("\r\n")),
      texts: [words.join("\r\n")],
      whole: false,
    },
    {
      name: "base64 alphabet only",
      endpoint: chat,
      body: openai(alnum),
      texts: [alnum],
      whole: false,
    },
    {
      name: "base64 alphabet in 76-character \\r\\n lines",
      endpoint: chat,
      body: openai(lines),
      texts: [lines],
      whole: false,
    },
    {
      name: `nested ${depth} levels deep in a tool schema`,
      endpoint: chat,
      body: withTool(nested(depth - 5, { description: PROSE })),
      texts: [PROSE],
      whole: true,
    },
    {
      name: "the property names of a tool schema",
      endpoint: chat,
      body: withTool({
        type: "object",
        properties: Object.fromEntries(keyChunks.map((key, i) => [`${i} ${key}`, {}])),
      }),
      texts: keyChunks,
      whole: true,
    },
    {
      name: "an image_url block inside a tool schema",
      endpoint: chat,
      body: withTool({ type: "image_url", image_url: { url: `data:${PROSE}` } }),
      texts: [PROSE],
      whole: true,
    },
    {
      name: "an Anthropic tool_result (string content)",
      endpoint: messages,
      body: anthropic([{ type: "tool_result", tool_use_id: "t1", content: PROSE }]),
      texts: [PROSE],
      whole: true,
    },
    {
      name: "an Anthropic tool_result (text block)",
      endpoint: messages,
      body: anthropic([{
        type: "tool_result",
        tool_use_id: "t1",
        content: [{ type: "text", text: `data:${PROSE}` }],
      }]),
      texts: [PROSE],
      whole: true,
    },
    {
      name: "an Anthropic text document",
      endpoint: messages,
      body: anthropic([{
        type: "document",
        source: { type: "text", media_type: "text/plain", data: alnum },
      }]),
      texts: [alnum],
      whole: false,
    },
    {
      name: "split into 64-character text blocks",
      endpoint: messages,
      body: anthropic(chunks(PROSE, 64).map((text) => ({ type: "text", text }))),
      texts: chunks(PROSE, 64),
      whole: true,
    },
  ];
}

Deno.test("prompt estimate: the same prose reshaped never counts for less than its text", async (t) => {
  const plain = estimatePromptTokens(openai(PROSE), "openai");
  assert.ok(plain >= floor(PROSE), `plain: ${plain} < ${floor(PROSE)}`);
  assert.ok(plain < floor(PROSE) * 1.25, `plain: ${plain}, far above its floor`);
  const inProcess = [
    ...shapes(70),
    {
      name: "split into words, one string each",
      endpoint: "/v1/messages",
      body: anthropic(words.map((text) => ({ type: "text", text }))),
      texts: words,
      whole: false,
    },
  ];
  for (const shape of inProcess) {
    await t.step(shape.name, () => {
      const format = shape.endpoint === "/v1/messages" ? "anthropic" : "openai";
      const estimate = estimatePromptTokens(shape.body, format);
      const least = floor(...shape.texts);
      assert.ok(estimate >= least, `${estimate} < ${least}, a token per 4 bytes`);
      if (shape.whole) assert.ok(estimate >= plain, `${estimate} < ${plain}, plain prose's`);
    });
  }
});

Deno.test("prompt estimate: any string counts at least a token per 4 bytes of its UTF-8", () => {
  // Word characters of 1, 2 and 3 bytes, whitespace, punctuation, CJK, emoji, lone surrogates.
  const alphabet = [..."aZ9_ \n\r\t.,{}éßжΩ\u0800\u1fff中の한😀"].concat(["\ud800", "\udc00"]);
  let seed = 42;
  const random = (n: number) => (seed = (seed * 1_103_515_245 + 12_345) % 2 ** 31) % n;
  for (let i = 0; i < 2000; i++) {
    let text = "";
    const runs = 1 + random(20);
    for (let r = 0; r < runs; r++) text += alphabet[random(alphabet.length)].repeat(random(300));
    const estimate = estimatePromptTokens({ messages: [text] }) - 4;
    assert.ok(estimate >= floor(text), `${JSON.stringify(text.slice(0, 40))}…: ${estimate}`);
  }
});

Deno.test("prompt estimate: a media payload counts by kind and size, in its protocol's field only", async (t) => {
  const random = new Uint8Array(200_000);
  for (let i = 0; i < random.length; i += 65_536) {
    crypto.getRandomValues(random.subarray(i, i + 65_536));
  }
  let binary = "";
  for (const byte of random) binary += String.fromCharCode(byte);
  const base64 = btoa(binary); // ~267 KB
  const text = floor(base64);
  const media = (block: unknown, format: "openai" | "anthropic") =>
    estimatePromptTokens(openai([block]), format) - estimatePromptTokens(openai([]), format);

  await t.step("OpenAI image_url.url: one image, whatever its size", () => {
    const dataUrl = { type: "image_url", image_url: { url: `data:image/png;base64,${base64}` } };
    const bare = { type: "image_url", image_url: { url: base64.slice(0, 1000), detail: "high" } };
    assert.ok(media(dataUrl, "openai") >= 1000 && media(dataUrl, "openai") < 2000);
    assert.ok(Math.abs(media(bare, "openai") - media(dataUrl, "openai")) <= 2);
  });
  await t.step("OpenAI input_audio.data: by size", () => {
    const audio = (data: string) => ({ type: "input_audio", input_audio: { data, format: "mp3" } });
    const small = media(audio(base64.slice(0, 40_000)), "openai");
    const large = media(audio(base64), "openai");
    assert.ok(small > 0 && large > small * 5, `${small}, ${large}`);
    assert.ok(large < text / 10, `${large}: counted as audio, not as text`);
  });
  await t.step("Anthropic image and document source.data: one image; a PDF by size", () => {
    const image = {
      type: "image",
      source: { type: "base64", media_type: "image/png", data: base64 },
    };
    const pdf = (data: string) => ({
      type: "document",
      source: { type: "base64", media_type: "application/pdf", data },
    });
    assert.ok(media(image, "anthropic") >= 1000 && media(image, "anthropic") < 2000);
    const onePage = media(pdf(base64.slice(0, 100_000)), "anthropic");
    const pages = media(pdf(base64), "anthropic");
    assert.ok(pages > onePage * 2 && pages < text / 5, `${onePage}, ${pages}`);
    const inToolResult = media(
      { type: "tool_result", tool_use_id: "t1", content: [image] },
      "anthropic",
    );
    assert.ok(inToolResult < 2000, `an image in a tool_result: ${inToolResult}`);
  });
  await t.step("the same blocks in the other protocol, or outside message content: text", () => {
    const image = {
      type: "image",
      source: { type: "base64", media_type: "image/png", data: base64 },
    };
    const imageUrl = { type: "image_url", image_url: { url: `data:image/png;base64,${base64}` } };
    assert.ok(media(image, "openai") >= text);
    assert.ok(media(imageUrl, "anthropic") >= text);
    const system = { ...openai("hi"), system: [imageUrl] };
    assert.ok(estimatePromptTokens(system, "openai") >= text);
    const metadata = { ...openai("hi"), metadata: { content: [image] } };
    assert.ok(estimatePromptTokens(metadata, "anthropic") >= text);
  });
  await t.step("the other fields of a media block: text", () => {
    const detail = { type: "image_url", image_url: { url: "https://x.test/a.png", detail: PROSE } };
    assert.ok(media(detail, "openai") >= floor(PROSE));
  });
});

Deno.test("prompt estimate: 400,000 levels of nesting are walked without recursion", () => {
  let body: unknown = "needle ".repeat(1000);
  for (let i = 0; i < 400_000; i++) body = i % 2 ? [body] : { x: body };
  const estimate = estimatePromptTokens(openai(body), "openai");
  assert.ok(estimate >= floor("needle ".repeat(1000)), `${estimate}`);
});

Deno.test("jsonStructureProblem: nesting beyond 64 levels, and a key twice, found in one pass", () => {
  const deep = (levels: number) => "[".repeat(levels) + "]".repeat(levels);
  assert.equal(jsonStructureProblem(deep(64)), null);
  assert.equal(jsonStructureProblem(deep(65)), "nested deeper than 64 levels");
  assert.equal(jsonStructureProblem(deep(400_000)), "nested deeper than 64 levels");
  // Brackets inside strings are text, not nesting.
  assert.equal(jsonStructureProblem(`{"a":"${"[".repeat(100)}"}`), null);
  assert.equal(
    jsonStructureProblem('{"a":{"b":1,"b":2}}'),
    'the key "b" appears twice in one object',
  );
});

/** A served gateway, a user's key, and a POST helper for its endpoints. */
async function serve(tokensPerDay: number) {
  const s: ServedGateway = await serveGateway(
    { TOKEN_LIMIT_DAILY: String(tokensPerDay), RATE_LIMIT_RPM: "1000" },
    "user_steering",
  );
  const post = (path: string, body: unknown) =>
    fetch(`${s.url}${path}`, {
      method: "POST",
      headers: { authorization: `Bearer ${s.apiKey}`, "content-type": "application/json" },
      body: typeof body === "string" ? body : JSON.stringify(body),
    });
  return { ...s, post };
}

async function errorOf(res: Response) {
  assert.match(res.headers.get("content-type") ?? "", /application\/json/);
  return (await json<{ error: { code: string; message: string } }>(res)).error;
}

Deno.test("HTTP, a 20,000-token daily quota: every shape of the prose is refused as plain prose is", async (t) => {
  const s = await serve(20_000);
  try {
    await t.step("a small request is admitted", async () => {
      const res = await s.post("/v1/chat/completions", openai("hi"));
      assert.equal(res.status, 200);
      await res.body?.cancel();
    });
    for (const shape of shapes(64)) {
      await t.step(`${shape.name} (${shape.endpoint})`, async () => {
        const res = await s.post(shape.endpoint, shape.body);
        // A reservation that cannot fit what is left is final until the reset (CONTRACT §4).
        assert.equal(res.status, 403);
        const error = await errorOf(res);
        assert.equal(error.code, "quota_exceeded", error.message);
      });
    }
    assert.equal(s.fake.count, 1, "only the small request went upstream");
  } finally {
    await s.close();
  }
});

Deno.test("HTTP: a body nested deeper than 64 levels is refused with 400, never a 500", async (t) => {
  const s = await serve(1_000_000);
  const arrays = (levels: number) => "[".repeat(levels) + "]".repeat(levels);
  /** A valid body of each endpoint, nested `levels` deep (the body itself is level 1). */
  const bodies = (levels: number) => ({
    "/v1/chat/completions": `{"model":"glm-4.6","max_tokens":16,` +
      `"messages":[{"role":"user","content":"hi"}],"extra":${arrays(levels - 1)}}`,
    "/v1/messages": `{"model":"glm-4.6","max_tokens":16,` +
      `"messages":[{"role":"user","content":"hi"}],"extra":${arrays(levels - 1)}}`,
    "/v1/embeddings": `{"model":"embedding-3","input":"hi","extra":${arrays(levels - 1)}}`,
    "/v1/messages/count_tokens": `{"model":"glm-4.6",` +
      `"messages":[{"role":"user","content":"hi"}],"extra":${arrays(levels - 1)}}`,
  });
  try {
    await t.step("64 levels: admitted", async () => {
      for (const path of ["/v1/chat/completions", "/v1/messages"] as const) {
        const res = await s.post(path, bodies(64)[path]);
        assert.equal(res.status, 200, path);
        await res.body?.cancel();
      }
    });
    await t.step("65 levels: 400 invalid_request on every endpoint", async () => {
      for (const [path, body] of Object.entries(bodies(65))) {
        const res = await s.post(path, body);
        assert.equal(res.status, 400, path);
        const error = await errorOf(res);
        assert.equal(error.code, "invalid_request");
        assert.equal(error.message, "body: nested deeper than 64 levels");
      }
    });
    await t.step("400,000 levels (800 KB), in a field or in messages: 400, not 500", async () => {
      const inMessages = `{"model":"glm-4.6","max_tokens":16,"messages":[{"role":"user",` +
        `"content":${arrays(400_000)}}]}`;
      for (const path of ["/v1/chat/completions", "/v1/messages"] as const) {
        for (const body of [bodies(400_000)[path], inMessages]) {
          const res = await s.post(path, body);
          assert.equal(res.status, 400, path);
          const error = await errorOf(res);
          assert.equal(error.code, "invalid_request");
          assert.match(error.message, /nested deeper than 64 levels/);
        }
      }
    });
    assert.equal(s.fake.count, 2, "only the 64-level bodies went upstream");
  } finally {
    await s.close();
  }
});
