/** The page shell: head, local-mode banner, header with navigation, footer. */
import type { ComponentChildren } from "preact";
import { assetUrl } from "../build/islands.ts";
import { SupportLink } from "./SupportLink.tsx";

export interface LayoutProps {
  title: string;
  /** Shows the "Local mode" banner (CONTRACT §3: on every page in local mode). */
  localMode: boolean;
  /** Signed-in user's label (e-mail or id) — shows dashboard/sign-out instead of sign-in. */
  signedInAs?: string | null;
  isAdmin?: boolean;
  /** Clerk mode pages that need ClerkJS (sign-in, sign-up, and pages with a sign-out button). */
  clerk?: { publishableKey: string; scriptUrl: string } | null;
  /** Current path, to mark the active navigation link. */
  path?: string;
  /** SUPPORT_URL: a "Contact support" link in the footer when set. */
  supportUrl?: string | null;
  /** `?redirect=…` for the header's sign-in and sign-up links (back to a connect page). */
  authQuery?: string;
  children: ComponentChildren;
}

export function Layout(props: LayoutProps) {
  const { title, localMode, signedInAs, clerk, path } = props;
  return (
    <html lang="en">
      <head>
        <meta charset="utf-8" />
        <meta name="viewport" content="width=device-width, initial-scale=1" />
        <meta name="color-scheme" content="light dark" />
        <title>{title === "Keyway" ? title : `${title} · Keyway`}</title>
        <link rel="icon" href={assetUrl("/static/favicon.svg")} type="image/svg+xml" />
        <link rel="stylesheet" href={assetUrl("/static/app.css")} />
        {clerk && (
          <script
            async
            crossorigin="anonymous"
            data-clerk-publishable-key={clerk.publishableKey}
            src={clerk.scriptUrl}
            type="text/javascript"
          />
        )}
        {clerk && <script defer src={assetUrl("/static/clerk.js")} />}
      </head>
      <body>
        <a class="skip-link" href="#main">Skip to content</a>
        {localMode && (
          <div class="banner" role="note">
            <strong>Local mode</strong>{" "}
            — sign-in is a local e-mail form and nothing is sent to Clerk. Configure Clerk to go
            live.
          </div>
        )}
        <header class="site-header">
          <div class="inner">
            <a class="brand" href="/">
              <span class="brand-mark" aria-hidden="true">K</span>
              Keyway
            </a>
            <nav class="nav" aria-label="Main">
              {signedInAs
                ? (
                  <>
                    <span class="who" title={signedInAs}>{signedInAs}</span>
                    {props.isAdmin && path !== "/admin" && (
                      <a class="btn btn-sm" href="/admin">Admin</a>
                    )}
                    {path !== "/dashboard" && <a class="btn btn-sm" href="/dashboard">Dashboard</a>}
                    <form
                      method="post"
                      action="/auth/sign-out"
                      data-clerk-sign-out={clerk ? "" : undefined}
                    >
                      <button class="btn btn-sm" type="submit">Sign out</button>
                    </form>
                  </>
                )
                : (
                  <>
                    {path !== "/sign-in" && (
                      <a class="btn btn-sm" href={`/sign-in${props.authQuery ?? ""}`}>Sign in</a>
                    )}
                    {path !== "/sign-up" && (
                      <a class="btn btn-sm btn-primary" href={`/sign-up${props.authQuery ?? ""}`}>
                        Sign up
                      </a>
                    )}
                  </>
                )}
            </nav>
          </div>
        </header>
        <main id="main">{props.children}</main>
        <footer class="site-footer">
          <div class="inner">
            Keyway — your personal key to GLM models, with your own limits and usage. Your key is
            yours: keep it out of shared code.{props.supportUrl ? " Questions? " : ""}
            <SupportLink href={props.supportUrl ?? null} />
          </div>
        </footer>
      </body>
    </html>
  );
}
