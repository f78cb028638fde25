/**
 * The benchmark's helper processes, one role each, so the servers under test never share a
 * thread with each other or with the load generator: `upstream` (a fake GLM), `bare` (hello),
 * `passthrough <upstream>` (a proxy with no auth, limits or metering) and `floor <upstream>
 * <kv-file>` (the least a gateway under the contract must do, done as plainly as the runtime
 * allows). Each prints `{"port": n}` on its first stdout line once it listens.
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

/**
 * The floor: what every gateway request must cost on this runtime under the contract, with
 * nothing of Keyway's own (no router, config, key hashing, limits arithmetic, estimate, watchdog,
 * log lines, metrics, error shapes). The bearer taken as the user; the body read whole and parsed;
 * one durable commit to admit (the user's rate entry checked and rewritten, a lease written, the
 * held count added) before the upstream call; the answer read whole and its usage parsed; one
 * durable commit to settle before the answer is sent (the lease deleted, the held count taken
 * back, the usage counters, the quota sums, the key's last use, a log entry under its user and
 * its key by time: Keyway's 14 mutations). Commits are grouped as Keyway groups them: what
 * arrives while two are in flight goes into the next, admissions of at most eight users per
 * commit.
 */
async function floor(target: string, kvPath: string): Promise<Deno.HttpServer<Deno.NetAddr>> {
  const kv = await Deno.openKv(kvPath);
  const url = `${target}/chat/completions`;
  const decoder = new TextDecoder();
  const stamps = new Map<string, string | null>();
  type Op = {
    user: string;
    admit: boolean;
    apply: (op: Deno.AtomicOperation) => void;
    done: () => void;
  };
  let queue: Op[] = [];
  let inFlight = 0;
  const pump = () => {
    while (queue.length && inFlight < 2) {
      const batch: Op[] = [];
      const admitting = new Set<string>();
      const rest: Op[] = [];
      for (const op of queue) {
        if (
          op.admit && !admitting.has(op.user) &&
          (admitting.size >= 8 || batch.some((b) => b.admit && b.user === op.user))
        ) {
          rest.push(op);
          continue;
        }
        if (op.admit) admitting.add(op.user);
        batch.push(op);
      }
      queue = rest;
      const atomic = kv.atomic();
      for (const user of admitting) {
        atomic.check({ key: ["rate", user], versionstamp: stamps.get(user) ?? null });
      }
      for (const op of batch) op.apply(atomic);
      inFlight++;
      atomic.commit().then((res) => {
        if (!res.ok) throw new Error("floor: a commit conflicted (one process: it cannot)");
        for (const user of admitting) stamps.set(user, res.versionstamp);
        for (const op of batch) op.done();
      }).finally(() => {
        inFlight--;
        pump();
      });
    }
  };
  const commit = (user: string, admit: boolean, apply: Op["apply"]) =>
    new Promise<void>((done) => {
      queue.push({ user, admit, apply, done });
      pump();
    });
  const day = new Date().toISOString().slice(0, 10);
  const ttl = { expireIn: 7 * 86_400_000 };
  return Deno.serve({ port: 0, hostname: "127.0.0.1", onListen: () => {} }, async (req) => {
    const user = req.headers.get("authorization")?.slice(7) ?? "";
    const bytes = new Uint8Array(await req.arrayBuffer());
    const body = JSON.parse(decoder.decode(bytes));
    if (typeof body.model !== "string") return new Response("no model", { status: 400 });
    const model: string = body.model;
    const id = crypto.randomUUID();
    const at = Date.now();
    await commit(user, true, (op) => {
      op.set(["rate", user], { tat: at, day: 1 });
      op.set(["lease", id], { user, model, tokens: 0, nano: 0, prompt: 12, completion: 0, at });
      op.sum(["held", user], 1n);
    });
    const res = await fetch(url, {
      method: "POST",
      headers: { "content-type": "application/json", authorization: "Bearer master" },
      body: bytes,
    });
    const answer = new Uint8Array(await res.arrayBuffer());
    const usage = JSON.parse(decoder.decode(answer)).usage ?? {};
    const prompt = BigInt(usage.prompt_tokens ?? 0);
    const completion = BigInt(usage.completion_tokens ?? 0);
    await commit(user, false, (op) => {
      op.delete(["lease", id]);
      op.sum(["held", user], (1n << 64n) - 1n);
      const counters = { requests: 1n, prompt, completion };
      for (const [field, n] of Object.entries(counters)) {
        op.sum(["usage_daily", day, user, model, field, "default"], n);
      }
      op.sum(["tokens_by_day", user, day], prompt + completion);
      op.sum(
        ["spend_by_month", user, day.slice(0, 7)],
        prompt * 600n + completion * 2200n,
      );
      op.sum(["usage_day_versions", day], 1n);
      op.max(["key_last_used", user, "default"], BigInt(at));
      const entry = [
        "default",
        "/v1/chat/completions",
        model,
        null,
        0,
        200,
        null,
        Number(prompt),
        Number(completion),
        0,
        0,
        Date.now() - at,
        null,
        0,
        "",
        1,
      ];
      op.set(["request_log_by_user", user, at, id], entry, ttl);
      op.set(["request_log", at, user, id], null, ttl);
    });
    return new Response(answer, {
      status: res.status,
      headers: { "content-type": res.headers.get("content-type") ?? "application/json" },
    });
  });
}

if (import.meta.main) {
  const [role, arg, arg2] = Deno.args;
  const server = role === "upstream"
    ? upstream()
    : role === "bare"
    ? bare()
    : role === "passthrough" && arg
    ? passthrough(arg)
    : role === "floor" && arg && arg2
    ? await floor(arg, arg2)
    : null;
  if (!server) {
    console.error(
      "usage: bench_servers.ts upstream|bare|passthrough <upstream-url>|floor <upstream-url> <kv-file>",
    );
    Deno.exit(2);
  }
  console.log(JSON.stringify({ port: server.addr.port }));
}
