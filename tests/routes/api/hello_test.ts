/** Claude Code's probe: GET and HEAD /api/hello answer an empty 200; other /api paths still 404. */
import assert from "node:assert/strict";
import { json, testApp } from "../../support/helpers.ts";

Deno.test("/api/hello answers 200 with no body; unknown /api paths stay 404 JSON", async (t) => {
  const app = await testApp();
  try {
    for (const method of ["HEAD", "GET"]) {
      await t.step(`${method} /api/hello: 200, empty`, async () => {
        const res = await app.request("/api/hello", { method });
        assert.equal(res.status, 200);
        assert.equal(await res.text(), "");
      });
    }
    await t.step("an unknown /api path: 404 not_found JSON", async () => {
      const res = await app.request("/api/hello/there");
      assert.equal(res.status, 404);
      assert.match(res.headers.get("content-type") ?? "", /application\/json/);
      const body = await json<{ error: { code: string } }>(res);
      assert.equal(body.error.code, "not_found");
    });
  } finally {
    await app.close();
  }
});
