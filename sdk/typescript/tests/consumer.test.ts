/**
 * The event consumer against the real event-bus: ack on return, nack with
 * the reason on throw, concurrency, lease keep-alive, batched acks, a
 * graceful stop, and surviving a killed peer (another consumer process of
 * the group SIGKILLed mid-event, and the bus's connection killed under it).
 */
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { once } from "node:events";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { after, afterEach, before, test } from "node:test";
import { create, isMessage } from "@bufbuild/protobuf";
import { anyPack } from "@bufbuild/protobuf/wkt";
import {
  AutoEcoOps,
  Consumer,
  type ConsumerOptions,
  type Event,
  PermanentError,
  staticToken,
} from "../src/index.js";
import { SyncStartedSchema } from "../src/gen/autoecoops/infra/v1/events_pb.js";
import { FaultProxy } from "./faults.js";
import { type Mesh, startMesh } from "./mesh.js";

const TOPIC = "infra.sync";
let mesh: Mesh;
let client: AutoEcoOps;
let token: string;
let seq = 0;

before(async () => {
  mesh = await startMesh({ AUTOECOOPS_EVENT_BUS_POLL_SECONDS: "0.05" });
  token = await mesh.token("consumer-tests");
  client = new AutoEcoOps({ addresses: mesh.addrs, credentials: staticToken(token) });
});
after(async () => {
  client?.close();
  await mesh?.stop();
});

/** The application named by a SyncStarted payload. */
function appOf(event: Event): string {
  assert.ok(isMessage(event.data, SyncStartedSchema), "payload unpacked to its generated type");
  return event.data.application;
}

const sleep = (ms: number) => new Promise((ok) => setTimeout(ok, ms));

async function publish(application: string): Promise<string> {
  seq += 1;
  const reply = await client.events.publish({
    topic: TOPIC,
    envelope: {
      source: "sdk-ts-tests",
      type: "autoecoops.infra.sync.started",
      idempotencyKey: `${process.pid}-${seq}-${application}`,
      data: anyPack(SyncStartedSchema, create(SyncStartedSchema, { application })),
    },
  });
  return reply.eventId;
}

/** Wait until `group` has joined the topic (so LATEST includes what is published next). */
async function joined(group: string): Promise<void> {
  for (let i = 0; i < 200; i++) {
    const stats = await client.events.getTopicStats({ topic: TOPIC }).catch(() => undefined);
    if (stats?.stats?.groups.some((x) => x.group === group)) return;
    await sleep(50);
  }
  throw new Error(`group ${group} never joined`);
}

async function until(check: () => boolean, ms = 15_000): Promise<void> {
  const end = Date.now() + ms;
  while (!check()) {
    if (Date.now() > end) throw new Error("timed out waiting");
    await sleep(20);
  }
}

const started: Consumer[] = [];
afterEach(async () => {
  // A failed test must not leave a consumer running.
  await Promise.all(started.splice(0).map((c) => c.stop(100)));
});

function consume(group: string, options: Partial<ConsumerOptions> & Pick<ConsumerOptions, "handler">, c = client) {
  const consumer = new Consumer(c, { topic: TOPIC, group, log: () => undefined, ...options });
  started.push(consumer);
  const done = consumer.run();
  return { consumer, done };
}

test("returning acks, throwing nacks with the reason, PermanentError dead-letters", async () => {
  const group = `g-ack-${process.pid}`;
  const seen: Event[] = [];
  const { consumer, done } = consume(group, {
    concurrency: 2,
    retryPolicy: { initialBackoff: { nanos: 50_000_000 }, maxAttempts: 5 },
    handler: (event) => {
      seen.push(event);
      const app = appOf(event);
      if (app === "flaky" && event.attempt === 1) throw new Error("transient failure");
      if (app === "poison") throw new PermanentError("cannot parse this one");
    },
  });
  await joined(group);
  await publish("fine");
  await publish("flaky");
  const poison = await publish("poison");
  await until(() => seen.filter((e) => appOf(e) === "flaky").length === 2);
  await until(() => consumer.stats.nacked === 2);
  const fine = seen.find((e) => appOf(e) === "fine")!;
  assert.equal(fine.type, "autoecoops.infra.sync.started");
  assert.equal(fine.data?.$typeName, "autoecoops.infra.v1.SyncStarted", "payload unpacked");
  const flaky = seen.filter((e) => appOf(e) === "flaky");
  assert.deepEqual(flaky.map((e) => e.attempt), [1, 2], "the nacked event came back");
  const dead = await client.events.listDeadLetters({ topic: TOPIC, group });
  const letter = dead.deadLetters.find((d) => d.envelope?.id === poison);
  assert.ok(letter, "dead-lettered at once");
  assert.match(letter.reason, /PermanentError: cannot parse this one/);
  await consumer.stop();
  await done;
  const stats = (await client.events.getTopicStats({ topic: TOPIC })).stats!.groups.find((g) => g.group === group)!;
  assert.equal(stats.pending, 0n, "everything settled");
  assert.equal(stats.ackedCount, 2n);
});

test("concurrency bounds the handlers running at once; acks are batched", async () => {
  const group = `g-conc-${process.pid}`;
  let running = 0;
  let peak = 0;
  let handled = 0;
  // Count the Ack calls on the wire.
  let ackCalls = 0;
  const counting = new AutoEcoOps({
    addresses: mesh.addrs,
    credentials: staticToken(token),
    interceptors: [
      (next) => async (req) => {
        if (req.method.name === "Ack") ackCalls += 1;
        return next(req);
      },
    ],
  });
  const { consumer, done } = consume(group, {
    concurrency: 4,
    handler: async () => {
      running += 1;
      peak = Math.max(peak, running);
      await sleep(200);
      running -= 1;
      handled += 1;
    },
  }, counting);
  await joined(group);
  // Published together, so handlers start (and finish) in groups.
  seq += 1;
  await client.events.publishBatch({
    topic: TOPIC,
    envelopes: Array.from({ length: 12 }, (_, i) => ({
      source: "sdk-ts-tests",
      type: "autoecoops.infra.sync.started",
      idempotencyKey: `${process.pid}-${seq}-c${i}`,
      data: anyPack(SyncStartedSchema, create(SyncStartedSchema, { application: `c${i}` })),
    })),
  });
  await until(() => handled === 12);
  await consumer.stop();
  await done;
  assert.equal(peak, 4);
  assert.equal(consumer.stats.acked, 12);
  counting.close();
  // Handlers finishing together share one Ack call.
  assert.ok(ackCalls > 0 && ackCalls < 12, `Ack calls for 12 events: ${ackCalls}`);
});

test("a handler longer than its lease keeps it: no redelivery", async () => {
  const group = `g-lease-${process.pid}`;
  const attempts: number[] = [];
  const { consumer, done } = consume(group, {
    visibilityTimeoutMs: 600,
    handler: async (event) => {
      attempts.push(event.attempt);
      await sleep(2000);
    },
  });
  await joined(group);
  await publish("slow");
  await until(() => consumer.stats.acked === 1, 10_000);
  await sleep(700);
  await consumer.stop();
  await done;
  assert.deepEqual(attempts, [1], "handled once: the lease was extended");
});

test("graceful stop: running handlers get the grace period, then are nacked", async () => {
  const group = `g-stop-${process.pid}`;
  let aborted = false;
  let started = 0;
  const { consumer, done } = consume(group, {
    handler: async (event) => {
      started += 1;
      await new Promise<void>((ok) => event.signal.addEventListener("abort", () => ok()));
      aborted = true;
    },
  });
  await joined(group);
  await publish("stuck");
  await until(() => started === 1);
  const t0 = performance.now();
  await consumer.stop(300);
  await done;
  assert.ok(performance.now() - t0 >= 290, "the handler had its grace period");
  assert.ok(aborted, "its signal told it to stop");
  assert.equal(consumer.stats.nacked, 1, "handed back to the bus");
  assert.equal(consumer.stats.acked, 0);
});

test("survives a killed peer: a SIGKILLed consumer's event comes to this one", async () => {
  const group = `g-peer-${process.pid}`;
  const here = dirname(fileURLToPath(import.meta.url));
  const peer = spawn(
    process.execPath,
    [join(here, "peer.js"), JSON.stringify(mesh.addrs), token, TOPIC, group],
    { stdio: ["ignore", "pipe", "inherit"] },
  );
  let out = "";
  peer.stdout.on("data", (c: Buffer) => (out += c.toString()));
  try {
    await until(() => out.includes("ready"));
    await joined(group);
    const id = await publish("doomed");
    await until(() => out.includes(`got ${id}`));
    peer.kill("SIGKILL");
    await once(peer, "exit");
    const got: Event[] = [];
    const { consumer, done } = consume(group, {
      consumer: "survivor",
      visibilityTimeoutMs: 1000,
      retryPolicy: { initialBackoff: { nanos: 100_000_000 }, maxAttempts: 5 },
      handler: (event) => {
        got.push(event);
      },
    });
    await until(() => got.length === 1 && consumer.stats.acked === 1, 20_000);
    assert.equal(got[0]!.eventId, id);
    assert.equal(got[0]!.attempt, 2, "a redelivery of the peer's lease");
    await consumer.stop();
    await done;
  } finally {
    if (peer.exitCode === null) peer.kill("SIGKILL");
  }
});

test("survives its connection to the bus being killed: reconnects and goes on", async () => {
  const group = `g-reconnect-${process.pid}`;
  const proxy = await new FaultProxy(mesh.addrs["event-bus"]!).start();
  const port = Number(proxy.address.split(":")[1]);
  const viaProxy = new AutoEcoOps({
    addresses: { ...mesh.addrs, "event-bus": proxy.address },
    credentials: staticToken(token),
  });
  const got: string[] = [];
  const { consumer, done } = consume(
    group,
    {
      maxReconnectBackoffMs: 200,
      visibilityTimeoutMs: 2000,
      handler: (event) => {
        got.push(event.eventId);
      },
    },
    viaProxy,
  );
  try {
    await joined(group);
    const first = await publish("before");
    // Settled first: an Ack cut off by the kill would hold the group's only
    // in-flight slot until its lease ran out.
    await until(() => got.includes(first) && consumer.stats.acked === 1);
    await proxy.stop(); // the peer dies mid-stream
    await sleep(300);
    await proxy.start(port); // and comes back at the same address
    await until(() => consumer.stats.subscriptions >= 2, 15_000);
    const second = await publish("after");
    await until(() => got.includes(second) && consumer.stats.acked >= 2, 15_000);
  } finally {
    await consumer.stop();
    await done;
    viaProxy.close();
    await proxy.stop();
  }
});
