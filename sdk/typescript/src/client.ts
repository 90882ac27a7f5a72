/**
 * The AutoEcoOps client: one typed sub-client per service of the mesh
 * (`client.auth`, `client.memory`, ...), derived at run time from the
 * generated service descriptors (`gen/services.ts`), so a new RPC needs no
 * hand-written code.
 *
 * Every call goes over real gRPC (HTTP/2, connect-node's gRPC transport) and
 * gets: the bearer token of the client's credentials (unless the RPC is
 * public), one CLIENT span whose `traceparent` every attempt carries, one
 * overall deadline, retries with full-jitter backoff for idempotent RPCs
 * only (the `(autoecoops.common.v1.method)` option), a per-server retry
 * budget, and errors as the `AutoEcoOpsError` tree with decoded details.
 */
import type * as http2 from "node:http2";
import {
  type DescMethod,
  type DescMethodBiDiStreaming,
  type DescMethodClientStreaming,
  type DescMethodServerStreaming,
  type DescMethodUnary,
  type DescService,
  type MessageInitShape,
  type MessageShape,
  getOption,
} from "@bufbuild/protobuf";
import { type Interceptor, type Transport, createClient } from "@connectrpc/connect";
import { Http2SessionManager, createGrpcTransport } from "@connectrpc/connect-node";
import type { Span } from "@opentelemetry/api";
import { type Credentials, TokenSource } from "./credentials.js";
import {
  AutoEcoOpsError,
  Cancelled,
  Unauthenticated,
  toAutoEcoOpsError,
} from "./errors.js";
import { method as methodOption } from "./gen/autoecoops/common/v1/options_pb.js";
import { type Services, services } from "./gen/services.js";
import {
  Attempts,
  type Clock,
  DEFAULT_RETRY,
  NO_RETRY,
  RetryBudget,
  type RetryPolicy,
  SYSTEM_CLOCK,
  type TokenBucket,
} from "./retry.js";
import { type ReplicaOptions, ReplicaTransport, isReplicaSet } from "./replicas.js";
import { type RouteOptions, Routes, isLoopback } from "./routes.js";
import { CallTracer, type TracingOptions, finish, retried, traceHeaders } from "./tracing.js";

/** How long a token request may take. */
const TOKEN_TIMEOUT_MS = 10_000;

/** TLS settings for the client's connections. */
export interface TlsOptions {
  /** PEM roots to verify servers with; default: Node's. */
  ca?: string | Buffer;
  /** PEM client certificate and key, for mutual TLS. */
  cert?: string | Buffer;
  key?: string | Buffer;
  /** The name expected in the server certificate, when not the host dialled. */
  servername?: string;
}

/** Options of an `AutoEcoOps` client. */
export interface AutoEcoOpsOptions extends RouteOptions {
  /** Where the bearer token comes from; none: calls carry no token. */
  credentials?: Credentials;
  /** TLS: true/false, or settings; default TLS except to loopback addresses. */
  tls?: boolean | TlsOptions;
  /** Allow a bearer token over plaintext beyond loopback (never by default). */
  allowInsecureCredentials?: boolean;
  /** Default overall deadline of a unary call, ms (default 30 000; 0: none). Streams have none by default. */
  timeoutMs?: number;
  /** Retry policy for idempotent RPCs (default `DEFAULT_RETRY`); false: never retry. */
  retry?: RetryPolicy | false;
  /** Retry throttling per server (default `new RetryBudget()`); false: none. */
  retryBudget?: RetryBudget | false;
  /** Tracing settings; false: no span and no traceparent. */
  tracing?: TracingOptions | false;
  /** Headers sent with every call. */
  headers?: Readonly<Record<string, string>>;
  /** Connect interceptors added to every transport. */
  interceptors?: Interceptor[];
  /** HTTP/2 keep-alive PING interval, ms (default: connect-node's). */
  pingIntervalMs?: number;
  /** Health checks and DNS lookups of services at several replicas. */
  replicas?: ReplicaOptions;
  /** Clock and randomness of retries (tests). */
  clock?: Clock;
  /** Wall clock of token expiry (tests). */
  wallClock?: () => number;
}

/** Options of one call. */
export interface CallOptions {
  /** The call's overall deadline across all attempts, ms; 0: none. */
  timeoutMs?: number;
  /** Cancels the call (and any wait before a retry). */
  signal?: AbortSignal;
  /** Extra headers of this call. */
  headers?: Readonly<Record<string, string>>;
  /** This call's retry policy (false: no retries); default: the client's. */
  retry?: RetryPolicy | false;
}

/** What happened to a call that returned. */
export interface CallInfo {
  /** `/package.Service/Method`. */
  readonly method: string;
  /** The trace id (32 hex digits) the servers' spans and audit entries show. */
  readonly traceId: string;
  /** Attempts made, the successful one included. */
  readonly attempts: number;
}

/** The `(autoecoops.common.v1.method)` option of an RPC, as the SDK reads it. */
export interface MethodContract {
  readonly permission: string;
  readonly idempotent: boolean;
  readonly audited: boolean;
  readonly public: boolean;
}

/** The contract of `method`, read from the generated descriptor's custom option. */
export function contractOf(method: DescMethod): MethodContract {
  const o = getOption(method, methodOption);
  return {
    permission: o.permission,
    idempotent: o.idempotent,
    audited: o.audited,
    public: o.public,
  };
}

/** A unary RPC of a sub-client. */
export interface UnaryMethod<I extends DescMethodUnary["input"], O extends DescMethodUnary["output"]> {
  (request?: MessageInitShape<I>, options?: CallOptions): Promise<MessageShape<O>>;
  /** Like calling it, and also the call's `CallInfo`. */
  withCall(
    request?: MessageInitShape<I>,
    options?: CallOptions,
  ): Promise<{ response: MessageShape<O>; info: CallInfo }>;
  readonly descriptor: DescMethod;
  readonly contract: MethodContract;
}

/** The responses of a server-streaming or bidirectional call. */
export interface ResponseStream<T> extends AsyncIterable<T> {
  /** The call's trace id, known before the first response. */
  readonly traceId: string;
  /** Stop the call; iteration ends with `Cancelled`. */
  cancel(): void;
}

export interface ServerStreamingMethod<I extends DescMethodServerStreaming["input"], O extends DescMethodServerStreaming["output"]> {
  (request?: MessageInitShape<I>, options?: CallOptions): ResponseStream<MessageShape<O>>;
  readonly descriptor: DescMethod;
  readonly contract: MethodContract;
}

export type Requests<I extends DescMethod["input"]> =
  | AsyncIterable<MessageInitShape<I>>
  | Iterable<MessageInitShape<I>>;

export interface ClientStreamingMethod<I extends DescMethodClientStreaming["input"], O extends DescMethodClientStreaming["output"]> {
  (requests: Requests<I>, options?: CallOptions): Promise<MessageShape<O>>;
  readonly descriptor: DescMethod;
  readonly contract: MethodContract;
}

export interface BiDiStreamingMethod<I extends DescMethodBiDiStreaming["input"], O extends DescMethodBiDiStreaming["output"]> {
  (requests: Requests<I>, options?: CallOptions): ResponseStream<MessageShape<O>>;
  readonly descriptor: DescMethod;
  readonly contract: MethodContract;
}

/** The typed sub-client of one service. */
export type SubClient<S extends DescService> = {
  readonly [P in keyof S["method"]]: S["method"][P] extends DescMethodUnary<infer I, infer O>
    ? UnaryMethod<I, O>
    : S["method"][P] extends DescMethodServerStreaming<infer I, infer O>
      ? ServerStreamingMethod<I, O>
      : S["method"][P] extends DescMethodClientStreaming<infer I, infer O>
        ? ClientStreamingMethod<I, O>
        : S["method"][P] extends DescMethodBiDiStreaming<infer I, infer O>
          ? BiDiStreamingMethod<I, O>
          : never;
};

/** A sub-client for every service of the mesh. */
export type ServiceClients = { readonly [K in keyof Services]: SubClient<Services[K]> };

function sleep(ms: number, signals: AbortSignal[]): Promise<void> {
  return new Promise((resolve, reject) => {
    const done = (): void => {
      clearTimeout(timer);
      for (const s of signals) s.removeEventListener("abort", done);
    };
    const timer = setTimeout(() => {
      done();
      resolve();
    }, ms);
    const abort = (): void => {
      done();
      reject(new Cancelled(1, "cancelled while waiting to retry"));
    };
    for (const s of signals) {
      if (s.aborted) return abort();
      s.addEventListener("abort", abort, { once: true });
    }
  });
}

interface Connection {
  transport: Transport;
  close(): void;
  bucket: TokenBucket | undefined;
  address: string;
}

/** The mesh from Node.js: `new AutoEcoOps(options).auth.listRoles({})`. */
class AutoEcoOpsBase {
  /** The client's token source (undefined without credentials). */
  readonly tokens: TokenSource | undefined;
  readonly options: Readonly<AutoEcoOpsOptions>;
  private readonly routes: Routes;
  private readonly tracer: CallTracer | undefined;
  private readonly budget: RetryBudget | undefined;
  private readonly clock: Clock;
  private readonly connections = new Map<string, Connection>();
  private readonly closing = new AbortController();

  constructor(options: AutoEcoOpsOptions = {}) {
    this.options = { ...options };
    this.routes = new Routes(options);
    this.tracer = options.tracing === false ? undefined : new CallTracer(options.tracing ?? {});
    this.budget = options.retryBudget === false ? undefined : (options.retryBudget ?? new RetryBudget());
    this.clock = options.clock ?? SYSTEM_CLOCK;
    for (const [name, service] of Object.entries(services)) {
      Object.defineProperty(this, name, {
        value: this.subClient(service),
        enumerable: true,
      });
    }
    this.tokens =
      options.credentials === undefined
        ? undefined
        : new TokenSource(
            options.credentials,
            {
              issueToken: (req) =>
                this.subClient(services.auth).issueToken(req, { timeoutMs: TOKEN_TIMEOUT_MS }),
              exchangeToken: (req) =>
                this.subClient(services.auth).exchangeToken(req, { timeoutMs: TOKEN_TIMEOUT_MS }),
            },
            options.wallClock,
          );
  }

  /** The typed sub-client of any generated service descriptor (also one not in `services`). */
  subClient<S extends DescService>(service: S): SubClient<S> {
    const out: Record<string, unknown> = {};
    for (const m of service.methods) out[m.localName] = this.method(m);
    return Object.freeze(out) as SubClient<S>;
  }

  /** The connection (transport, retry bucket) to the server of `service`. */
  connection(service: DescService): Connection {
    const address = this.routes.address(service);
    let conn = this.connections.get(address);
    if (conn === undefined) {
      if (this.closing.signal.aborted) throw new Cancelled(1, "the client is closed");
      conn = this.connect(address);
      this.connections.set(address, conn);
    }
    return conn;
  }

  private connect(address: string): Connection {
    if (isReplicaSet(address)) {
      // Several replicas: each its own HTTP/2 connection, calls round robin
      // over the healthy ones (replicas.ts); one retry budget for the set.
      const set = new ReplicaTransport(address, (one) => this.connectOne(one), this.options.replicas);
      return { transport: set, close: () => set.close(), bucket: this.budget?.bucket(), address };
    }
    const one = this.connectOne(address);
    return { ...one, bucket: this.budget?.bucket(), address };
  }

  private connectOne(address: string): { transport: Transport; close(): void } {
    const o = this.options;
    const tls = o.tls ?? !isLoopback(address);
    const url = /^https?:\/\//.test(address) ? address : `${tls ? "https" : "http"}://${address}`;
    if (o.credentials !== undefined && url.startsWith("http:") && !isLoopback(url) && !o.allowInsecureCredentials)
      throw new TypeError(
        `refusing to send a bearer token in clear text to ${address}: use TLS or allowInsecureCredentials`,
      );
    const nodeOptions: http2.SecureClientSessionOptions = {};
    if (typeof o.tls === "object") {
      if (o.tls.ca !== undefined) nodeOptions.ca = o.tls.ca;
      if (o.tls.cert !== undefined) nodeOptions.cert = o.tls.cert;
      if (o.tls.key !== undefined) nodeOptions.key = o.tls.key;
      if (o.tls.servername !== undefined) nodeOptions.servername = o.tls.servername;
    }
    const manager = new Http2SessionManager(
      url,
      o.pingIntervalMs === undefined ? {} : { pingIntervalMs: o.pingIntervalMs },
      nodeOptions,
    );
    const transport = createGrpcTransport({
      baseUrl: url,
      sessionManager: manager,
      interceptors: o.interceptors ?? [],
    });
    return { transport, close: () => manager.abort() };
  }

  /** Close every connection and end any wait for a retry. */
  close(): void {
    this.closing.abort();
    for (const c of this.connections.values()) c.close();
    this.connections.clear();
  }

  [Symbol.dispose](): void {
    this.close();
  }

  private method(m: DescMethod): unknown {
    const contract = contractOf(m);
    const path = `/${m.parent.typeName}/${m.name}`;
    const attributes = { "rpc.system": "grpc", "rpc.service": m.parent.typeName, "rpc.method": m.name };
    // The raw connect function of this method on its server's transport, made on first use.
    let bound: { fn: (req: unknown, opts: object) => unknown; conn: Connection } | undefined;
    const bind = (): { fn: (req: unknown, opts: object) => unknown; conn: Connection } => {
      const conn = this.connection(m.parent);
      if (bound === undefined || bound.conn !== conn) {
        const raw = createClient(m.parent, conn.transport) as unknown as Record<
          string,
          (req: unknown, opts: object) => unknown
        >;
        bound = { fn: raw[m.localName]!, conn };
      }
      return bound;
    };
    const span = (): Span | undefined => this.tracer?.start(m.parent.typeName + "/" + m.name, attributes);
    const needsToken = !contract.public;

    if (m.methodKind === "unary") {
      const call = async (request: unknown, options: CallOptions = {}) => {
        const s = span();
        const traceId = s?.spanContext().traceId ?? "";
        const headers: Record<string, string> = {
          ...this.options.headers,
          ...options.headers,
          ...(s === undefined ? {} : traceHeaders(s)),
        };
        const { fn, conn } = bind();
        const timeout = options.timeoutMs ?? this.options.timeoutMs ?? 30_000;
        const policy =
          options.retry === false || this.options.retry === false
            ? NO_RETRY
            : (options.retry ?? this.options.retry ?? DEFAULT_RETRY);
        const attempts = new Attempts(
          policy,
          contract.idempotent,
          timeout > 0 ? this.clock.now() + timeout : undefined,
          conn.bucket,
          this.clock,
        );
        const signals = options.signal ? [options.signal, this.closing.signal] : [this.closing.signal];
        let renewed = false;
        for (;;) {
          let token = "";
          let error: AutoEcoOpsError;
          try {
            if (needsToken && this.tokens !== undefined) {
              token = await this.tokens.get();
              headers["authorization"] = `Bearer ${token}`;
            }
            const timeoutMs = attempts.start();
            const response = await fn(request ?? {}, {
              headers,
              timeoutMs: timeoutMs ?? 0,
              signal: options.signal,
            });
            attempts.succeeded();
            if (s !== undefined) finish(s, 0);
            return { response, info: { method: path, traceId, attempts: attempts.count } };
          } catch (e) {
            error = toAutoEcoOpsError(e, { traceId, method: path });
          }
          error.method = path;
          error.attempts = attempts.count;
          if (options.signal?.aborted || this.closing.signal.aborted) {
            if (s !== undefined) finish(s, error.code, error.rawMessage);
            throw error;
          }
          if (
            token &&
            !renewed &&
            error instanceof Unauthenticated &&
            this.tokens !== undefined &&
            this.tokens.invalidate(token)
          ) {
            // The token was rejected (revoked, clock skew): one more attempt with a fresh one.
            renewed = true;
            continue;
          }
          const delay = attempts.failed(error);
          if (delay === undefined) {
            if (s !== undefined) finish(s, error.code, error.rawMessage);
            throw error;
          }
          if (s !== undefined) retried(s, attempts.count, error.codeName, delay);
          try {
            await sleep(delay, signals);
          } catch {
            error.addNote("cancelled while waiting to retry");
            if (s !== undefined) finish(s, error.code, error.rawMessage);
            throw error;
          }
        }
      };
      const fn = async (request?: unknown, options?: CallOptions) =>
        (await call(request, options)).response;
      return Object.assign(fn, { withCall: call, descriptor: m, contract });
    }

    // Streams are never retried: by the time one breaks it may have had
    // effects, and resuming it is the caller's decision.
    const open = (request: unknown, options: CallOptions = {}) => {
      const s = span();
      const traceId = s?.spanContext().traceId ?? "";
      const controller = new AbortController();
      const abort = (): void => controller.abort();
      const self = this;
      const run = async function* (): AsyncGenerator<unknown> {
        let code = 0;
        let message = "";
        options.signal?.addEventListener("abort", abort, { once: true });
        self.closing.signal.addEventListener("abort", abort, { once: true });
        try {
          const headers: Record<string, string> = {
            ...self.options.headers,
            ...options.headers,
            ...(s === undefined ? {} : traceHeaders(s)),
          };
          if (needsToken && self.tokens !== undefined)
            headers["authorization"] = `Bearer ${await self.tokens.get()}`;
          const { fn } = bind();
          const timeout = options.timeoutMs ?? 0;
          const result = fn(request, { headers, timeoutMs: timeout, signal: controller.signal });
          if (m.methodKind === "client_streaming") {
            yield await (result as Promise<unknown>);
          } else {
            yield* result as AsyncIterable<unknown>;
          }
        } catch (e) {
          const error = toAutoEcoOpsError(e, { traceId, method: path });
          error.method = path;
          code = error.code;
          message = error.rawMessage;
          throw error;
        } finally {
          options.signal?.removeEventListener("abort", abort);
          self.closing.signal.removeEventListener("abort", abort);
          // Ended early by the caller (break/return): stop the call.
          controller.abort();
          if (s !== undefined) finish(s, code, message);
        }
      };
      const gen = run();
      return Object.assign(gen, { traceId, cancel: abort });
    };
    const streamFn =
      m.methodKind === "client_streaming"
        ? async (requests: unknown, options?: CallOptions) => {
            for await (const r of open(toAsync(requests), options)) return r;
            throw new Cancelled(1, "the call ended without a response");
          }
        : m.methodKind === "bidi_streaming"
          ? (requests: unknown, options?: CallOptions) => open(toAsync(requests), options)
          : (request?: unknown, options?: CallOptions) => open(request ?? {}, options);
    return Object.assign(streamFn, { descriptor: m, contract });
  }
}

async function* fromSync<T>(items: Iterable<T>): AsyncIterable<T> {
  yield* items;
}

function toAsync(requests: unknown): AsyncIterable<unknown> {
  if (requests !== null && typeof requests === "object" && Symbol.asyncIterator in requests)
    return requests as AsyncIterable<unknown>;
  if (requests !== null && typeof requests === "object" && Symbol.iterator in requests)
    return fromSync(requests as Iterable<unknown>);
  throw new TypeError("a streaming call takes an iterable or async iterable of requests");
}

/** The AutoEcoOps client: `client.<service>.<rpc>(request, options)`. */
export type AutoEcoOps = AutoEcoOpsBase & ServiceClients;
/** Create a client: `new AutoEcoOps({ credentials, addresses })`. */
export const AutoEcoOps = AutoEcoOpsBase as unknown as new (options?: AutoEcoOpsOptions) => AutoEcoOps;
