/** Progress on stderr for CLI tasks, shown only once a task has taken more than a moment. */

export interface Progress {
  (message: string): void;
  done(): void;
}

/** Overwrites one line on a terminal, prints a line at most every 2 s otherwise. */
export function progressLine(quietForMs = 700): Progress {
  const started = performance.now();
  const tty = Deno.stderr.isTerminal();
  const encoder = new TextEncoder();
  let last = 0;
  let shown = false;
  const progress = (message: string) => {
    const now = performance.now();
    if (now - started < quietForMs || now - last < (tty ? 100 : 2000)) return;
    last = now;
    shown = true;
    Deno.stderr.writeSync(encoder.encode(tty ? `\r\x1b[K${message}` : `${message}\n`));
  };
  progress.done = () => {
    if (shown && tty) Deno.stderr.writeSync(encoder.encode("\r\x1b[K"));
    shown = false;
  };
  return progress;
}
