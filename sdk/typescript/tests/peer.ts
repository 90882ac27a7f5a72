/**
 * A consumer in its own process, for the killed-peer test: it takes events
 * and never finishes them, printing each event id, until it is SIGKILLed.
 * argv: addresses (JSON), token, topic, group.
 */
import { AutoEcoOps, Consumer, staticToken } from "../src/index.js";

const [addrs, token, topic, group] = process.argv.slice(2);
const client = new AutoEcoOps({ addresses: JSON.parse(addrs!), credentials: staticToken(token!) });
const consumer = new Consumer(client, {
  topic: topic!,
  group: group!,
  consumer: "doomed",
  visibilityTimeoutMs: 1500,
  retryPolicy: { initialBackoff: { nanos: 100_000_000 }, maxAttempts: 5 },
  handler: (event) => {
    process.stdout.write(`got ${event.eventId}\n`);
    return new Promise(() => undefined); // never done: killed first
  },
});
void consumer.run();
process.stdout.write("ready\n");
