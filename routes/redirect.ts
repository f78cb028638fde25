/** Where a page may send a person back to after signing in: same-origin paths only. */
/**
 * Where to go after signing in: a path on this site. Printable ASCII only, so no byte a browser
 * strips (tab, CR, LF: "/\t/evil.com" is followed as "//evil.com") and none that breaks the
 * Location header; no backslash (read as "/") and no leading "//" (another host).
 */
export const SAME_ORIGIN_PATH = /^\/(?![/\\])[\x21-\x5b\x5d-\x7e]*$/;

/** The path to return to after signing in, when it is a safe same-origin one. */
export function safeRedirectPath(value: string | undefined): string | undefined {
  return value !== undefined && value.length <= 2048 && SAME_ORIGIN_PATH.test(value)
    ? value
    : undefined;
}
