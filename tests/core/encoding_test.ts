import assert from "node:assert/strict";
import { duplicateJsonKey, withTopLevelString } from "../../lib/core/encoding.ts";

Deno.test("duplicateJsonKey: per object, escapes read, strings skipped", () => {
  assert.equal(duplicateJsonKey('{"a":1,"b":{"a":2},"c":[{"a":3},{"a":4}]}'), null);
  assert.equal(duplicateJsonKey('{"model":"x","m":[1],"model":"y"}'), "model");
  assert.equal(duplicateJsonKey('{"a":{"b":1,"b":2}}'), "b");
  assert.equal(duplicateJsonKey('{"mod\\u0065l":"x","model":"y"}'), "model");
  assert.equal(duplicateJsonKey('{"t":"\\"a\\":1,\\"a\\":2","a":1}'), null, "inside a string");
  assert.equal(duplicateJsonKey('[{"a":1},{"a":1}]'), null);
});

Deno.test("withTopLevelString: only the top-level value changes, every other byte stays", () => {
  const body = '{ "seed": 12345678901234567890, "temperature": 1.0, "x": "\\u00e9",\n' +
    '  "tools": [{"model": "nested"}], "metadata": {"model": "deep"}, "model" : "claude-x" }';
  const out = withTopLevelString(body, "model", "glm-5.1")!;
  assert.equal(out, body.replace('"model" : "claude-x"', '"model" : "glm-5.1"'));
  assert.equal(JSON.parse(out).tools[0].model, "nested");
  // A key spelled with escapes, a value needing escapes, no top-level string value: null.
  assert.equal(
    withTopLevelString('{"mod\\u0065l":"a"}', "model", 'q"uote'),
    '{"mod\\u0065l":"q\\"uote"}',
  );
  assert.equal(withTopLevelString('{"model":5,"x":"y"}', "model", "z"), null);
  assert.equal(withTopLevelString('{"a":{"model":"n"}}', "model", "z"), null);
});
