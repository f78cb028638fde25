/** Placeholder until its issue lands. */
console.log("deno task summarize: not yet implemented");
