/** Browser-side helpers shared by islands: authenticated API calls and the clipboard. */

interface ClerkLike {
  load(): Promise<void>;
  session?: { getToken(): Promise<string | null> } | null;
}

declare global {
  // ClerkJS's global, and the one load() every script on the page shares.
  var Clerk: ClerkLike | undefined;
  var __keywayClerkLoad: Promise<void> | undefined;
}

export type AuthMode = "clerk" | "local";

export class ApiError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
    readonly retryAfter?: number,
  ) {
    super(message);
  }
  /** Worth another try: the network, the server or a rate limit, not the caller. */
  get retryable() {
    return this.status === 0 || this.status === 429 || this.status >= 500;
  }
}

async function waitForClerk(timeoutMs: number): Promise<ClerkLike | undefined> {
  const until = Date.now() + timeoutMs;
  while (!globalThis.Clerk && Date.now() < until) {
    await new Promise((r) => setTimeout(r, 50));
  }
  return globalThis.Clerk;
}

/**
 * In Clerk mode a fresh session token from ClerkJS as a Bearer header (the `__session` cookie
 * may be a minute old); without ClerkJS the same-origin cookie is all there is.
 */
export async function sessionHeaders(mode: AuthMode): Promise<Record<string, string>> {
  if (mode !== "clerk") return {};
  const clerk = await waitForClerk(8000);
  if (!clerk) return {};
  globalThis.__keywayClerkLoad ??= clerk.load();
  await globalThis.__keywayClerkLoad;
  const token = await clerk.session?.getToken();
  return token ? { authorization: `Bearer ${token}` } : {};
}

/** fetch + JSON with the contract's error shape turned into ApiError. */
export async function api<T>(
  mode: AuthMode,
  path: string,
  init: { method?: string; body?: unknown } = {},
): Promise<T> {
  const headers: Record<string, string> = {
    accept: "application/json",
    ...await sessionHeaders(mode),
  };
  if (init.body !== undefined) headers["content-type"] = "application/json";
  let res: Response;
  try {
    res = await fetch(path, {
      method: init.method ?? "GET",
      credentials: "same-origin",
      headers,
      body: init.body === undefined ? undefined : JSON.stringify(init.body),
    });
  } catch {
    throw new ApiError(0, "network_error", "The server could not be reached.");
  }
  const data = await res.json().catch(() => null);
  if (!res.ok) {
    const err = data?.error;
    const retryAfter = Number(res.headers.get("retry-after")) || undefined;
    throw new ApiError(
      res.status,
      typeof err?.code === "string" ? err.code : "http_" + res.status,
      typeof err?.message === "string" ? err.message : `The server answered ${res.status}.`,
      retryAfter,
    );
  }
  return data as T;
}

/** Copies text; falls back to a hidden textarea where the async clipboard is unavailable. */
export async function copyText(text: string): Promise<boolean> {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    const area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.style.position = "fixed";
    area.style.opacity = "0";
    document.body.append(area);
    area.select();
    const ok = document.execCommand("copy");
    area.remove();
    return ok;
  }
}

export const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
