/** Time as milliseconds since the epoch, injected so tests and benches can control it. */
export type Clock = () => number;

export const systemClock: Clock = () => Date.now();
