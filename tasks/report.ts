/** Placeholder until its issue lands. */
console.log("deno task report: not yet implemented");
