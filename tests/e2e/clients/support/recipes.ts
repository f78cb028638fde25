/** A recipe from the recipes module (lib/recipes), made from the user's own `/api/key` answer. */
import assert from "node:assert/strict";
import type { KeyBody } from "../../../../lib/api_types.ts";
import { type Recipe, type RecipeFile, recipes } from "../../../../lib/recipes/recipes.ts";
import type { Sandbox } from "./run.ts";

/** The model the fake answers for; recipes put the first model in their config. */
export const MODEL = "glm-4.6";

export function recipeFor(id: string, key: KeyBody): Recipe {
  const recipe = recipes({
    baseUrl: key.baseUrl,
    anthropicBaseUrl: key.anthropicBaseUrl,
    apiKey: key.apiKey,
    models: [MODEL],
  }).find((r) => r.id === id);
  assert.ok(recipe, `the recipes module has a "${id}" recipe`);
  return recipe;
}

/** Writes every file of the recipe where its tool reads it: `~` in the home, else the project. */
export async function writeRecipeFiles(recipe: Recipe, box: Sandbox): Promise<string[]> {
  const written: string[] = [];
  for (const file of recipe.files) {
    if (!file.path) continue;
    const path = file.path.startsWith("~/")
      ? `${box.home}/${file.path.slice(2)}`
      : `${box.cwd}/${file.path}`;
    await Deno.mkdir(path.slice(0, path.lastIndexOf("/")), { recursive: true });
    await Deno.writeTextFile(path, file.content);
    written.push(path);
  }
  assert.ok(written.length > 0, `the ${recipe.id} recipe has a file to write`);
  return written;
}

/** A settings form's fields ("Base URL: …" lines), as a person copies them into the tool. */
export function settingsFields(recipe: Recipe): Record<string, string> {
  const form: RecipeFile | undefined = recipe.files.find((f) => f.lang === "text");
  assert.ok(form, `the ${recipe.id} recipe has settings fields`);
  return Object.fromEntries(
    form.content.split("\n").map((line) => {
      const at = line.indexOf(": ");
      return [line.slice(0, at), line.slice(at + 2)];
    }),
  );
}
