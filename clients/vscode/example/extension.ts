/**
 * A complete example extension using Keyway: "Keyway: Connect" gets the key (browser approval,
 * or a device code) and shows this editor's own key's prefix, "Keyway: Ask" sends a chat
 * completion through Keyway, "Keyway: Disconnect" revokes this editor's key and forgets it. Build with `npm run build` (esbuild bundles ../keyway.ts in).
 */
import * as vscode from "vscode";
import { createKeywayClient, KeywayError } from "../keyway.ts";

const keyway = createKeywayClient(vscode);

/** The Keyway server, from the extension's settings. */
function serverUrl(): string {
  return vscode.workspace.getConfiguration("keywayExample").get<string>(
    "serverUrl",
    "http://localhost:8000",
  );
}

function model(): string {
  return vscode.workspace.getConfiguration("keywayExample").get<string>("model", "glm-4.6");
}

function explain(err: unknown): string {
  if (err instanceof KeywayError) return `Keyway: ${err.message} (${err.code})`;
  return `Keyway: ${err instanceof Error ? err.message : String(err)}`;
}

export function activate(context: vscode.ExtensionContext) {
  const output = vscode.window.createOutputChannel("Keyway example");
  context.subscriptions.push(
    output,
    vscode.commands.registerCommand("keywayExample.connect", async () => {
      try {
        const key = await keyway.getKeywayKey(context, serverUrl(), {
          clientName: "Keyway example for VS Code",
        });
        // Every editor gets its own key: its prefix is the one listed on the dashboard.
        vscode.window.showInformationMessage(
          `Connected to Keyway with this editor's own key ${key.keyPrefix}…`,
        );
      } catch (err) {
        vscode.window.showErrorMessage(explain(err));
      }
    }),
    vscode.commands.registerCommand("keywayExample.ask", async () => {
      const question = await vscode.window.showInputBox({ prompt: "Ask the model" });
      if (!question) return;
      try {
        // keyway.fetch adds the key, and connects again once if Keyway answers 401.
        const res = await keyway.fetch(context, serverUrl(), "/v1/chat/completions", {
          method: "POST",
          headers: { "content-type": "application/json" },
          body: JSON.stringify({
            model: model(),
            messages: [{ role: "user", content: question }],
          }),
        });
        const body = await res.json();
        if (!res.ok) throw new KeywayError(body?.error?.code ?? "error", body?.error?.message);
        output.appendLine(`> ${question}`);
        output.appendLine(body.choices?.[0]?.message?.content ?? "(no answer)");
        output.show(true);
      } catch (err) {
        vscode.window.showErrorMessage(explain(err));
      }
    }),
    vscode.commands.registerCommand("keywayExample.disconnect", async () => {
      const { revoked, keyPrefix } = await keyway.disconnect(context, serverUrl());
      vscode.window.showInformationMessage(
        keyPrefix === null
          ? "This editor was not connected to Keyway."
          : revoked
          ? `Disconnected: key ${keyPrefix}… is revoked and removed from this editor.`
          : `Key ${keyPrefix}… removed from this editor, but Keyway could not revoke it: ` +
            "revoke it under Connected apps on your dashboard.",
      );
    }),
  );
}

export function deactivate() {}
