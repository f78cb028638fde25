/**
 * "Send a test request": one real chat completion through the gateway with the user's own key,
 * from the dashboard, so a new user sees Keyway answer before setting up any tool. It counts
 * like any request; the answer, the tokens it used, or what went wrong in plain words.
 */
import { useState } from "preact/hooks";
import { formatCount, formatInt, formatWait } from "../lib/core/format.ts";

type Outcome =
  | { status: "idle" }
  | { status: "sending" }
  | { status: "done"; answer: string; prompt: number; completion: number; ms: number }
  | { status: "failed"; message: string };

const PROMPT = "Say hello to a new user in one short sentence.";

/** Sends the request; what to show, in words, whatever happens. */
export async function sendTestRequest(
  apiKey: string,
  model: string,
): Promise<Exclude<Outcome, { status: "idle" | "sending" }>> {
  const started = performance.now();
  let res: Response;
  try {
    res = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { authorization: `Bearer ${apiKey}`, "content-type": "application/json" },
      body: JSON.stringify({
        model,
        messages: [{ role: "user", content: PROMPT }],
        max_tokens: 200,
        // GLM-4.5 and later think first unless told not to; a greeting needs no thinking.
        ...(/^glm-(4\.[5-9]|[5-9])/i.test(model) ? { thinking: { type: "disabled" } } : {}),
      }),
    });
  } catch {
    return { status: "failed", message: "Keyway could not be reached. Check your connection." };
  }
  const body = await res.json().catch(() => null);
  if (!res.ok) {
    const said = typeof body?.error?.message === "string" ? body.error.message : null;
    const wait = Number(res.headers.get("retry-after"));
    const retry = res.status !== 403 && wait > 0
      ? ` Try again in ${wait < 60 ? `${wait} s` : formatWait(wait * 1000)}.`
      : "";
    const message = res.status === 401
      ? "Your key was refused: it may have just been rotated. Reload the page and try again."
      : res.status >= 500
      ? `The service could not answer just now${said ? `: ${said}` : "."}`
      : said ?? `The request was refused (HTTP ${res.status}).`;
    return { status: "failed", message: message + retry };
  }
  const answer = String(body?.choices?.[0]?.message?.content ?? "").trim();
  return {
    status: "done",
    answer: answer || "(The model answered with no text.)",
    prompt: Number(body?.usage?.prompt_tokens ?? 0),
    completion: Number(body?.usage?.completion_tokens ?? 0),
    ms: performance.now() - started,
  };
}

export function TestRequest(
  p: { apiKey: string | null; model: string; onDone: () => void },
) {
  const [outcome, setOutcome] = useState<Outcome>({ status: "idle" });
  const send = async () => {
    if (!p.apiKey) return;
    setOutcome({ status: "sending" });
    setOutcome(await sendTestRequest(p.apiKey, p.model));
    p.onDone();
  };
  return (
    <div class="test-request" data-testid="test-request">
      <button
        class="btn btn-primary btn-sm"
        type="button"
        disabled={!p.apiKey || outcome.status === "sending"}
        onClick={send}
      >
        {outcome.status === "sending" ? "Sending…" : "Send a test request"}
      </button>
      <span class="muted small">
        One short chat with {p.model}, through Keyway with your key; it counts like any request.
      </span>
      <div role="status" aria-live="polite" data-testid="test-result">
        {outcome.status === "done" && (
          <div class="notice notice-ok">
            <p class="test-answer">“{outcome.answer}”</p>
            <p class="small" style={{ margin: 0 }}>
              It worked: {formatCount(outcome.prompt + outcome.completion, "token")}{" "}
              ({formatInt(outcome.prompt)} in, {formatInt(outcome.completion)} out) in{" "}
              {(outcome.ms / 1000).toFixed(1)} s. Your usage below now counts it.
            </p>
          </div>
        )}
        {outcome.status === "failed" && (
          <p class="notice notice-error" style={{ margin: 0 }}>
            The test request did not work. {outcome.message}
          </p>
        )}
      </div>
    </div>
  );
}
