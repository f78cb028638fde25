/**
 * Which models a request may name: the allow-list (ALLOWED_MODELS, or the pricing table's
 * models), compared case-insensitively, after MODEL_ALIASES (`*` wildcards) are resolved. A
 * request for an alias is forwarded, limited, metered and priced as its target.
 */
import type { Config } from "../core/config.ts";
import { AppError } from "../core/errors.ts";
import { BoundedMap } from "../core/kv_ops.ts";

interface Alias {
  pattern: string;
  test: RegExp;
  target: string;
}

export class ModelCatalog {
  /** Lower-cased id → the id as configured; null when any model is allowed. */
  private readonly allowed: Map<string, string> | null;
  private readonly aliases: Alias[];
  readonly listJson: string;

  constructor(config: Config) {
    this.allowed = config.allowAnyModel
      ? null
      : new Map(config.allowedModels.map((m) => [m.toLowerCase(), m]));
    this.aliases = Object.entries(config.modelAliases).map(([pattern, target]) => ({
      pattern,
      target,
      test: new RegExp(
        `^${
          pattern.split("*").map((part) => part.replace(/[.+?^${}()|[\]\\]/g, "\\$&")).join(".*")
        }$`,
        "i",
      ),
    }));
    this.listJson = JSON.stringify({
      object: "list",
      data: config.allowedModels.map((id) => entry(id)),
    });
  }

  /** Resolutions of the names requests used (a few; bounded). */
  private readonly resolved = new BoundedMap<string, string | AppError>(1000);

  /** The model to forward as, or 400 model_not_allowed saying why. */
  resolve(requested: string): string | AppError {
    let found = this.resolved.get(requested);
    if (found === undefined) {
      found = this.lookUp(requested);
      this.resolved.set(requested, found);
    }
    return found;
  }

  private lookUp(requested: string): string | AppError {
    const alias = this.aliases.find((a) => a.test.test(requested));
    const name = alias ? alias.target : requested;
    if (this.allowed === null) return name;
    const id = this.allowed.get(name.toLowerCase());
    if (id) return id;
    return new AppError(
      "model_not_allowed",
      alias
        ? `model: "${requested}" maps to "${alias.target}" (MODEL_ALIASES "${alias.pattern}"), ` +
          "which is not allowed here; GET /v1/models lists the allowed models."
        : `model: "${requested}" is not allowed here; GET /v1/models lists the allowed models.`,
    );
  }

  /** GET /v1/models/{id}: the model (by any casing, or an alias of an allowed one), or null. */
  entryJson(id: string): string | null {
    const resolved = this.resolve(id);
    if (resolved instanceof AppError) return null;
    const direct = this.allowed?.get(id.toLowerCase());
    return JSON.stringify(
      entry(direct ?? (resolved.toLowerCase() === id.toLowerCase() ? resolved : id)),
    );
  }
}

const entry = (id: string) => ({ id, object: "model", created: 0, owned_by: "keyway" });
