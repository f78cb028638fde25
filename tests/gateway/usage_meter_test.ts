/**
 * The protocols' meters (lib/gateway/meter.ts, protocols/*_usage.ts): the usage an answer reports, found in SSE streams and JSON
 * bodies however the bytes are cut, and the end of a stream told from text that only looks like it.
 */
import assert from "node:assert/strict";
import { openaiChat } from "../../lib/gateway/protocols/openai_chat.ts";
import { anthropicMessages } from "../../lib/gateway/protocols/anthropic_messages.ts";

const enc = new TextEncoder();

/** Feeds `text` to a meter cut at every `step` bytes (through multi-byte characters too). */
function meterOf(text: string, sse: boolean, step: number) {
  const bytes = enc.encode(text);
  const meter = openaiChat.meter(sse);
  for (let i = 0; i < bytes.length; i += step) meter.push(bytes.subarray(i, i + step));
  return meter.usage();
}

Deno.test("usage meter: SSE usage found across any chunk boundaries", () => {
  const sse = [
    `data: {"choices":[{"delta":{"content":"héllo ✓ \\"usage\\": {"}}],"usage":null}`,
    ``,
    `data: {"choices":[{"delta":{"content":"wörld"}}],"usage": null}`,
    ``,
    `: a comment line mentioning "usage": {}`,
    `data: {"choices":[],"usage":{"prompt_tokens":120,"completion_tokens":45,"total_tokens":165}}`,
    ``,
    `data: [DONE]`,
    ``,
  ];
  for (const eol of ["\n", "\r\n"]) {
    const text = sse.join(eol);
    for (const step of [1, 2, 3, 7, 64, text.length]) {
      assert.deepEqual(
        meterOf(text, true, step),
        { promptTokens: 120, completionTokens: 45 },
        `${step}`,
      );
    }
  }
  // A stream cut before the last line ends still reports the usage it saw.
  const cut = `data: {"usage":{"prompt_tokens":3,"completion_tokens":4}}`;
  assert.deepEqual(meterOf(cut, true, 5), { promptTokens: 3, completionTokens: 4 });
  assert.equal(meterOf(`data: {"choices":[]}\n\ndata: [DONE]\n\n`, true, 4), null);
});

Deno.test("usage meter: an Anthropic stream cut before message_delta is not read as 0 tokens", () => {
  const event = (type: string, data: unknown) =>
    `event: ${type}\ndata: ${JSON.stringify({ type, ...data as object })}\n\n`;
  const start = (input: number) =>
    event("message_start", {
      message: { id: "m", usage: { input_tokens: input, output_tokens: 1 } },
    });
  const delta = event("content_block_delta", {
    index: 0,
    delta: { type: "text_delta", text: "a fairly long piece of generated text ".repeat(4) },
  });
  const anthropicMeter = (text: string) => {
    const meter = anthropicMessages.meter(true);
    meter.push(enc.encode(text));
    return meter;
  };
  // GLM: 0 input tokens at the start. Cut there, it is the estimate's to charge (null), not 0.
  assert.equal(anthropicMeter(start(0) + delta + delta).usage(), null);
  // Real input counts at the start: kept, and what was relayed counts as generated.
  const partial = anthropicMeter(start(50) + delta + delta);
  assert.equal(partial.usage()?.promptTokens, 50);
  assert.ok(partial.usage()!.completionTokens > 1, "not message_start's 1 output token");
  // With the message_delta: exactly its counts.
  const done = anthropicMeter(
    start(0) + delta + event("message_delta", { usage: { input_tokens: 40, output_tokens: 7 } }),
  );
  assert.deepEqual(done.usage(), { promptTokens: 40, completionTokens: 7 });
});

Deno.test("usage meter: JSON answers, small and large", () => {
  const small = JSON.stringify({
    choices: [{ message: { content: 'say "usage": {"prompt_tokens": 999}' } }],
    usage: { prompt_tokens: 10, completion_tokens: 5, total_tokens: 15 },
  });
  assert.deepEqual(meterOf(small, false, 3), { promptTokens: 10, completionTokens: 5 });
  const large = JSON.stringify({
    choices: [{ message: { content: "x".repeat(1_200_000) } }],
    usage: { prompt_tokens: 7, total_tokens: 19, prompt_tokens_details: { cached_tokens: 2 } },
  });
  assert.deepEqual(meterOf(large, false, 65_536), {
    promptTokens: 7,
    completionTokens: 12,
    cachedTokens: 2,
  });
  assert.equal(meterOf(`{"error":{"message":"no"}}`, false, 5), null);
  assert.equal(meterOf(`not json`, false, 5), null);
});

Deno.test("usage meter: the end event ends the answer, the same characters in generated text do not", () => {
  const enc = new TextEncoder();
  const meter = openaiChat.meter(true);
  meter.push(enc.encode('data: {"choices":[{"delta":{"content":"say data: [DONE] now"}}]}\n\n'));
  assert.equal(meter.ended, false);
  meter.push(enc.encode('data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}}'));
  assert.equal(meter.ended, false);
  meter.push(enc.encode("\n\ndata: [DONE]\n\n"));
  assert.equal(meter.ended, true);
  assert.deepEqual(meter.usage(), { promptTokens: 3, completionTokens: 4 });
  assert.ok(meter.relayedTokens() >= 4);
});
