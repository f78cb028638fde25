/**
 * Refusals that retrying soon cannot fix — the day's requests, the day's tokens, the month's
 * budget — are 403 with x-should-retry: false, a Retry-After until the reset and a message naming
 * the limit and when it resets (CONTRACT §4), on both gateway shapes and shared mode's reports.
 * What a retry soon can fix stays 429.
 */
import assert from "node:assert/strict";
import { bearer, json, testApp } from "../support/helpers.ts";
import { CHAT, drain, type Setup, setup } from "../support/gateway_setup.ts";

/** Seconds from now until 00:00 UTC. */
const untilMidnight = () => 86_400 - (Date.now() % 86_400_000) / 1000;
/** Seconds from now until the 1st of next month, 00:00 UTC. */
const untilNextMonth = () => {
  const now = new Date();
  return (Date.UTC(now.getUTCFullYear(), now.getUTCMonth() + 1, 1) - now.getTime()) / 1000;
};

const RESET_IN = /\(in \d+h\d+m\d+s\)\.$/;

function messages(s: Setup, body: unknown = { ...CHAT, max_tokens: 7 }) {
  return s.app.request("/v1/messages", {
    method: "POST",
    headers: { "x-api-key": s.apiKey, "content-type": "application/json" },
    body: JSON.stringify(body),
  });
}

interface Expected {
  code: string;
  message: RegExp;
  /** Seconds until the reset, as of now. */
  resetIn: number;
}

/** Asserts a terminal refusal: status, headers, then the body in the endpoint's shape. */
async function assertTerminal(res: Response, want: Expected, anthropic = false) {
  assert.equal(res.status, 403);
  assert.match(res.headers.get("content-type") ?? "", /application\/json/);
  assert.equal(res.headers.get("x-should-retry"), "false");
  const retryAfter = Number(res.headers.get("retry-after"));
  assert.ok(Number.isInteger(retryAfter), String(retryAfter));
  assert.ok(Math.abs(retryAfter - want.resetIn) <= 2, `${retryAfter} vs ${want.resetIn}`);
  const body = await json<{ type?: string; error: Record<string, string> }>(res);
  if (anthropic) {
    assert.equal(body.type, "error");
    assert.equal(body.error.type, "permission_error");
  }
  assert.equal(body.error.code, want.code);
  assert.match(body.error.message, want.message);
  assert.match(body.error.message, RESET_IN);
}

async function spend(s: Setup, times: number) {
  for (let i = 0; i < times; i++) {
    const res = await s.chat({ ...CHAT, max_tokens: 7 });
    assert.equal(res.status, 200);
    await drain(res);
  }
}

/** Each limit spent by two requests, then refused on both shapes until its reset. */
const SPENT: Array<
  { name: string; env: Record<string, string>; message: RegExp; resetIn(): number }
> = [
  {
    name: "the day's requests spent: 403 until 00:00 UTC",
    env: { RATE_LIMIT_RPD: "2" },
    message: /^Daily request limit of 2 requests reached; it resets at 00:00 UTC/,
    resetIn: untilMidnight,
  },
  {
    // The fake meters 18 tokens a request, each reserving 13: two use the 36 up exactly.
    name: "the day's tokens used up: 403 until 00:00 UTC",
    env: { TOKEN_LIMIT_DAILY: "36" },
    message: /^The daily token quota of 36 tokens is used up; it resets at 00:00 UTC/,
    resetIn: untilMidnight,
  },
  {
    // glm-4.6 at $0.6 / $2.2 per million: each request costs $0.000022, so two spend $0.000044.
    name: "the month's budget spent: 403 until the 1st of next month",
    env: { BUDGET_USD_MONTHLY: "0.000044" },
    message:
      /^The monthly budget of \$0\.000044 is used up; it resets on the 1st of next month at 00:00 UTC/,
    resetIn: untilNextMonth,
  },
];

for (const limit of SPENT) {
  Deno.test(`${limit.name}, on both shapes`, async () => {
    const s = await setup(limit.env);
    try {
      await spend(s, 2);
      const want = { code: "quota_exceeded", message: limit.message, resetIn: limit.resetIn() };
      await assertTerminal(await s.chat(), want);
      await assertTerminal(await messages(s), want, true);
      assert.equal(s.fake.count, 2);
    } finally {
      await s.close();
    }
  });
}

Deno.test("a reservation larger than what is left of the day's tokens: 403, saying how to fit", async () => {
  const s = await setup({ TOKEN_LIMIT_DAILY: "1000" });
  try {
    // No max_tokens: OUTPUT_RESERVE_TOKENS (4096) output tokens are reserved.
    await assertTerminal(await s.chat(), {
      code: "quota_exceeded",
      message:
        /reserves 4,102 tokens .* 1,000 tokens of the daily token quota of 1,000 tokens are left; lower max_tokens/,
      resetIn: untilMidnight(),
    });
    assert.equal(s.fake.count, 0);
  } finally {
    await s.close();
  }
});

Deno.test("what a retry soon fixes stays 429: the per-minute rate", async () => {
  const s = await setup({ RATE_LIMIT_RPM: "1" });
  try {
    await spend(s, 1);
    const res = await messages(s);
    assert.equal(res.status, 429);
    assert.equal(res.headers.get("x-should-retry"), null);
    assert.ok(Number(res.headers.get("retry-after")) <= 60);
    const body = await json<{ error: Record<string, string> }>(res);
    assert.equal(body.error.type, "rate_limit_error");
    assert.equal(body.error.code, "rate_limit_exceeded");
  } finally {
    await s.close();
  }
});

Deno.test("shared mode: a report once the day's tokens are used up is 403", async () => {
  const app = await testApp({ KEY_MODE: "shared", TOKEN_LIMIT_DAILY: "100" });
  try {
    const { token } = await app.services.sessions.issueLocal("grace@example.test");
    const report = (promptTokens: number) =>
      app.request("/api/usage", {
        method: "POST",
        headers: { ...bearer(token), "content-type": "application/json" },
        body: JSON.stringify({ model: "glm-4.6", promptTokens, completionTokens: 0 }),
      });
    const first = await report(100);
    assert.equal(first.status, 200);
    await first.body?.cancel();
    await assertTerminal(await report(1), {
      code: "quota_exceeded",
      message: /^The daily token quota of 100 tokens is used up; it resets at 00:00 UTC/,
      resetIn: untilMidnight(),
    });
  } finally {
    await app.close();
  }
});
