/**
 * Connect pages (CONTRACT §5, §6): `/connect` approves a PKCE redirect request, `/connect/device`
 * approves a device code. Both sign the visitor in first (and come back), say which account
 * approves (with a way to switch), which client asks, what it gets and where it goes, and take the
 * decision as a same-origin form POST. Each approval creates that client's own key.
 */
import { type Context, Hono } from "hono";
import type { ComponentChildren } from "preact";
import { renderToString } from "preact-render-to-string";
import { z } from "zod";
import { Layout } from "../../components/Layout.tsx";
import { AppError } from "../../lib/core/errors.ts";
import { formatAgo } from "../../lib/core/format.ts";
import { keyCount, tooManyKeys } from "../../lib/identity/users.ts";
import type { Services } from "../../lib/core/services.ts";
import {
  connectRedirect,
  type DeviceRequest,
  type Grant,
  type RedirectTarget,
  redirectWith,
} from "../../lib/identity/connect.ts";
import type { Session } from "../../lib/identity/sessions.ts";
import { clientName } from "../api/connect.ts";
import { issueKey } from "../api/key.ts";
import { safeRedirectPath } from "../redirect.ts";
import { type AppEnv, assertSameOrigin, readSession } from "../context.ts";
import { clerkScript } from "./render.tsx";

type Status = 200 | 400 | 403 | 429;

/** The PKCE request as `/connect` receives it (query) and posts it back (form). */
const pkceSchema = z.object({
  client: clientName,
  redirect_uri: z.string().min(1, "is required").max(1024),
  code_challenge: z.string().regex(
    /^[A-Za-z0-9_-]{43}$/,
    "must be the base64url SHA-256 of the code verifier (43 characters)",
  ),
  code_challenge_method: z.literal("S256", { message: "must be S256" }),
  state: z.string().max(512, "must be at most 512 characters").optional(),
});

const decisionSchema = pkceSchema.extend({ decision: z.enum(["approve", "cancel"]) });

const deviceFormSchema = z.object({
  code: z.string().trim().max(32, "is too long").default(""),
  action: z.enum(["lookup", "approve", "deny"]),
});

export function connectPageRoutes(services: Services) {
  const { config, users, connect } = services;
  const app = new Hono<AppEnv>();
  const clerk = clerkScript(config);

  /** The signed-in account as people know it: its e-mail, else its id. */
  const accountOf = async (session: Session) =>
    session.email ?? (await users.get(session.userId).catch(() => null))?.email ??
      session.userId;

  const page = async (
    c: Context<AppEnv>,
    session: Session | null,
    title: string,
    body: ComponentChildren,
    status: Status = 200,
  ) => {
    const signedInAs = session ? await accountOf(session) : null;
    const html = renderToString(
      <Layout
        title={title}
        localMode={config.localMode}
        signedInAs={signedInAs}
        isAdmin={session ? config.adminUserIds.has(session.userId) : false}
        path={c.req.path}
        clerk={clerk}
      >
        <div class="connect">{body}</div>
      </Layout>,
    );
    c.header("cache-control", "no-store");
    return c.html("<!doctype html>" + html, status);
  };

  const problem = (
    c: Context<AppEnv>,
    session: Session | null,
    heading: string,
    message: string,
    status: Status,
  ) =>
    page(
      c,
      session,
      heading,
      <div class="card connect-card">
        <h1>{heading}</h1>
        <p class="notice notice-error" role="alert">{message}</p>
        <p class="muted small">
          Nothing was sent to the app. Start again from your editor, or{" "}
          <a href="/dashboard">go to your dashboard</a>.
        </p>
      </div>,
      status,
    );

  /** MAX_KEYS_PER_USER reached: why nothing can be approved, and where keys are revoked. */
  const keysFull = (c: Context<AppEnv>, session: Session, client: string, status: Status) =>
    page(
      c,
      session,
      "Too many keys",
      <div class="card connect-card">
        <span class="eyebrow">Connect an app</span>
        <h1>
          <span class="connect-client">{client}</span> cannot be connected yet
        </h1>
        <p class="notice notice-error" role="alert" data-testid="keys-full">
          {tooManyKeys(config.maxKeysPerUser).message}
        </p>
        <p>
          <a class="btn btn-primary" href="/dashboard#connected-apps">
            Revoke keys on the dashboard
          </a>
        </p>
        <p class="muted small">
          Nothing was created and nothing was sent to{" "}
          {client}. Once a key is revoked, start again from {client}.
        </p>
      </div>,
      status,
    );

  /** True when the user may hold one more key (a user not provisioned yet holds none). */
  const roomForKey = async (userId: string) => {
    if (config.keyMode === "shared") return true;
    const user = await users.get(userId);
    return !user || keyCount(user) < config.maxKeysPerUser;
  };

  /**
   * Provisions the user, then creates the client's own key (proxy mode; in shared mode the
   * editor gets what /api/key gives). An AppError says why not: disabled, deleted, too many keys.
   */
  const approve = async (
    session: Session,
    client: string,
    flow: "redirect" | "device",
  ): Promise<Grant> => {
    await issueKey(services, session.userId, profileOf(session), { fresh: true });
    if (config.keyMode === "shared") return { userId: session.userId, keyId: null };
    const created = await users.createAppKey(
      session.userId,
      { name: client, flow },
      config.maxKeysPerUser,
    );
    return { userId: session.userId, keyId: created.app.id };
  };

  /** Sign in first, then back to this page (GET) with its query. */
  const signInFirst = (c: Context<AppEnv>, back: string) => {
    const redirect = safeRedirectPath(back) ?? "/dashboard";
    return c.redirect(`/sign-in?redirect=${encodeURIComponent(redirect)}`, 303);
  };

  /** A cookie write from another site is refused here as on the API (CONTRACT §3), as a page. */
  const sameOrigin = (c: Context<AppEnv>) => {
    try {
      assertSameOrigin(c, services);
      return null;
    } catch (err) {
      if (err instanceof AppError) return err.message;
      throw err;
    }
  };

  /** Validates a PKCE request; the redirect target is re-checked on every GET and POST. */
  const pkceRequest = <S extends typeof pkceSchema>(schema: S, raw: unknown) => {
    const parsed = schema.safeParse(raw);
    if (!parsed.success) {
      const issue = parsed.error.issues[0];
      return { error: `${issue.path.map(String).join(".") || "request"}: ${issue.message}` };
    }
    const target = connectRedirect(parsed.data.redirect_uri, config.connectRedirectSchemes);
    if (!target) {
      return {
        error: "redirect_uri: only " + config.connectRedirectSchemes.map((s) => `${s}://`)
          .join(", ") +
          ", http://127.0.0.1:<port>/… and http://localhost:<port>/… are allowed",
      };
    }
    return { request: parsed.data as z.infer<S>, target };
  };

  app.get("/connect", async (c) => {
    const found = await readSession(c, services);
    const session = found?.session ?? null;
    const checked = pkceRequest(pkceSchema, c.req.query());
    if ("error" in checked) {
      return problem(c, session, "This connection link is not valid", checked.error!, 400);
    }
    const url = new URL(c.req.url);
    if (!session) return signInFirst(c, url.pathname + url.search);
    const { request, target } = checked;
    if (!(await roomForKey(session.userId))) return keysFull(c, session, request.client, 200);
    c.set("formAction", target.cspSource);
    return page(
      c,
      session,
      `Connect ${request.client}`,
      <ApproveCard
        account={await accountOf(session)}
        back={url.pathname + url.search}
        request={request}
        target={target}
      />,
    );
  });

  app.post("/connect", async (c) => {
    const form = Object.fromEntries(
      Object.entries(await c.req.parseBody()).map(([k, v]) => [k, String(v)]),
    );
    const found = await readSession(c, services);
    const session = found?.session ?? null;
    const checked = pkceRequest(decisionSchema, form);
    if ("error" in checked) {
      return problem(c, session, "This connection request is not valid", checked.error!, 400);
    }
    const { request, target } = checked;
    const { decision: _, ...query } = request;
    if (!session) return signInFirst(c, `/connect?${new URLSearchParams(query)}`);
    const refused = sameOrigin(c);
    if (refused) return problem(c, session, "Request refused", refused, 403);
    if (request.decision === "cancel") {
      return c.redirect(
        redirectWith(target, { error: "access_denied", state: request.state }),
        303,
      );
    }
    let grant: Grant;
    try {
      grant = await approve(session, request.client, "redirect");
    } catch (err) {
      if (!(err instanceof AppError)) throw err;
      if (err.code === "forbidden") return keysFull(c, session, request.client, 403);
      return problem(c, session, "Your key cannot be handed out", err.message, 403);
    }
    const code = await connect.issueCode(grant, request.code_challenge, request.client);
    return c.redirect(redirectWith(target, { code, state: request.state }), 303);
  });

  app.get("/connect/device", async (c) => {
    const found = await readSession(c, services);
    const url = new URL(c.req.url);
    if (!found) return signInFirst(c, url.pathname + url.search);
    const code = (c.req.query("code") ?? "").slice(0, 32);
    return page(
      c,
      found.session,
      "Connect a device",
      <DeviceCodeForm
        code={code}
        account={await accountOf(found.session)}
        back={url.pathname + url.search}
      />,
    );
  });

  app.post("/connect/device", async (c) => {
    const form = Object.fromEntries(
      Object.entries(await c.req.parseBody()).map(([k, v]) => [k, String(v)]),
    );
    const found = await readSession(c, services);
    const parsed = deviceFormSchema.safeParse(form);
    const code = parsed.success ? parsed.data.code : "";
    if (!found) {
      return signInFirst(c, `/connect/device${code ? `?code=${encodeURIComponent(code)}` : ""}`);
    }
    const session = found.session;
    const refused = sameOrigin(c);
    if (refused) return problem(c, session, "Request refused", refused, 403);
    if (!parsed.success) {
      const issue = parsed.error.issues[0];
      return problem(
        c,
        session,
        "This request is not valid",
        `${issue.path.join(".")}: ${issue.message}`,
        400,
      );
    }
    const { action } = parsed.data;
    const account = await accountOf(session);
    const back = `/connect/device${code ? `?code=${encodeURIComponent(code)}` : ""}`;
    const form400 = (message: string, status: Status) =>
      page(
        c,
        session,
        "Connect a device",
        <DeviceCodeForm code={code} error={message} account={account} back={back} />,
        status,
      );
    if (code === "") return form400("Enter the code shown in your editor.", 400);
    let request: DeviceRequest | null;
    try {
      request = await connect.findDevice(session.userId, code);
    } catch (err) {
      if (err instanceof AppError && err.code === "rate_limit_exceeded") {
        c.header("retry-after", err.headers["retry-after"]);
        return form400(err.message, 429);
      }
      throw err;
    }
    if (!request) {
      return form400("That code is not valid or has expired. Check it and try again.", 400);
    }
    if (request.status !== "pending") {
      return page(
        c,
        session,
        "Already decided",
        <div class="card connect-card">
          <h1>This code was already {request.status}</h1>
          <p class="muted">Start again from {request.client} if you need a new code.</p>
        </div>,
      );
    }
    if (action === "lookup") {
      if (!(await roomForKey(session.userId))) return keysFull(c, session, request.client, 200);
      return page(
        c,
        session,
        `Connect ${request.client}`,
        <DeviceConfirm
          request={request}
          account={account}
          back={back}
          ago={request.startedAt === null ? null : formatAgo(services.clock() - request.startedAt)}
        />,
      );
    }
    let grant: Grant | "deny" = "deny";
    if (action === "approve") {
      try {
        grant = await approve(session, request.client, "device");
      } catch (err) {
        if (!(err instanceof AppError)) throw err;
        if (err.code === "forbidden") return keysFull(c, session, request.client, 403);
        return problem(c, session, "Your key cannot be handed out", err.message, 403);
      }
    }
    if (!(await connect.decideDevice(code, grant))) {
      // Decided elsewhere or expired meanwhile: the key made for it would serve no one.
      if (grant !== "deny" && grant.keyId) await users.revokeAppKey(grant.userId, grant.keyId);
      return form400("That code is no longer waiting for approval.", 400);
    }
    return page(
      c,
      session,
      action === "approve" ? "Connected" : "Request denied",
      <div class="card connect-card" role="status">
        <h1>{action === "approve" ? `${request.client} is connected` : "Request denied"}</h1>
        <p class="muted">
          {action === "approve"
            ? `Go back to ${request.client}: it receives your key in a few seconds. You can close this tab.`
            : `${request.client} gets nothing. You can close this tab.`}
        </p>
      </div>,
    );
  });

  return app;
}

const profileOf = (session: Session) =>
  session.email ? { email: session.email, firstName: null, lastName: null } : undefined;

function Grants(props: { client: string }) {
  return (
    <>
      <h2 class="connect-subtitle">{props.client} will get</h2>
      <ul class="connect-grants">
        <li>
          <strong>A Keyway API key of its own</strong>{" "}
          and base URL, for this account. It is listed under Connected apps on your dashboard, where
          you can revoke it at any time without touching your other keys.
        </li>
        <li>
          Use of the GLM models, <strong>counted against your limits and usage</strong>{" "}
          (the same limits as all your keys together).
        </li>
      </ul>
    </>
  );
}

/** Which account approves, and a way to approve as another (sign out, sign in, come back). */
function Account(props: { account: string; back: string }) {
  return (
    <div class="connect-account" data-testid="connect-account">
      <span class="muted small">Approving as</span> <strong>{props.account}</strong>
      <form method="post" action="/auth/sign-out" data-clerk-sign-out="" data-redirect={props.back}>
        <input type="hidden" name="redirect" value={props.back} />
        <button class="btn btn-sm btn-link" type="submit">Not you? Switch account</button>
      </form>
    </div>
  );
}

function ApproveCard(props: {
  account: string;
  back: string;
  request: z.infer<typeof pkceSchema>;
  target: RedirectTarget;
}) {
  const { request, target } = props;
  const local = target.url.protocol === "http:";
  return (
    <div class="card connect-card">
      <span class="eyebrow">Connect an app</span>
      <h1>
        <span class="connect-client">{request.client}</span> wants a Keyway key
      </h1>
      <Account account={props.account} back={props.back} />
      <Grants client={request.client} />
      <dl class="kv connect-target">
        <dt>Sent to</dt>
        <dd>
          <code>{target.label}</code>
          <span class="connect-note muted small">
            {local ? "An app on this computer" : "Opens the app registered for this kind of link"}
          </span>
        </dd>
      </dl>
      <p class="muted small">
        Approve only if you started this from {request.client}{" "}
        just now. To cut it off later, revoke its key under Connected apps on your dashboard.
      </p>
      <form method="post" action="/connect" class="connect-actions">
        <input type="hidden" name="client" value={request.client} />
        <input type="hidden" name="redirect_uri" value={request.redirect_uri} />
        <input type="hidden" name="code_challenge" value={request.code_challenge} />
        <input type="hidden" name="code_challenge_method" value="S256" />
        {request.state !== undefined && <input type="hidden" name="state" value={request.state} />}
        <button class="btn btn-primary btn-lg" type="submit" name="decision" value="approve">
          Approve
        </button>
        <button class="btn btn-lg" type="submit" name="decision" value="cancel">Cancel</button>
      </form>
    </div>
  );
}

function DeviceCodeForm(props: { code: string; error?: string; account: string; back: string }) {
  return (
    <div class="card connect-card">
      <span class="eyebrow">Connect a device</span>
      <h1>Enter the code shown in your editor</h1>
      <Account account={props.account} back={props.back} />
      <p class="muted">
        Check that it matches what your editor or terminal shows, then continue.
      </p>
      {props.error && <p class="notice notice-error" role="alert">{props.error}</p>}
      <form method="post" action="/connect/device">
        <div class="field">
          <label for="user-code">Code</label>
          <input
            id="user-code"
            class="connect-code-input"
            name="code"
            type="text"
            value={props.code}
            required
            maxlength={32}
            autocomplete="off"
            autocapitalize="characters"
            spellcheck={false}
            placeholder="BCDF-GHJK"
          />
        </div>
        <input type="hidden" name="action" value="lookup" />
        <button class="btn btn-primary btn-lg connect-wide" type="submit">Continue</button>
      </form>
    </div>
  );
}

function DeviceConfirm(
  props: { request: DeviceRequest; account: string; back: string; ago: string | null },
) {
  const { request } = props;
  return (
    <div class="card connect-card">
      <span class="eyebrow">Connect a device</span>
      <h1>
        A device that says it is <span class="connect-client">{request.client}</span>{" "}
        wants a Keyway key
      </h1>
      <Account account={props.account} back={props.back} />
      <dl class="kv connect-target">
        <dt>Code</dt>
        <dd>
          <code class="connect-code" data-testid="device-user-code">{request.userCode}</code>
        </dd>
        <dt>Requested</dt>
        <dd data-testid="device-requested">
          {props.ago ?? "at an unknown time"}
          {request.address && (
            <>
              {" "}from <code data-testid="device-address">{request.address}</code>
            </>
          )}
        </dd>
        <dt>Name</dt>
        <dd>
          <span data-testid="device-says">
            It says it is “{request.client}”
          </span>
          <span class="connect-note muted small">
            Chosen by whoever started the request: Keyway cannot check it.
          </span>
        </dd>
      </dl>
      <Grants client={request.client} />
      <p class="muted small">
        Approve only if you started this yourself just now, and this code is the one your editor
        shows right now. Someone who sent you this link could be trying to get a key in your name.
      </p>
      <form method="post" action="/connect/device" class="connect-actions">
        <input type="hidden" name="code" value={request.userCode} />
        <button class="btn btn-primary btn-lg" type="submit" name="action" value="approve">
          Approve
        </button>
        <button class="btn btn-lg" type="submit" name="action" value="deny">Deny</button>
      </form>
    </div>
  );
}
