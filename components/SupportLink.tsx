/** Where an end user gets help (SUPPORT_URL): a web page or an e-mail address. */
export function SupportLink({ href }: { href: string | null }) {
  if (!href) return null;
  return (
    <a
      href={href}
      data-testid="support-link"
      {...(href.startsWith("https:") ? { rel: "noopener" } : {})}
    >
      {href.startsWith("mailto:") ? "E-mail support" : "Contact support"}
    </a>
  );
}
