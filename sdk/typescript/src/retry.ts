/**
 * When and how a failed call is tried again.
 *
 * `RetryPolicy` is exponential backoff with full jitter: the wait before retry
 * n is uniform in [0, min(maxDelayMs, initialDelayMs * multiplier^(n-1))].
 * Whether a method may be retried at all is not the policy's call: only RPCs
 * whose `(autoecoops.common.v1.method)` option says `idempotent` are, read
 * from the generated descriptors (see `methodPolicy`).
 *
 * `RetryBudget` is gRPC's retry throttling (gRFC A6): a token bucket per
 * server, drained by failures and refilled by successes, that stops retries
 * while half or less of it is left, so clients do not storm a failing server.
 */
import { Code } from "@connectrpc/connect";
import type { AutoEcoOpsError } from "./errors.js";

/** An immutable retry policy; `with()` returns a changed copy. */
export class RetryPolicy {
  /** Upper bound of the first wait, ms. */
  readonly initialDelayMs: number;
  /** Growth of the bound per retry. */
  readonly multiplier: number;
  /** The largest bound, ms. */
  readonly maxDelayMs: number;
  /** Attempts in all, the first included; 1 never retries. */
  readonly maxAttempts: number;
  /** Codes retried (for idempotent methods) whatever the details. */
  readonly codes: ReadonlySet<Code>;
  /** Codes retried only when the server sent RetryInfo, after its delay. */
  readonly codesWithRetryInfo: ReadonlySet<Code>;

  constructor(
    options: {
      initialDelayMs?: number;
      multiplier?: number;
      maxDelayMs?: number;
      maxAttempts?: number;
      codes?: Iterable<Code>;
      codesWithRetryInfo?: Iterable<Code>;
    } = {},
  ) {
    this.initialDelayMs = options.initialDelayMs ?? 100;
    this.multiplier = options.multiplier ?? 2;
    this.maxDelayMs = options.maxDelayMs ?? 5000;
    this.maxAttempts = options.maxAttempts ?? 5;
    this.codes = new Set(options.codes ?? [Code.Unavailable]);
    this.codesWithRetryInfo = new Set(
      options.codesWithRetryInfo ?? [Code.ResourceExhausted, Code.Aborted],
    );
    if (!(this.initialDelayMs > 0)) throw new RangeError("initialDelayMs must be positive");
    if (!(this.maxDelayMs >= this.initialDelayMs))
      throw new RangeError("maxDelayMs must be at least initialDelayMs");
    if (!(this.multiplier >= 1)) throw new RangeError("multiplier must be at least 1");
    if (!(Number.isInteger(this.maxAttempts) && this.maxAttempts >= 1 && this.maxAttempts <= 100))
      throw new RangeError("maxAttempts must be an integer in [1, 100]");
    Object.freeze(this);
  }

  /** A copy with some settings changed. */
  with(changes: ConstructorParameters<typeof RetryPolicy>[0]): RetryPolicy {
    return new RetryPolicy({
      initialDelayMs: this.initialDelayMs,
      multiplier: this.multiplier,
      maxDelayMs: this.maxDelayMs,
      maxAttempts: this.maxAttempts,
      codes: this.codes,
      codesWithRetryInfo: this.codesWithRetryInfo,
      ...changes,
    });
  }

  /** The largest wait before retry `retry` (1 is the first), ms. */
  bound(retry: number): number {
    return Math.min(this.maxDelayMs, this.initialDelayMs * this.multiplier ** (retry - 1));
  }

  /** The wait before retry `retry` for a `random` in [0, 1): full jitter. */
  backoff(retry: number, random: number): number {
    return random * this.bound(retry);
  }

  /** Whether `error` is worth another attempt of an idempotent call. */
  retryable(error: AutoEcoOpsError): boolean {
    return (
      this.codes.has(error.code) ||
      (this.codesWithRetryInfo.has(error.code) && error.retryDelayMs !== undefined)
    );
  }

  /** Whether `error` signals an overloaded or unreachable server (drains the budget). */
  countsAgainstBudget(error: AutoEcoOpsError): boolean {
    return this.codes.has(error.code) || this.codesWithRetryInfo.has(error.code);
  }
}

/** The client's default policy. */
export const DEFAULT_RETRY = new RetryPolicy();
/** A policy that never retries. */
export const NO_RETRY = new RetryPolicy({ maxAttempts: 1 });

/** Retry throttling settings (gRFC A6); the client keeps one bucket per server. */
export class RetryBudget {
  /** The bucket's size; retries stop while it holds half or less. */
  readonly maxTokens: number;
  /** What a success puts back (a failure takes 1). */
  readonly tokenRatio: number;

  constructor(options: { maxTokens?: number; tokenRatio?: number } = {}) {
    this.maxTokens = options.maxTokens ?? 10;
    this.tokenRatio = options.tokenRatio ?? 0.1;
    if (!(this.maxTokens > 0 && this.maxTokens <= 1000))
      throw new RangeError("maxTokens must be in (0, 1000]");
    if (!(this.tokenRatio > 0 && this.tokenRatio <= 1))
      throw new RangeError("tokenRatio must be in (0, 1]");
    Object.freeze(this);
  }

  /** A full bucket for one server. */
  bucket(): TokenBucket {
    return new TokenBucket(this.maxTokens, this.tokenRatio);
  }
}

/** One server's throttle state, counted in thousandths of a token as gRPC does. */
export class TokenBucket {
  private readonly max: number;
  private readonly ratio: number;
  private readonly threshold: number;
  private milli: number;

  constructor(maxTokens: number, tokenRatio: number) {
    this.max = Math.round(maxTokens * 1000);
    this.ratio = Math.round(tokenRatio * 1000);
    this.threshold = Math.floor(this.max / 2);
    this.milli = this.max;
  }

  /** Tokens left. */
  get tokens(): number {
    return this.milli / 1000;
  }

  /** An attempt got an answer. */
  succeeded(): void {
    this.milli = Math.min(this.max, this.milli + this.ratio);
  }

  /** An attempt met an overloaded or unavailable server. */
  failed(): void {
    this.milli = Math.max(0, this.milli - 1000);
  }

  /** Retries are allowed while more than half the bucket is left. */
  allowsRetry(): boolean {
    return this.milli > this.threshold;
  }
}

/** The clock and randomness a call's loop uses (replaceable in tests). */
export interface Clock {
  /** Milliseconds on a monotonic clock. */
  now(): number;
  /** A number in [0, 1). */
  random(): number;
}

export const SYSTEM_CLOCK: Clock = {
  now: () => performance.now(),
  random: () => Math.random(),
};

/**
 * The bookkeeping of one call's attempts: one overall deadline, each attempt
 * gets what is left of it, and a wait that would not end before the deadline
 * is not started.
 */
export class Attempts {
  /** Attempts started so far. */
  count = 0;

  constructor(
    private readonly policy: RetryPolicy,
    private readonly idempotent: boolean,
    /** Absolute deadline on `clock.now()`, or undefined for none. */
    readonly deadline: number | undefined,
    private readonly bucket: TokenBucket | undefined,
    private readonly clock: Clock,
  ) {}

  /** Begin an attempt; its timeout in ms (what is left of the deadline), or undefined. */
  start(): number | undefined {
    this.count += 1;
    if (this.deadline === undefined) return undefined;
    return Math.max(1, Math.floor(this.deadline - this.clock.now()));
  }

  /** The attempt got a response. */
  succeeded(): void {
    this.bucket?.succeeded();
  }

  /** The ms to wait before the next attempt, or undefined to give up (with a note saying why). */
  failed(error: AutoEcoOpsError): number | undefined {
    if (this.bucket !== undefined && this.policy.countsAgainstBudget(error)) this.bucket.failed();
    let why = this.refusal(error);
    if (why === undefined) {
      const delay =
        error.retryDelayMs ?? this.policy.backoff(this.count, this.clock.random());
      if (this.deadline === undefined || this.clock.now() + delay < this.deadline) return delay;
      why = `not retried after ${this.count} attempt(s): waiting ${Math.round(delay)}ms would pass the deadline`;
    }
    if (why) error.addNote(why);
    return undefined;
  }

  private refusal(error: AutoEcoOpsError): string | undefined {
    if (!this.policy.retryable(error)) return "";
    if (!this.idempotent) return "not retried: the method is not idempotent (its proto option)";
    if (this.count >= this.policy.maxAttempts) return `gave up after ${this.count} attempts`;
    if (this.bucket !== undefined && !this.bucket.allowsRetry())
      return `retry budget exhausted after ${this.count} attempt(s): the server keeps failing`;
    return undefined;
  }
}
