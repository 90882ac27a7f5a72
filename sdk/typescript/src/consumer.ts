/**
 * Consume events from the event bus: write a handler, the helper does the rest.
 *
 *     const consumer = new Consumer(client, {
 *       topic: "infra.sync", group: "deployer", concurrency: 4,
 *       handler: async (event) => { await apply(event.data) },  // return: ack; throw: nack
 *     });
 *     const done = consumer.run();   // until consumer.stop()
 *
 * The Python SDK's consumer semantics:
 * - concurrency: up to `concurrency` handlers run at once, and the bus never
 *   sends more than that (max_in_flight), so no event waits in a client
 *   buffer while its lease runs; `concurrency: 1` handles one at a time, in order;
 * - keep-alive: leases of running handlers are extended (ExtendLease) every
 *   third of the visibility timeout, so a long handler is not redelivered;
 * - acks are batched (one Ack for what finished meanwhile); a handler's throw
 *   becomes a Nack whose reason is the error; throw `PermanentError` to
 *   dead-letter at once;
 * - reconnects with jittered backoff when the bus is unreachable, and a
 *   graceful stop: no new events, running handlers get a grace period (their
 *   `event.signal` aborts at its end), then the rest is nacked.
 */
import { type Registry, createRegistry } from "@bufbuild/protobuf";
import { anyUnpack } from "@bufbuild/protobuf/wkt";
import type { Message, MessageInitShape } from "@bufbuild/protobuf";
import { Code } from "@connectrpc/connect";
import type { AutoEcoOps } from "./client.js";
import { AutoEcoOpsError } from "./errors.js";
import type { Envelope } from "./gen/autoecoops/events/v1/envelope_pb.js";
import {
  type Delivery,
  type RetryPolicySchema,
  StartPosition,
} from "./gen/autoecoops/events/v1/events_pb.js";
import { files } from "./gen/services.js";

/** Codes after which the subscription is simply opened again. */
const RECONNECT = new Set<Code>([
  Code.Unavailable,
  Code.DeadlineExceeded,
  Code.Internal,
  Code.Unknown,
  Code.Canceled,
  Code.ResourceExhausted,
]);
export const MAX_REASON = 1000;

/** Thrown by a handler for an event that can never succeed: dead-letter it now. */
export class PermanentError extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = "PermanentError";
  }
}

/** One delivery handed to a handler. */
export interface Event {
  /** Settles this delivery (the helper does it). */
  readonly deliveryId: string;
  /** The event's id. */
  readonly eventId: string;
  /** The CloudEvents type, e.g. `autoecoops.infra.sync.started`. */
  readonly type: string;
  /** The whole envelope: source, subject, actor, trace context... */
  readonly envelope: Envelope;
  /** The payload unpacked to its generated message; undefined if its type is unknown. */
  readonly data: Message | undefined;
  /** Which delivery of this event this is, from 1. */
  readonly attempt: number;
  /** Aborts when the consumer stops and the grace period is over. */
  readonly signal: AbortSignal;
}

export type Handler = (event: Event) => unknown;

export interface ConsumerOptions {
  topic: string;
  group: string;
  handler: Handler;
  /** This member's name; stable across restarts is best. */
  consumer?: string;
  /** Handlers at once (default 1: in order). */
  concurrency?: number;
  /** Lease of a delivery, ms (default 30 000). */
  visibilityTimeoutMs?: number;
  /** The group's redelivery policy. */
  retryPolicy?: MessageInitShape<typeof RetryPolicySchema>;
  /** Where a new group starts (default latest). */
  startPosition?: StartPosition;
  /** Largest wait between reconnects, ms (default 30 000). */
  maxReconnectBackoffMs?: number;
  /** How long an ack may wait for others to share its Ack call, ms (default 5). */
  ackDelayMs?: number;
  /** Where warnings go (default console.warn). */
  log?: (message: string) => void;
  /** Payload types beyond the generated ones. */
  registry?: Registry;
}

const REGISTRY = createRegistry(...files);

/** Resolves after `ms`, or at once when `signal` aborts. */
function pause(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (signal.aborted) return resolve();
    const done = (): void => {
      clearTimeout(t);
      signal.removeEventListener("abort", done);
      resolve();
    };
    const t = setTimeout(done, ms);
    signal.addEventListener("abort", done, { once: true });
  });
}

function reasonOf(err: unknown): string {
  const text =
    err instanceof Error
      ? err.message
        ? `${err.name}: ${err.message}`
        : err.name
      : String(err);
  return text.slice(0, MAX_REASON);
}

interface Running {
  promise: Promise<void>;
  abort: AbortController;
  settled: boolean;
}

/** A member of a consumer group, running `handler` for each event. */
export class Consumer {
  readonly topic: string;
  readonly group: string;
  readonly consumer: string;
  readonly concurrency: number;
  /** Deliveries acked, nacked, and subscriptions opened (for metrics and tests). */
  readonly stats = { acked: 0, nacked: 0, subscriptions: 0 };
  private readonly o: ConsumerOptions;
  private readonly stopping = new AbortController();
  private subscription: AbortController | undefined;
  private readonly running = new Map<string, Running>();
  private acks: string[] = [];
  private ackTimer: NodeJS.Timeout | undefined;
  private flushing: Promise<void> | undefined;
  private free: number;
  private readonly waiters: (() => void)[] = [];
  private readonly log: (message: string) => void;
  private readonly registry: Registry;

  constructor(
    private readonly client: AutoEcoOps,
    options: ConsumerOptions,
  ) {
    const concurrency = options.concurrency ?? 1;
    if (!(Number.isInteger(concurrency) && concurrency >= 1))
      throw new RangeError("concurrency must be an integer of at least 1");
    this.o = options;
    this.topic = options.topic;
    this.group = options.group;
    this.consumer = options.consumer ?? `${process.env["HOSTNAME"] ?? "node"}-${process.pid}`;
    this.concurrency = concurrency;
    this.free = concurrency;
    this.log = options.log ?? ((m) => console.warn(`autoecoops consumer: ${m}`));
    this.registry = options.registry ? createRegistry(REGISTRY, options.registry) : REGISTRY;
  }

  /**
   * Consume until `stop()`. Rejects with the bus's error if it is not
   * retryable (a bad request, no permission).
   */
  async run(): Promise<void> {
    const visibility = this.o.visibilityTimeoutMs ?? 30_000;
    const keepalive = setInterval(() => void this.keepAlive(), Math.max(visibility / 3, 50));
    let backoff = 100;
    const max = this.o.maxReconnectBackoffMs ?? 30_000;
    try {
      while (!this.stopping.signal.aborted) {
        try {
          await this.subscribeOnce(visibility);
          backoff = 100;
        } catch (err) {
          if (this.stopping.signal.aborted) break;
          if (!(err instanceof AutoEcoOpsError) || !RECONNECT.has(err.code)) throw err;
          this.log(`event stream ended (${err.codeName}); reconnecting`);
        }
        if (this.stopping.signal.aborted) break;
        // Jittered, so a restarted bus is not hit by every consumer at once.
        await pause(backoff * (0.5 + Math.random()), this.stopping.signal);
        backoff = Math.min(backoff * 2, max);
      }
    } finally {
      clearInterval(keepalive);
      await this.drain();
    }
  }

  private async subscribeOnce(visibility: number): Promise<void> {
    this.subscription = new AbortController();
    const stop = (): void => this.subscription?.abort();
    this.stopping.signal.addEventListener("abort", stop, { once: true });
    try {
      const stream = this.client.events.subscribe(
        {
          topic: this.topic,
          group: this.group,
          consumer: this.consumer,
          maxInFlight: this.concurrency,
          maxBatchSize: this.concurrency,
          visibilityTimeout: {
            seconds: BigInt(Math.floor(visibility / 1000)),
            nanos: Math.round((visibility % 1000) * 1e6),
          },
          startPosition: this.o.startPosition ?? StartPosition.LATEST,
          ...(this.o.retryPolicy ? { retryPolicy: this.o.retryPolicy } : {}),
        },
        { signal: this.subscription.signal },
      );
      this.stats.subscriptions += 1;
      for await (const reply of stream) {
        const batch = reply.deliveries.length > 0 ? reply.deliveries : reply.delivery ? [reply.delivery] : [];
        for (const d of batch) {
          await this.acquire();
          this.start(d);
        }
      }
    } finally {
      this.stopping.signal.removeEventListener("abort", stop);
      this.subscription = undefined;
    }
  }

  private acquire(): Promise<void> {
    if (this.free > 0) {
      this.free -= 1;
      return Promise.resolve();
    }
    return new Promise((resolve) => this.waiters.push(resolve));
  }

  private release(): void {
    const next = this.waiters.shift();
    if (next) next();
    else this.free += 1;
  }

  private start(d: Delivery): void {
    const abort = new AbortController();
    const entry: Running = { promise: Promise.resolve(), abort, settled: false };
    entry.promise = this.handle(d, entry).finally(() => {
      this.running.delete(d.deliveryId);
      this.release();
    });
    this.running.set(d.deliveryId, entry);
  }

  private async handle(d: Delivery, entry: Running): Promise<void> {
    const envelope = d.envelope!;
    let data: Message | undefined;
    try {
      data = envelope.data ? anyUnpack(envelope.data, this.registry) : undefined;
    } catch {
      data = undefined;
    }
    const event: Event = {
      deliveryId: d.deliveryId,
      eventId: d.eventId,
      type: envelope.type,
      envelope,
      data,
      attempt: d.attempt,
      signal: entry.abort.signal,
    };
    try {
      await this.o.handler(event);
    } catch (err) {
      if (entry.settled) return;
      entry.settled = true;
      await this.nack(d.deliveryId, reasonOf(err), err instanceof PermanentError);
      return;
    }
    if (entry.settled) return; // nacked by stop() past the grace period
    entry.settled = true;
    this.ack(d.deliveryId);
  }

  private ack(deliveryId: string): void {
    this.acks.push(deliveryId);
    if (this.acks.length >= this.concurrency || this.stopping.signal.aborted) {
      void this.flush();
    } else if (this.ackTimer === undefined) {
      // A moment for the other handlers of the batch: one Ack for many events.
      this.ackTimer = setTimeout(() => void this.flush(), this.o.ackDelayMs ?? 5);
    }
  }

  /** Send the pending acks; one Ack in flight at a time, whatever finished meanwhile rides the next. */
  private flush(): Promise<void> {
    if (this.ackTimer !== undefined) {
      clearTimeout(this.ackTimer);
      this.ackTimer = undefined;
    }
    if (this.flushing) return this.flushing;
    const batch = this.acks;
    if (batch.length === 0) return Promise.resolve();
    this.acks = [];
    this.flushing = (async () => {
      try {
        const reply = await this.client.events.ack({ deliveryIds: batch }, { timeoutMs: 10_000 });
        this.stats.acked += batch.length;
        if (reply.expiredDeliveryIds.length > 0)
          this.log(
            `${reply.expiredDeliveryIds.length} event(s) finished after their lease expired; they are redelivered`,
          );
      } catch (err) {
        // The lease runs out and the bus redelivers: nothing is lost.
        this.log(`ack failed (${reasonOf(err)}): the events come back when their leases expire`);
      } finally {
        this.flushing = undefined;
      }
      if (this.acks.length > 0) await this.flush();
    })();
    return this.flushing;
  }

  private async nack(deliveryId: string, reason: string, deadLetter: boolean): Promise<void> {
    try {
      await this.client.events.nack({ deliveryId, reason, deadLetter }, { timeoutMs: 10_000 });
      this.stats.nacked += 1;
    } catch (err) {
      this.log(`nack failed (${reasonOf(err)}): the event comes back when its lease expires`);
    }
  }

  private async keepAlive(): Promise<void> {
    const ids = [...this.running.entries()].filter(([, r]) => !r.settled).map(([id]) => id);
    if (ids.length === 0) return;
    try {
      const reply = await this.client.events.extendLease({ deliveryIds: ids }, { timeoutMs: 5_000 });
      if (reply.expiredDeliveryIds.length > 0)
        this.log(`${reply.expiredDeliveryIds.length} lease(s) lapsed while handling`);
    } catch (err) {
      this.log(`keep-alive failed (${reasonOf(err)}); retrying`);
    }
  }

  /**
   * Stop taking events; give running handlers `graceMs` (default 30 000),
   * then abort their signals and nack them. Resolves once `run()` has settled
   * everything it can.
   */
  async stop(graceMs = 30_000): Promise<void> {
    this.stopping.abort();
    const running = [...this.running.values()];
    if (running.length === 0) return;
    let timer: NodeJS.Timeout | undefined;
    const late = await Promise.race([
      Promise.all(running.map((r) => r.promise)).then(() => false),
      new Promise<boolean>((resolve) => {
        timer = setTimeout(() => resolve(true), graceMs);
      }),
    ]);
    clearTimeout(timer);
    if (!late) return;
    await Promise.all(
      [...this.running.entries()].map(async ([id, r]) => {
        if (r.settled) return;
        r.settled = true;
        r.abort.abort();
        await this.nack(id, "consumer stopped before finishing", false);
      }),
    );
  }

  private async drain(): Promise<void> {
    // Handlers nacked by stop() may still run; the others end before the last acks go out.
    await Promise.all([...this.running.values()].filter((r) => !r.settled).map((r) => r.promise));
    await this.flush();
    while (this.flushing) await this.flushing;
  }
}
