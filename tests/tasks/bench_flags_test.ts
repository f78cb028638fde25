import assert from "node:assert/strict";
import { parseBenchFlags } from "../../tasks/bench.ts";

Deno.test("bench flags: defaults, values and errors that name the flag", () => {
  assert.deepEqual(parseBenchFlags([]), { seconds: 10, connections: 32, json: false });
  assert.deepEqual(parseBenchFlags(["--seconds", "3", "--connections=8", "--json"]), {
    seconds: 3,
    connections: 8,
    json: true,
  });
  assert.equal(parseBenchFlags(["--help"]), null);
  assert.throws(() => parseBenchFlags(["--seconds", "0"]), /--seconds/);
  assert.throws(() => parseBenchFlags(["--connections", "lots"]), /--connections/);
  assert.throws(() => parseBenchFlags(["--seconds"]), /--seconds needs a value/);
  assert.throws(() => parseBenchFlags(["--warp"]), /unknown flag --warp/);
  assert.throws(() => parseBenchFlags(["fast"]), /unexpected argument "fast"/);
  assert.throws(
    () => parseBenchFlags(["--seconds", "3", "--seconds", "4"]),
    /--seconds given twice/,
  );
  assert.throws(() => parseBenchFlags(["--json=no"]), /--json takes no value/);
});
