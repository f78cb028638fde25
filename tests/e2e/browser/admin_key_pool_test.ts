/**
 * /admin's Upstream card with a pool of two GLM keys, one of them left out after GLM refused it,
 * and then none in service: each key by its last 4 characters, the banner for an account-wide
 * outage — audited with axe-core and photographed at desktop and phone widths, light and dark.
 */
import assert from "node:assert/strict";
import { localUserId } from "../../../lib/identity/sessions.ts";
import {
  inspect,
  launchBrowser,
  shotsFolder,
  signedIn,
  startServer,
} from "../../support/browser.ts";
import { FakeGlm } from "../../../testing/fakes/glm.ts";

const OPERATOR = "op@example.com";
const KEY_A = "glm-pool-SECRET-first-0123456789.aaaa";
const KEY_B = "glm-pool-SECRET-second-9876543210.bbbb";

Deno.test("admin: the pool's keys on the Upstream card, one left out, then none in service", async (t) => {
  const fake = new FakeGlm();
  const server = await startServer({
    GLM_BASE_URL: fake.baseUrl,
    GLM_API_KEY: `${KEY_A},${KEY_B}`,
    ADMIN_USER_IDS: await localUserId(OPERATOR),
  });
  const browser = await launchBrowser();
  const { dir, done } = await shotsFolder();
  const shots: string[] = [];
  try {
    const { w, token } = await signedIn(browser, server, OPERATOR);
    const key = await fetch(`${server.url}/api/key`, {
      method: "POST",
      headers: { authorization: `Bearer ${token}` },
    }).then((r) => r.json()).then((b) => String(b.apiKey));
    const chat = () =>
      fetch(`${server.url}/v1/chat/completions`, {
        method: "POST",
        headers: { authorization: `Bearer ${key}`, "content-type": "application/json" },
        body: JSON.stringify({ model: "glm-4.6", messages: [{ role: "user", content: "hi" }] }),
      });
    await t.step("one key out of balance: left out, the other in service", async () => {
      fake.refusedKeys.set(KEY_B, "balance");
      for (let i = 0; i < 3; i++) {
        const res = await chat();
        await res.body?.cancel();
        assert.equal(res.status, 200);
      }
      const page = await w.newPage();
      assert.equal((await page.goto(`${server.url}/admin`))?.status(), 200);
      const keys = page.getByTestId("pool-keys");
      assert.match(await keys.innerText(), /…aaaa\s+in service/);
      assert.match(await keys.innerText(), /…bbbb\s+left out until .+\(balance exhausted\)/);
      assert.equal(await page.getByTestId("no-key-in-service").count(), 0);
      assert.ok(!(await page.content()).includes(KEY_A), "the page holds a pool key");
      await inspect(page, dir, "admin-pool-one-out", shots);
      await page.close();
    });
    await t.step("every key refused: a banner at the top of the card", async () => {
      fake.refusedKeys.set(KEY_A, "key_rejected");
      const res = await chat();
      assert.equal(res.status, 503);
      await res.body?.cancel();
      const page = await w.newPage();
      await page.goto(`${server.url}/admin`);
      assert.match(
        await page.getByTestId("no-key-in-service").innerText(),
        /No GLM key is in service/,
      );
      await inspect(page, dir, "admin-pool-none", shots);
      await page.close();
    });
    assert.deepEqual(w.errors, []);
    await w.context.close();
  } finally {
    await done(shots);
    await browser.close();
    await server.close();
    await fake.close();
  }
});
