/**
 * Connect endpoints (CONTRACT §5 "Connecting an editor"): the token exchange of the PKCE flow and
 * the device-code flow's start and poll. No session here: the editor proves itself with the code
 * (and its PKCE verifier) that the signed-in browser handed it.
 */
import { type Context, Hono } from "hono";
import { z } from "zod";
import type { Services } from "../../lib/core/services.ts";
import type { ProvisionResult } from "../../lib/identity/users.ts";
import type { Grant } from "../../lib/identity/connect.ts";
import type { DeviceStartBody } from "../../lib/api_types.ts";
import { AppError } from "../../lib/core/errors.ts";
import { userDisabled } from "../../lib/limits/policy.ts";
import { type AppEnv, jsonBody } from "../context.ts";
import { addressBucket, clientAddress } from "../client_address.ts";
import { issueKey, keyBody } from "./key.ts";

/**
 * The key an approval created, as the editor exchanges it: read now (revoked meanwhile →
 * invalid_grant), refused for a disabled or deleted user. A grant without a key id (shared mode)
 * hands out the user's key as /api/key does.
 */
export async function grantedKey(services: Services, grant: Grant): Promise<ProvisionResult> {
  if (grant.keyId === null) {
    return await issueKey(services, grant.userId, undefined, { fresh: true });
  }
  const result = await services.users.appKey(grant.userId, grant.keyId);
  if (result?.user.status === "disabled") throw userDisabled({});
  if (result?.user.status === "deleted") {
    throw new AppError("user_deleted", "This account has been deleted.");
  }
  if (!result) {
    throw new AppError(
      "invalid_grant",
      "The key this approval created has been revoked since; connect again.",
    );
  }
  return result;
}

/** A client's display name: printable, short; shown escaped on the approve pages. */
export const clientName = z.string().trim().min(1, "must not be empty").max(
  64,
  "must be at most 64 characters",
).regex(/^[^\p{Cc}\p{Cf}]+$/u, "must not contain control characters");

const tokenSchema = z.object({
  code: z.string().min(1).max(100),
  code_verifier: z.string().min(1).max(128),
});
const deviceSchema = z.object({ client: clientName });
const deviceTokenSchema = z.object({ deviceCode: z.string().min(1).max(100) });

export function connectApiRoutes(services: Services) {
  const { config, connect } = services;
  const app = new Hono<AppEnv>();

  // Token answers carry a credential: never cached (RFC 6749 §5.1).
  const keyAnswer = (c: Context<AppEnv>, result: ProvisionResult) => {
    c.header("cache-control", "no-store");
    return c.json(keyBody(config, result), 200);
  };

  app.post("/connect/token", async (c) => {
    const body = await jsonBody(c, tokenSchema);
    const grant = await connect.redeemCode(body.code, body.code_verifier);
    return keyAnswer(c, await grantedKey(services, grant));
  });

  app.post("/connect/device", async (c) => {
    const { client } = await jsonBody(c, deviceSchema);
    const address = clientAddress(c);
    const start = await connect.startDevice(client, address, address && addressBucket(address));
    const verificationUri = `${config.publicUrl}/connect/device`;
    c.header("cache-control", "no-store");
    return c.json(
      {
        deviceCode: start.deviceCode,
        userCode: start.userCode,
        verificationUri,
        verificationUriComplete: `${verificationUri}?code=${start.userCode}`,
        expiresIn: start.expiresIn,
        interval: start.interval,
      } satisfies DeviceStartBody,
    );
  });

  app.post("/connect/device/token", async (c) => {
    const { deviceCode } = await jsonBody(c, deviceTokenSchema);
    const grant = await connect.pollDevice(deviceCode);
    return keyAnswer(c, await grantedKey(services, grant));
  });
  return app;
}
