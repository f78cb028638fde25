/**
 * CONTRACT §5 "Upstream capacity is shared fairly": requests waiting for an upstream slot are
 * served round-robin by user — a user's second waiting request after every other user's first.
 */
import assert from "node:assert/strict";
import { keys } from "../../lib/core/kv.ts";
import { Rounds, serveOrder } from "../../lib/limits/upstream/slots.ts";
import { bearer, eventually, serveGateway } from "../support/helpers.ts";

/** Gives rounds to places arriving in this order on an empty line; returns the serving order. */
function served(arrivals: string[], line: Array<{ user: string; round: number }> = []) {
  const rounds = new Rounds(line);
  return serveOrder(arrivals.map((id) => ({ id, user: id[0], round: rounds.next(id[0]) })))
    .map((p) => p.id);
}

Deno.test("rounds: a user's second waiting request after every other user's first, arrival order within a round", () => {
  assert.deepEqual(
    served(["a1", "a2", "a3", "b1", "c1", "b2", "a4", "c2"]),
    ["a1", "b1", "c1", "a2", "b2", "c2", "a3", "a4"],
  );
  assert.deepEqual(served([]), []);
});

Deno.test("rounds: a newcomer joins the round being served, behind nobody's second", () => {
  // a's rounds 0–2 were served; rounds 3–5 wait. b arrives: round 3, before a's 4 and 5.
  const line = [3, 4, 5].map((round) => ({ user: "a", round }));
  const rounds = new Rounds(line);
  assert.equal(rounds.next("b"), 3);
  assert.equal(rounds.next("b"), 4);
  assert.equal(rounds.next("a"), 6);
  // A line that emptied starts again at 0 for everyone.
  assert.equal(new Rounds([]).next("a"), 0);
});

Deno.test("three users queue 5 requests each behind one slot: GLM sees them interleaved by user, not in arrival order", async () => {
  const s = await serveGateway(
    { UPSTREAM_CONCURRENCY: '{"glm-4.6": 1}', UPSTREAM_QUEUE_MS: "30000", RATE_LIMIT_RPM: "1000" },
    "user_rr_holder",
  );
  const ask = (key: string, content: string) =>
    fetch(`${s.url}/v1/chat/completions`, {
      method: "POST",
      headers: { ...bearer(key), "content-type": "application/json" },
      body: JSON.stringify({
        model: "glm-4.6",
        stream: true,
        messages: [{ role: "user", content }],
      }),
    }).then(async (res) => ({ status: res.status, text: await res.text() }));
  const answers: Promise<{ status: number; text: string }>[] = [];
  try {
    s.fake.mode = "sse";
    s.fake.holdAfterFirstChunk = true;
    answers.push(ask(s.apiKey, "holder"));
    await eventually(() => s.fake.count === 1);
    const users: Record<string, string> = {};
    for (const name of ["a", "b", "c"]) {
      users[name] = (await s.app.services.users.provision(`user_rr_${name}`)).apiKey;
    }
    // Arrival order: every request of a, then of b, then of c.
    for (const name of ["a", "b", "c"]) {
      for (let i = 1; i <= 5; i++) {
        answers.push(ask(users[name], `${name}${i}`));
        await new Promise((r) => setTimeout(r, 15));
      }
    }
    // Every one of them is in line (its ticket in KV) before the slot frees.
    await eventually(async () => {
      let n = 0;
      for await (const _ of s.app.kv.list({ prefix: keys.upstreamTickets("glm-4.6") })) n++;
      return n === 15;
    });
    assert.equal(s.fake.count, 1, "the others wait for the slot");
    // One answer at a time: each release ends the answer in flight, and the next in line starts.
    for (let served = 1; served <= 15; served++) {
      s.fake.release();
      await eventually(() => s.fake.count === served + 1);
    }
    s.fake.release();
    const results = await Promise.all(answers);
    assert.deepEqual(results.map((r) => r.status), new Array(16).fill(200));
    assert.deepEqual(
      s.fake.requests.map((r) => JSON.parse(r.body).messages[0].content),
      [
        "holder",
        ...["1", "2", "3", "4", "5"].flatMap((i) => ["a", "b", "c"].map((u) => `${u}${i}`)),
      ],
    );
  } finally {
    s.fake.holdAfterFirstChunk = false;
    s.fake.release();
    await Promise.allSettled(answers);
    await s.close();
  }
});
