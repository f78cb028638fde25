/**
 * The benchmark's helper processes, one role each, so the servers under test never share a
 * thread with each other or with the load generator: `upstream` (a fake GLM), `bare` (hello),
 * `passthrough <upstream>` (a proxy with no auth, limits or metering). Each prints
 * `{"port": n}` on its first stdout line once it listens.
 */

const COMPLETION = JSON.stringify({
  id: "chatcmpl-bench",
  object: "chat.completion",
  created: 1_700_000_000,
  model: "glm-4.6",
  choices: [{
    index: 0,
    message: { role: "assistant", content: "Hello from the fake GLM upstream." },
    finish_reason: "stop",
  }],
  usage: { prompt_tokens: 12, completion_tokens: 9, total_tokens: 21 },
});

const SSE_CHUNKS = [
  ...["Hello", " from", " the", " fake", " GLM"].map((content) =>
    `data: ${
      JSON.stringify({
        id: "chatcmpl-bench",
        object: "chat.completion.chunk",
        model: "glm-4.6",
        choices: [{ index: 0, delta: { content } }],
      })
    }\n\n`
  ),
  `data: ${
    JSON.stringify({
      id: "chatcmpl-bench",
      object: "chat.completion.chunk",
      model: "glm-4.6",
      choices: [{ index: 0, delta: {}, finish_reason: "stop" }],
      usage: { prompt_tokens: 12, completion_tokens: 5, total_tokens: 17 },
    })
  }\n\n`,
  "data: [DONE]\n\n",
].map((s) => new TextEncoder().encode(s));

/** An Anthropic Messages answer, as Z.ai's Anthropic endpoint gives it. */
const MESSAGE = JSON.stringify({
  id: "msg_bench",
  type: "message",
  role: "assistant",
  model: "glm-4.6",
  content: [{ type: "text", text: "Hello from the fake GLM upstream." }],
  stop_reason: "end_turn",
  stop_sequence: null,
  usage: { input_tokens: 12, output_tokens: 9, cache_read_input_tokens: 0 },
});

function upstream(): Deno.HttpServer<Deno.NetAddr> {
  return Deno.serve({ port: 0, hostname: "127.0.0.1", onListen: () => {} }, async (req) => {
    const body = await req.text();
    if (new URL(req.url).pathname.endsWith("/v1/messages")) {
      return new Response(MESSAGE, { headers: { "content-type": "application/json" } });
    }
    if (body.includes('"stream":true')) {
      // The relay check asks for gaps between chunks, so each one must arrive on its own.
      const gapMs = body.includes('"bench_gaps":true') ? 15 : 0;
      let i = 0;
      return new Response(
        new ReadableStream({
          async pull(controller) {
            if (gapMs && i > 0) await new Promise((r) => setTimeout(r, gapMs));
            if (i < SSE_CHUNKS.length) controller.enqueue(SSE_CHUNKS[i++]);
            else controller.close();
          },
        }),
        { headers: { "content-type": "text/event-stream", "cache-control": "no-cache" } },
      );
    }
    return new Response(COMPLETION, { headers: { "content-type": "application/json" } });
  });
}

function bare(): Deno.HttpServer<Deno.NetAddr> {
  return Deno.serve(
    { port: 0, hostname: "127.0.0.1", onListen: () => {} },
    () => new Response("Hello, world"),
  );
}

/** The floor for any proxy on this runtime: forward the body, relay the answer as a stream. */
function passthrough(target: string): Deno.HttpServer<Deno.NetAddr> {
  const url = `${target}/chat/completions`;
  return Deno.serve({ port: 0, hostname: "127.0.0.1", onListen: () => {} }, async (req) => {
    const res = await fetch(url, {
      method: "POST",
      headers: { "content-type": "application/json", authorization: "Bearer master" },
      body: req.body,
    });
    return new Response(res.body, {
      status: res.status,
      headers: { "content-type": res.headers.get("content-type") ?? "application/json" },
    });
  });
}

if (import.meta.main) {
  const [role, arg] = Deno.args;
  const server = role === "upstream"
    ? upstream()
    : role === "bare"
    ? bare()
    : role === "passthrough" && arg
    ? passthrough(arg)
    : null;
  if (!server) {
    console.error("usage: bench_servers.ts upstream|bare|passthrough <upstream-url>");
    Deno.exit(2);
  }
  console.log(JSON.stringify({ port: server.addr.port }));
}
