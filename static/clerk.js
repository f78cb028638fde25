// Clerk mode only: mounts Clerk's sign-in / sign-up components and wires sign-out buttons.
// ClerkJS itself is loaded from the instance's Frontend API by a script tag on the page.
const whenClerk = (callback) => {
  if (globalThis.Clerk) return callback(globalThis.Clerk);
  const tag = document.querySelector("script[data-clerk-publishable-key]");
  tag?.addEventListener("load", () => globalThis.Clerk && callback(globalThis.Clerk));
};

// One load() shared with the islands (islands/client.ts uses the same global).
const loaded = (clerk) => (globalThis.__keywayClerkLoad ??= clerk.load());

const mount = async (clerk) => {
  const el = document.getElementById("clerk-auth");
  if (!el) return;
  try {
    await loaded(clerk);
  } catch (err) {
    el.textContent = "Sign-in could not load. Check your connection and reload the page.";
    console.warn("Clerk failed to load", err);
    return;
  }
  const redirect = el.getAttribute("data-redirect") || "/dashboard";
  // Already signed in (the server saw no valid cookie yet): go straight on.
  if (clerk.user) return location.assign(redirect);
  const options = {
    signInUrl: el.getAttribute("data-sign-in-url"),
    signUpUrl: el.getAttribute("data-sign-up-url"),
    forceRedirectUrl: redirect,
    signInForceRedirectUrl: redirect,
    signUpForceRedirectUrl: redirect,
  };
  el.textContent = "";
  if (el.getAttribute("data-mode") === "sign-up") clerk.mountSignUp(el, options);
  else clerk.mountSignIn(el, options);
};

const wireSignOut = (clerk) => {
  for (const form of document.querySelectorAll("form[data-clerk-sign-out]")) {
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      try {
        await loaded(clerk);
        // "Switch account" on a connect page names where to come back to after signing in again.
        const back = form.getAttribute("data-redirect");
        const redirectUrl = back && back.startsWith("/") && !back.startsWith("//")
          ? `/sign-in?redirect=${encodeURIComponent(back)}`
          : "/";
        await clerk.signOut({ redirectUrl });
      } catch {
        form.submit();
      }
    });
  }
};

whenClerk((clerk) => {
  mount(clerk);
  wireSignOut(clerk);
});
