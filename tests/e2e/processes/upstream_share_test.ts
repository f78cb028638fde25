/**
 * CONTRACT §5 "Upstream capacity is shared fairly", §8: two real app processes on one KV file
 * keep the per-user share of a model's upstream slots exactly — never more than ceil(share ×
 * slots) for one user, whichever process their requests reach — and give every slot back.
 */
import assert from "node:assert/strict";
import { keys, u64 } from "../../../lib/core/kv.ts";
import { processEnv } from "../../support/helpers.ts";
import { ClerkIssuer } from "../../../testing/fakes/clerk_issuer.ts";
import { FakeGlm } from "../../../testing/fakes/glm.ts";
import { type RunningMain, startMain } from "../../support/subprocess.ts";

const issuer = await ClerkIssuer.create();

async function provision(app: RunningMain, userId: string): Promise<string> {
  const res = await fetch(`${app.url}/api/key`, {
    headers: { authorization: `Bearer ${await issuer.token(userId, { ttlSeconds: 600 })}` },
  });
  assert.equal(res.status, 200);
  return (await res.json()).apiKey;
}

function streamChat(app: RunningMain, key: string, content: string) {
  return fetch(`${app.url}/v1/chat/completions`, {
    method: "POST",
    headers: { authorization: `Bearer ${key}`, "content-type": "application/json" },
    body: JSON.stringify({ model: "glm-4.6", stream: true, messages: [{ role: "user", content }] }),
  }).then(async (res) => ({ status: res.status, text: await res.text() }));
}

/** Waits until the fake has seen no new request for `quietMs`. */
async function settled(glm: FakeGlm, quietMs = 400) {
  let count = glm.count;
  let since = Date.now();
  while (Date.now() - since < quietMs) {
    await new Promise((r) => setTimeout(r, 25));
    if (glm.count !== count) {
      count = glm.count;
      since = Date.now();
    }
  }
}

Deno.test("two processes on one KV file: a user never holds more than ceil(share × slots) of a model's slots, whichever process serves them", async () => {
  const dir = await Deno.makeTempDir();
  const kvPath = `${dir}/kv.sqlite3`;
  const glm = new FakeGlm();
  glm.mode = "sse";
  glm.holdAfterFirstChunk = true;
  glm.concurrencyCap = 4;
  const extra = {
    UPSTREAM_CONCURRENCY: '{"glm-4.6": 4}',
    UPSTREAM_USER_SHARE: "0.5",
    UPSTREAM_QUEUE_MS: "30000",
    RATE_LIMIT_RPM: "1000",
  };
  const apps: RunningMain[] = [];
  const answers: Promise<{ status: number; text: string }>[] = [];
  try {
    apps.push(
      await startMain(processEnv(kvPath, glm, issuer, extra), dir),
      await startMain(processEnv(kvPath, glm, issuer, extra), dir),
    );
    const a = await provision(apps[0], "user_share_a");
    const b = await provision(apps[1], "user_share_b");
    // a: eight streams, four through each process; alone, it gets its share and no more.
    for (let i = 0; i < 8; i++) answers.push(streamChat(apps[i % 2], a, `a${i}`));
    await settled(glm);
    const stages: string[][] = [];
    let seen = 0;
    const stage = () => {
      const users = glm.requests.slice(seen).map((r) => JSON.parse(r.body).messages[0].content[0]);
      seen = glm.count;
      stages.push(users);
      return users;
    };
    assert.deepEqual(stage(), ["a", "a"], "a holds ceil(0.5 × 4) = 2 while 2 slots stay free");
    // b: four streams, two through each process: the two free slots are b's at once.
    for (let i = 0; i < 4; i++) answers.push(streamChat(apps[i % 2], b, `b${i}`));
    await settled(glm);
    assert.deepEqual(stage(), ["b", "b"]);
    while (seen < 12) {
      glm.release(); // every answer in flight ends; the next in line take their slots
      await settled(glm);
      stage();
    }
    glm.release();
    const results = await Promise.all(answers);
    assert.deepEqual(results.map((r) => r.status), new Array(12).fill(200));
    for (const users of stages) {
      for (const u of ["a", "b"]) {
        assert.ok(
          users.filter((x) => x === u).length <= 2,
          `${u} held more than its share: ${JSON.stringify(stages)}`,
        );
      }
      assert.ok(users.length <= 4);
    }
    assert.equal(glm.rejectedOverCap, 0);
    console.log(`  who GLM served, stage by stage: ${stages.map((s) => s.join("")).join(" ")}`);
  } finally {
    glm.holdAfterFirstChunk = false;
    glm.release();
    await Promise.allSettled(answers);
    await Promise.all(apps.map((app) => app.stop()));
    await glm.close();
  }
  const kv = await Deno.openKv(kvPath);
  try {
    assert.equal(u64((await kv.get(keys.upstreamHeld("glm-4.6"))).value), 0);
    for (const user of ["user_share_a", "user_share_b"]) {
      const held = await kv.get(keys.upstreamUserHeld("glm-4.6", user));
      assert.ok(held.versionstamp, `${user} held slots`);
      assert.equal(u64(held.value), 0, user);
    }
  } finally {
    kv.close();
    await Deno.remove(dir, { recursive: true });
  }
});
