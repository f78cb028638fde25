/**
 * The token estimator against a real BPE tokenizer (o200k_base, from js-tiktoken on npm): the
 * README quotes these figures. GLM's own tokenizer is not published on npm; o200k_base is a
 * tokenizer of the same kind and size.
 */
import assert from "node:assert/strict";
import { Tiktoken } from "js-tiktoken/lite";
import o200k from "js-tiktoken/ranks/o200k_base";
import {
  estimatePromptTokens,
  estimateRelayedTokens,
  estimateTextTokens,
} from "../../lib/usage/estimate.ts";

const tokenizer = new Tiktoken(o200k);
const fixture = (name: string) =>
  Deno.readTextFileSync(new URL(`../support/fixtures/estimate/${name}`, import.meta.url));

Deno.test("estimate vs o200k_base: within −5% … +20% on English, Chinese and code", async (t) => {
  for (
    const [name, file] of [["English prose", "english.txt"], ["Chinese prose", "chinese.txt"], [
      "TypeScript",
      "code.ts.txt",
    ]]
  ) {
    await t.step(name, () => {
      const text = fixture(file);
      const real = tokenizer.encode(text).length;
      const estimate = estimateTextTokens(text);
      const ratio = estimate / real;
      assert.ok(ratio >= 0.95 && ratio <= 1.2, `${name}: ${estimate} vs ${real} (${ratio})`);
    });
  }
});

Deno.test("prompt estimate: message strings and per-message tokens, not the model or field names", () => {
  const body = {
    model: "glm-4.6-with-a-very-long-model-name",
    messages: [
      { role: "system", content: "You are terse." },
      { role: "user", content: [{ type: "text", text: "hi" }] },
    ],
  };
  // "system" 2 (a token per 4 bytes at least) + "You are terse." 4 + "user" 1 + "text" 1 +
  // "hi" 1 + 2 × 4.
  assert.equal(estimatePromptTokens(body), 17);
  const image = {
    model: "glm-4.6v",
    messages: [{
      role: "user",
      content: [{
        type: "image_url",
        image_url: { url: `data:image/png;base64,${"A".repeat(50_000)}` },
      }],
    }],
  };
  // An inline image is a fixed amount, not 50,000 characters of base64.
  assert.ok(estimatePromptTokens(image) < 2000);
  // The same as Claude Code sends a screenshot (bare base64 in an Anthropic image block), and as
  // bare base64 in image_url: also the fixed amount.
  const png = btoa(String.fromCharCode(...crypto.getRandomValues(new Uint8Array(60_000))));
  const anthropic = {
    model: "glm-4.6v",
    max_tokens: 100,
    messages: [{
      role: "user",
      content: [
        { type: "image", source: { type: "base64", media_type: "image/png", data: png } },
        { type: "text", text: "What is on the screen?" },
      ],
    }],
  };
  assert.ok(estimatePromptTokens(anthropic) < 2000, `${estimatePromptTokens(anthropic)}`);
  const bare = {
    ...image,
    messages: [{ role: "user", content: [{ type: "image_url", image_url: { url: png } }] }],
  };
  assert.ok(estimatePromptTokens(bare) < 2000);
  // A PDF counts by its size (≈ 1,500 tokens a 75 KB page), not as text and not as one image.
  const pdf = {
    model: "glm-4.6",
    max_tokens: 100,
    messages: [{
      role: "user",
      content: [{
        type: "document",
        source: { type: "base64", media_type: "application/pdf", data: png.repeat(5) },
      }],
    }],
  };
  const pdfTokens = estimatePromptTokens(pdf);
  assert.ok(pdfTokens > 5000 && pdfTokens < 7000, `${pdfTokens}`); // 300 KB: four pages
});

Deno.test("relayed estimate: generated strings in SSE chunks and JSON answers", () => {
  const sse = 'data: {"choices":[{"delta":{"content":"Hello there"}}]}\n\n' +
    'data: {"choices":[{"delta":{"reasoning_content":"thinking \\"hard\\""}}]}\n\n' +
    'data: {"choices":[{"delta":{"tool_calls":[{"function":{"arguments":"{\\"a\\":1}"}}]}}]}\n\n';
  // Each generated string as written on the wire (escapes included), nothing else.
  const strings = ["Hello there", 'thinking \\"hard\\"', '{\\"a\\":1}'];
  assert.equal(
    estimateRelayedTokens(sse),
    strings.reduce((n, text) => n + estimateTextTokens(text), 0),
  );
  assert.equal(estimateTextTokens("Hello there"), 2);
  assert.equal(estimateRelayedTokens('{"usage":{"prompt_tokens":3}}'), 0);
  const cut = 'data: {"delta":{"content":"cut mid-wa';
  assert.equal(estimateRelayedTokens(cut), estimateTextTokens("cut mid-wa"));
});
