import assert from "node:assert/strict";
import { parseProfileFlags, selfTimes } from "../../tasks/profile.ts";

Deno.test("profile flags: defaults, values and errors that name the flag", () => {
  assert.deepEqual(parseProfileFlags([]), {
    scenario: "proxy",
    seconds: 10,
    connections: 32,
    top: 25,
  });
  assert.deepEqual(
    parseProfileFlags(["--scenario", "messages", "--users=5000", "--out", "p.cpuprofile"]),
    {
      scenario: "messages",
      seconds: 10,
      connections: 32,
      users: 5000,
      top: 25,
      out: "p.cpuprofile",
    },
  );
  assert.equal(parseProfileFlags(["--help"]), null);
  assert.throws(() => parseProfileFlags(["--scenario", "warp"]), /--scenario must be one of/);
  assert.throws(() => parseProfileFlags(["--users", "0"]), /--users/);
  assert.throws(() => parseProfileFlags(["--top", "x"]), /--top/);
  assert.throws(() => parseProfileFlags(["--out"]), /--out needs a value/);
});

Deno.test("profile: self time per function and file, idle and the inspector's own work left out", () => {
  const root = "/repo/";
  const frame = (functionName: string, url: string, lineNumber = 0) => ({
    functionName,
    url,
    lineNumber,
    columnNumber: 0,
  });
  const profile = {
    nodes: [
      { id: 1, callFrame: frame("(root)", "") },
      { id: 2, callFrame: frame("handle", "file:///repo/lib/gateway/gateway.ts", 61) },
      { id: 3, callFrame: frame("plan", "file:///repo/lib/limits/admission.ts", 303) },
      { id: 4, callFrame: frame("(idle)", "") },
      { id: 5, callFrame: frame("op_inspector_emit_protocol_event", "") },
      { id: 6, callFrame: frame("emit", "ext:deno_node/inspector_network_bridge.js") },
      { id: 7, callFrame: frame("attempt", "file:///repo/lib/limits/admission.ts", 247) },
    ],
    startTime: 0,
    endTime: 900,
    // Each sample lasts until the next one: 100 µs apart.
    samples: [2, 3, 3, 3, 4, 5, 6, 7, 7],
    timeDeltas: [0, 100, 100, 100, 100, 100, 100, 100, 100],
  };
  const t = selfTimes(profile, root);
  assert.equal(t.idleMs, 0.1);
  assert.equal(t.inspectorMs, 0.2);
  assert.equal(Math.round(t.totalMs * 1000), 600);
  assert.deepEqual(t.functions.map((r) => [r.name, r.where, Math.round(r.selfMs * 1000)]), [
    ["plan", "lib/limits/admission.ts:304", 300],
    ["attempt", "lib/limits/admission.ts:248", 200],
    ["handle", "lib/gateway/gateway.ts:62", 100],
  ]);
  assert.deepEqual(t.files.map((r) => [r.name, Math.round(r.selfMs * 1000)]), [
    ["lib/limits/admission.ts", 500],
    ["lib/gateway/gateway.ts", 100],
  ]);
});
