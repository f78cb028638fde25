/**
 * `deno task report` for people: --user by id or e-mail (an unknown one is an error naming it,
 * exit 2), money with two decimals or `<$0.01` everywhere, and no control character or bidi
 * override from a profile reaching a terminal or a spreadsheet.
 */
import assert from "node:assert/strict";
import { keys } from "../../lib/core/kv.ts";
import { formatUsd, printable } from "../../lib/core/format.ts";
import { buildReport, csvField, reportCsv, reportTable } from "../../lib/reports/report.ts";
import { recordUsage } from "../../lib/usage/usage.ts";
import type { UserRecord } from "../../lib/identity/users.ts";
import { NOW, PRICING, seedUsage, tempKvPath } from "../support/cost_fixtures.ts";
import { runReport } from "../support/helpers.ts";

/** Every character the contract says must not get through (C0, DEL, C1, the bidi controls). */
const HOSTILE = "\u001b]0;pwned\u0007\u001b[2J\u202e\u202a\u2066\u2069\u0085\u007f";
const EVIL_EMAIL = `${HOSTILE}=HYPERLINK("http://evil")@example.com`;

function record(id: string, email: string | null): UserRecord {
  return {
    id,
    email,
    firstName: null,
    lastName: null,
    status: "active",
    createdAt: "2026-03-01T00:00:00.000Z",
    updatedAt: "2026-03-01T00:00:00.000Z",
    key: null,
    limits: {},
    profileKnown: true,
  };
}

Deno.test("money reads the same everywhere: two decimals, <$0.01 below a cent", () => {
  for (
    const [n, text] of [
      [0, "$0.00"],
      [0.000001, "<$0.01"],
      [0.005, "<$0.01"],
      [0.0099, "<$0.01"],
      [0.01, "$0.01"],
      [0.0149, "$0.01"],
      [1.50708, "$1.51"],
      [1234.5, "$1,234.50"],
    ] as const
  ) assert.equal(formatUsd(n), text, String(n));
});

Deno.test("printable: control characters and the bidi overrides are removed", () => {
  assert.equal(printable(`a${HOSTILE}b`), "a]0;pwned[2Jb");
  for (let c = 0x202a; c <= 0x202e; c++) {
    assert.equal(printable(`x${String.fromCharCode(c)}y`), "xy");
  }
  for (let c = 0x2066; c <= 0x2069; c++) {
    assert.equal(printable(`x${String.fromCharCode(c)}y`), "xy");
  }
  // What people write stays: accents, CJK, emoji, the zero-width joiner of an emoji sequence.
  assert.equal(printable("Zoë 张伟 👩‍💻"), "Zoë 张伟 👩‍💻");
  // CSV: stripped first, so a formula hidden behind a control character is still neutralised.
  assert.equal(csvField(`\u202e=1+2`), "'=1+2");
  assert.equal(csvField(`\u0007\u2066@SUM(A1)`), "'@SUM(A1)");
  assert.equal(csvField(`\u001b[31mred`), "[31mred");
  assert.equal(csvField(`-\u0007x`), "'-x");
  assert.equal(csvField(12.5), "12.5");
});

Deno.test("table and CSV of a hostile e-mail: nothing a terminal or spreadsheet acts on", async () => {
  const kv = await Deno.openKv(":memory:");
  try {
    await kv.set(keys.user("user_evil"), record("user_evil", EVIL_EMAIL));
    await recordUsage(kv, PRICING, {
      userId: "user_evil",
      model: "glm-4.6",
      promptTokens: 1000,
      completionTokens: 10,
      at: NOW,
    });
    const range = { from: "2026-03-10", to: "2026-03-10", now: NOW };
    const table = reportTable(await buildReport(kv, PRICING, range));
    const csv = reportCsv(await buildReport(kv, PRICING, { ...range, perDay: true }));
    // Nothing unprintable but the line ends.
    // deno-lint-ignore no-control-regex
    const FORBIDDEN = /[\u0000-\u0009\u000b-\u001f\u007f-\u009f\u202a-\u202e\u2066-\u2069]/;
    for (const text of [table, csv]) {
      assert.doesNotMatch(text.replaceAll("\r\n", "\n"), FORBIDDEN);
    }
    const row = csv.split("\r\n")[1];
    assert.equal(
      row,
      `2026-03-10,user_evil,"]0;pwned[2J=HYPERLINK(""http://evil"")@example.com",1,1000,10,1010,0.000622`,
    );
    assert.match(table, /user_evil\s+\]0;pwned\[2J=HYPERLINK/);
    assert.match(table, /<\$0\.01\n/);
  } finally {
    kv.close();
  }
});

Deno.test("deno task report --user: an id or an e-mail; an unknown one is exit 2, named", async (t) => {
  const { path, cleanup } = await tempKvPath();
  try {
    const kv = await Deno.openKv(path);
    await seedUsage(kv);
    await kv.set(keys.user("user_twin_a"), record("user_twin_a", "twin@example.com"));
    await kv.set(keys.user("user_twin_b"), record("user_twin_b", "Twin@Example.com"));
    kv.close();
    const run = (args: string[]) =>
      runReport(
        ["--from", "2026-03-01", "--to", "2026-03-31", "--format", "json", ...args],
        path,
        { PRICING: JSON.stringify(PRICING) },
      );
    const only = (stdout: string) =>
      JSON.parse(stdout).users.map((u: { userId: string }) => u.userId);

    await t.step("by id, by e-mail in any case, and an id known only from usage", async () => {
      const [byId, byEmail, carol] = await Promise.all([
        run(["--user", "user_bob"]),
        run(["--user", "BOB@example.com"]),
        run(["--user", "user_carol"]),
      ]);
      for (const r of [byId, byEmail, carol]) assert.equal(r.code, 0, r.stderr);
      assert.deepEqual(only(byId.stdout), ["user_bob"]);
      assert.deepEqual(JSON.parse(byEmail.stdout), JSON.parse(byId.stdout));
      assert.deepEqual(only(carol.stdout), ["user_carol"]);
    });

    await t.step("a known user without usage in the range: an empty report, exit 0", async () => {
      const a = await run(["--user", "user_twin_a"]);
      assert.equal(a.code, 0, a.stderr);
      assert.deepEqual(only(a.stdout), []);
    });

    await t.step(
      "unknown ids and e-mails: exit 2, stderr names them, nothing on stdout",
      async () => {
        for (const who of ["nobody", "nobody@example.com", "user_bob_"]) {
          const r = await run(["--user", who]);
          assert.equal(r.code, 2, who);
          assert.match(r.stderr, new RegExp(`--user ${who} matches no user`));
          assert.equal(r.stdout, "");
        }
        const twins = await run(["--user", "TWIN@example.com"]);
        assert.equal(twins.code, 2);
        assert.match(twins.stderr, /is the e-mail of 2 users \(user_twin_a, user_twin_b\)/);
        // A hostile --user is named without its control characters.
        const evil = await run(["--user", `x\u001b[2J\u202ey`]);
        assert.equal(evil.code, 2);
        assert.match(evil.stderr, /--user x\[2Jy matches no user/);
      },
    );
  } finally {
    await cleanup();
  }
});
