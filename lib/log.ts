/** One-line structured logs; known secrets are redacted from every line before it is written. */

export type LogFields = Record<string, unknown>;

export interface Logger {
  info(msg: string, fields?: LogFields): void;
  warn(msg: string, fields?: LogFields): void;
  error(msg: string, fields?: LogFields): void;
}

export function createLogger(secrets: Array<string | undefined>, quiet = false): Logger {
  const redact = secrets.filter((s): s is string => typeof s === "string" && s.length >= 8);
  const write = (level: string, msg: string, fields?: LogFields) => {
    if (quiet && level === "info") return;
    let line = JSON.stringify({ ts: new Date().toISOString(), level, msg, ...fields });
    for (const secret of redact) line = line.replaceAll(secret, "[redacted]");
    if (level === "info") console.log(line);
    else console.error(line);
  };
  return {
    info: (msg, fields) => write("info", msg, fields),
    warn: (msg, fields) => write("warn", msg, fields),
    error: (msg, fields) => write("error", msg, fields),
  };
}
