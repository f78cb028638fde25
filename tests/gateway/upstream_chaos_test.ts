/**
 * Upstream chaos under load: the fake GLM randomly answers, errors, stalls and cuts streams.
 * Clients get the contract's errors, and metering matches exactly what was delivered — plus the
 * estimate for the answers that never carried usage (cut streams, stalls) — the moment the last
 * response has ended.
 */
import assert from "node:assert/strict";
import { cutQuietly } from "../../testing/fakes/glm.ts";
import { testApp, usageTotalsOf } from "../support/helpers.ts";

type Behaviour = "json" | "sse" | "error" | "stall" | "cut";
const BEHAVIOURS: Behaviour[] = ["json", "sse", "error", "stall", "cut"];
const USAGE = { prompt_tokens: 5, completion_tokens: 3, total_tokens: 8 };

function chaoticUpstream(choose: () => Behaviour) {
  const enc = new TextEncoder();
  const sse = (obj: unknown) => enc.encode(`data: ${JSON.stringify(obj)}\n\n`);
  const chunk = (extra: Record<string, unknown> = {}) =>
    sse({
      id: "c",
      object: "chat.completion.chunk",
      choices: [{ index: 0, delta: { content: "x" } }],
      ...extra,
    });
  const quiet = { port: 0, hostname: "127.0.0.1", onListen: () => {}, onError: cutQuietly };
  return Deno.serve(quiet, async (req) => {
    await req.arrayBuffer();
    const behaviour = choose();
    switch (behaviour) {
      case "json":
        return Response.json({ id: "c", object: "chat.completion", choices: [], usage: USAGE });
      case "error":
        return Response.json({ error: { message: "overloaded" } }, { status: 503 });
      case "stall":
        await new Promise((r) => setTimeout(r, 600));
        return Response.json({ late: true, usage: USAGE });
      case "sse":
      case "cut": {
        let step = 0;
        return new Response(
          new ReadableStream({
            async pull(c) {
              await new Promise((r) => setTimeout(r, 2));
              if (step === 0) c.enqueue(chunk());
              else if (behaviour === "cut") c.error(new Error("cut"));
              else if (step === 1) c.enqueue(chunk({ usage: USAGE }));
              else {
                c.enqueue(enc.encode("data: [DONE]\n\n"));
                c.close();
              }
              step++;
            },
          }),
          { headers: { "content-type": "text/event-stream" } },
        );
      }
    }
  });
}

Deno.test("upstream chaos: contract errors to clients, usage consistent with delivery", async () => {
  let i = 0;
  // Round-robin with a twist so every behaviour occurs many times, deterministically.
  const upstream = chaoticUpstream(() => BEHAVIOURS[(i++ * 7) % BEHAVIOURS.length]);
  const app = await testApp({
    GLM_BASE_URL: `http://127.0.0.1:${upstream.addr.port}`,
    UPSTREAM_TIMEOUT_MS: "250",
    RATE_LIMIT_RPM: "100000",
  });
  try {
    const { apiKey } = await app.services.users.provision("user_chaos");
    const N = 60;
    const delivered = { prompt: 0, completion: 0 };
    // Answers without usage are charged their estimate: the prompt ("user", "hi" and 4 per
    // message: 6) and, for a cut stream, the relayed "x" (1).
    const estimated = { cuts: 0, timeouts: 0 };
    const seen = new Map<number, number>();
    let next = 0;
    const worker = async () => {
      while (next < N) {
        next++;
        const res = await app.request("/v1/chat/completions", {
          method: "POST",
          headers: { authorization: `Bearer ${apiKey}`, "content-type": "application/json" },
          body: JSON.stringify({ model: "glm-4.6", messages: [{ role: "user", content: "hi" }] }),
        });
        seen.set(res.status, (seen.get(res.status) ?? 0) + 1);
        const type = res.headers.get("content-type") ?? "";
        if (res.status === 200 && type.includes("event-stream")) {
          let text = "";
          try {
            for await (const part of res.body!.pipeThrough(new TextDecoderStream())) text += part;
          } catch { /* a cut stream errors on the client too */ }
          let metered = false;
          for (const line of text.split("\n")) {
            if (!line.startsWith("data: {")) continue;
            const usage = JSON.parse(line.slice(6)).usage;
            if (usage) {
              metered = true;
              delivered.prompt += usage.prompt_tokens;
              delivered.completion += usage.completion_tokens;
            }
          }
          if (!metered) estimated.cuts++;
        } else if (res.status === 200) {
          const body = await res.json();
          delivered.prompt += body.usage.prompt_tokens;
          delivered.completion += body.usage.completion_tokens;
        } else {
          const body = await res.json();
          if (res.status === 504) {
            assert.equal(body.error.code, "upstream_timeout");
            estimated.timeouts++;
          } else assert.equal(res.status, 503, `unexpected ${res.status}: ${JSON.stringify(body)}`);
        }
      }
    };
    await Promise.all(Array.from({ length: 8 }, worker));
    assert.deepEqual([...seen.keys()].sort(), [200, 503, 504]);

    // Every response has ended: every request is counted, with no wait.
    assert.ok(estimated.cuts > 0 && estimated.timeouts > 0, JSON.stringify(estimated));
    const totals = await usageTotalsOf(app.kv, "user_chaos");
    // An upstream 5xx is not the user's doing: not counted (CONTRACT §5 "Upstream refusals").
    const failed = seen.get(503) ?? 0;
    assert.ok(failed > 0);
    assert.equal(totals.requests, N - failed, "every request the upstream served is counted once");
    assert.equal(totals.prompt, delivered.prompt + 6 * (estimated.cuts + estimated.timeouts));
    assert.equal(totals.completion, delivered.completion + estimated.cuts);
    // The server keeps serving afterwards.
    assert.equal((await app.request("/health")).status, 200);
  } finally {
    await app.close();
    await upstream.shutdown();
  }
});
