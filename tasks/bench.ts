/** Placeholder until its issue lands. */
console.log("deno task bench: not yet implemented");
