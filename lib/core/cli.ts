/**
 * Command-line flags for the tasks (`deno task report`, `bench`, `build`, `summarize`): node:util's
 * parseArgs, strict, with its errors said in one voice that names the flag, and a flag given twice
 * refused rather than the last one silently winning. The values are then checked by each task's
 * own zod schema.
 */
import { parseArgs } from "node:util";
import { z } from "zod";

/** A command-line mistake: the message names the flag; the task exits with status 2. */
export class UsageError extends Error {
  override name = "UsageError";
}

type Spec = Record<string, "string" | "boolean">;
export type Flags<S extends Spec> = { [K in keyof S]?: S[K] extends "string" ? string : true };

/** Parses `--name value`, `--name=value` and boolean `--name`; throws UsageError on a mistake. */
export function parseFlags<S extends Spec>(args: string[], spec: S): Flags<S> {
  const options = Object.fromEntries(
    Object.entries(spec).map(([name, type]) => [name, { type }]),
  ) as Record<string, { type: "string" | "boolean" }>;
  let parsed;
  try {
    parsed = parseArgs({ args, options, strict: true, allowPositionals: false, tokens: true });
  } catch (err) {
    throw new UsageError(explain(err));
  }
  const seen = new Set<string>();
  for (const token of parsed.tokens) {
    if (token.kind !== "option") continue;
    if (seen.has(token.name)) throw new UsageError(`--${token.name} given twice`);
    seen.add(token.name);
  }
  return parsed.values as Flags<S>;
}

/** parseArgs' error, reworded to name the flag and what to do. */
function explain(err: unknown): string {
  const message = err instanceof Error ? err.message : String(err);
  const flag = message.match(/'(-[^' <]+)/)?.[1];
  switch ((err as { code?: string }).code) {
    case "ERR_PARSE_ARGS_UNKNOWN_OPTION":
      return `unknown flag ${flag} (see --help)`;
    case "ERR_PARSE_ARGS_UNEXPECTED_POSITIONAL":
      return `unexpected argument "${
        message.match(/argument '([^']*)'/)?.[1]
      }" (flags start with --; see --help)`;
    case "ERR_PARSE_ARGS_INVALID_OPTION_VALUE":
      return message.includes("does not take") ? `${flag} takes no value` : `${flag} needs a value`;
  }
  return message;
}

/** The first problem zod found in parsed flags, as one line naming the flag. */
export function flagIssue(issue: { path: PropertyKey[]; message: string }): string {
  const flag = `--${String(issue.path[0] ?? "")}`;
  return issue.message.includes(flag) ? issue.message : `${flag}: ${issue.message}`;
}

/** A flag's value that must be a whole number within [min, max], said so when it is not. */
export function wholeNumber(flag: string, min: number, max: number) {
  const message = `${flag} must be a whole number from ${min} to ${max}`;
  return z.string().regex(/^\d+$/, { message }).transform(Number).pipe(
    z.number().int().min(min, { message }).max(max, { message }),
  );
}
