/**
 * Several replicas behind one address: `ip:port,ip:port`, a list in the
 * options, or `dns:///name:port` (every A/AAAA record of the name, looked up
 * again every `resolveIntervalMs`).
 *
 * connect-node has no load balancing of its own, so `ReplicaTransport` is a
 * small one with gRPC's `round_robin` behaviour: each call goes to the next
 * replica in the rotation; a replica leaves the rotation when a call on it
 * fails UNAVAILABLE or its grpc.health.v1 status (`Health/Check` on "", every
 * `healthIntervalMs`) is not SERVING, and comes back when it reports SERVING
 * again. It resends a call itself only when the call never reached the
 * replica (a refused connection or stream: gRPC's transparent retry);
 * otherwise the client's one retry loop retries idempotent calls, each
 * attempt picked anew, so a retry after a replica died goes to another one.
 */
import { lookup } from "node:dns/promises";
import {
  type DescMessage,
  type DescMethodStreaming,
  type DescMethodUnary,
  type DescService,
  type MessageInitShape,
  create,
  createFileRegistry,
} from "@bufbuild/protobuf";
import { FileDescriptorProtoSchema } from "@bufbuild/protobuf/wkt";
import {
  Code,
  ConnectError,
  type ContextValues,
  type StreamResponse,
  type Transport,
  type UnaryResponse,
} from "@connectrpc/connect";

/** grpc.health.v1.Health, built here: it is not one of the mesh's contracts. */
const HEALTH: DescService = createFileRegistry(
  create(FileDescriptorProtoSchema, {
    name: "grpc/health/v1/health.proto",
    package: "grpc.health.v1",
    syntax: "proto3",
    messageType: [
      {
        name: "HealthCheckRequest",
        field: [{ name: "service", number: 1, type: 9, label: 1, jsonName: "service" }],
      },
      {
        name: "HealthCheckResponse",
        field: [
          {
            name: "status",
            number: 1,
            type: 14,
            label: 1,
            typeName: ".grpc.health.v1.HealthCheckResponse.ServingStatus",
            jsonName: "status",
          },
        ],
        enumType: [
          {
            name: "ServingStatus",
            value: [
              { name: "UNKNOWN", number: 0 },
              { name: "SERVING", number: 1 },
              { name: "NOT_SERVING", number: 2 },
              { name: "SERVICE_UNKNOWN", number: 3 },
            ],
          },
        ],
      },
    ],
    service: [
      {
        name: "Health",
        method: [
          {
            name: "Check",
            inputType: ".grpc.health.v1.HealthCheckRequest",
            outputType: ".grpc.health.v1.HealthCheckResponse",
          },
        ],
      },
    ],
  }),
  () => undefined,
).getService("grpc.health.v1.Health")!;
const CHECK = HEALTH.methods[0] as DescMethodUnary;
const SERVING = 1;

/** Whether `address` names several replicas (a list, or a `dns:` name). */
export function isReplicaSet(address: string): boolean {
  return address.includes(",") || address.startsWith("dns:");
}

/** The entries of a list address (`ipv4:`/`ipv6:` prefixes, as gRPC writes them, allowed). */
export function replicaList(address: string): string[] {
  const body = address.replace(/^ipv[46]:/, "");
  const entries = body.split(",").map((e) => e.trim());
  for (const e of entries)
    if (!/^(\[[0-9a-fA-F:.]+\]|[^:,\s]+):\d{1,5}$/.test(e))
      throw new TypeError(`${address}: ${JSON.stringify(e)} is not host:port`);
  return entries;
}

/** One replica's connection, made by the client (TLS, keep-alive, interceptors). */
export interface ReplicaConnection {
  transport: Transport;
  close(): void;
}

export interface ReplicaOptions {
  /** How often each replica's health is checked, ms (default 1000). */
  healthIntervalMs?: number;
  /** How long a health check may take, ms (default 2000). */
  healthTimeoutMs?: number;
  /** How often a `dns:` name is looked up again, ms (default 30 000). */
  resolveIntervalMs?: number;
}

interface Replica {
  readonly address: string;
  readonly conn: ReplicaConnection;
  /** In the rotation: its last health check said SERVING and no call since met UNAVAILABLE. */
  up: boolean;
  checking: boolean;
}

/** A `Transport` that spreads calls round robin over the healthy replicas. */
export class ReplicaTransport implements Transport {
  private replicas: Replica[] = [];
  private next = 0;
  private resolved = 0;
  private resolving: Promise<void> | undefined;
  private timer: ReturnType<typeof setInterval> | undefined;
  private closed = false;
  private readonly healthIntervalMs: number;
  private readonly healthTimeoutMs: number;
  private readonly resolveIntervalMs: number;

  constructor(
    readonly address: string,
    private readonly connect: (address: string) => ReplicaConnection,
    options: ReplicaOptions = {},
  ) {
    this.healthIntervalMs = options.healthIntervalMs ?? 1000;
    this.healthTimeoutMs = options.healthTimeoutMs ?? 2000;
    this.resolveIntervalMs = options.resolveIntervalMs ?? 30_000;
    if (!address.startsWith("dns:")) this.use(replicaList(address));
  }

  /** The replicas and whether each is in the rotation (for tests and diagnostics). */
  get state(): { address: string; up: boolean }[] {
    return this.replicas.map((r) => ({ address: r.address, up: r.up }));
  }

  async unary<I extends DescMessage, O extends DescMessage>(
    method: DescMethodUnary<I, O>,
    signal: AbortSignal | undefined,
    timeoutMs: number | undefined,
    header: Parameters<Transport["unary"]>[3],
    input: MessageInitShape<I>,
    contextValues?: ContextValues,
  ): Promise<UnaryResponse<I, O>> {
    for (let tries = 1; ; tries++) {
      const r = await this.pick();
      try {
        return await r.conn.transport.unary(method, signal, timeoutMs, header, input, contextValues);
      } catch (e) {
        if (this.failed(r, e) && tries < this.replicas.length) continue;
        throw e;
      }
    }
  }

  async stream<I extends DescMessage, O extends DescMessage>(
    method: DescMethodStreaming<I, O>,
    signal: AbortSignal | undefined,
    timeoutMs: number | undefined,
    header: Parameters<Transport["unary"]>[3],
    input: AsyncIterable<MessageInitShape<I>>,
    contextValues?: ContextValues,
  ): Promise<StreamResponse<I, O>> {
    for (let tries = 1; ; tries++) {
      const r = await this.pick();
      try {
        return await r.conn.transport.stream(method, signal, timeoutMs, header, input, contextValues);
      } catch (e) {
        if (this.failed(r, e) && tries < this.replicas.length) continue;
        throw e;
      }
    }
  }

  /** Close every replica's connection and stop the health checks. */
  close(): void {
    this.closed = true;
    if (this.timer !== undefined) clearInterval(this.timer);
    for (const r of this.replicas) r.conn.close();
    this.replicas = [];
  }

  private async pick(): Promise<Replica> {
    if (this.closed) throw new ConnectError("the client is closed", Code.Canceled);
    if (this.address.startsWith("dns:") && Date.now() - this.resolved > this.resolveIntervalMs)
      await (this.resolving ??= this.resolve().finally(() => (this.resolving = undefined)));
    this.watch();
    const all = this.replicas;
    if (all.length === 0)
      throw new ConnectError(`${this.address}: no replica address resolved`, Code.Unavailable);
    const up = all.filter((r) => r.up);
    // None healthy: try them all rather than fail without asking (one may be
    // back before its next health check); the error is then the replica's own.
    const pool = up.length > 0 ? up : all;
    const r = pool[this.next++ % pool.length]!;
    return r;
  }

  /**
   * Take `r` out of the rotation if `e` says it is gone; true when the call
   * never reached it (refused connection or stream), so sending it to another
   * replica is safe whatever the method, as gRPC's transparent retry does.
   */
  private failed(r: Replica, e: unknown): boolean {
    const err = ConnectError.from(e);
    const cause = (err.cause ?? {}) as { code?: unknown };
    const neverSent =
      cause.code === "ECONNREFUSED" || /ECONNREFUSED|REFUSED_STREAM/.test(err.rawMessage);
    if (err.code === Code.Unavailable || neverSent) {
      if (r.up) {
        r.up = false;
        void this.check(r);
      }
    }
    return neverSent;
  }

  private use(addresses: string[]): void {
    const keep = new Map(this.replicas.map((r) => [r.address, r]));
    this.replicas = addresses.map(
      (address) =>
        keep.get(address) ?? { address, conn: this.connect(address), up: true, checking: false },
    );
    for (const [address, r] of keep) if (!addresses.includes(address)) r.conn.close();
  }

  private async resolve(): Promise<void> {
    const target = this.address.replace(/^dns:(\/\/[^/]*\/)?/, "");
    const colon = target.lastIndexOf(":");
    const host = target.slice(0, colon).replace(/^\[|\]$/g, "");
    const port = target.slice(colon + 1);
    try {
      const records = await lookup(host, { all: true });
      const found = [...new Set(records.map((a) => (a.family === 6 ? `[${a.address}]:${port}` : `${a.address}:${port}`)))];
      if (found.length > 0) this.use(found);
    } catch {
      // Keep the replicas known so far; an empty set answers UNAVAILABLE.
    }
    this.resolved = Date.now();
  }

  private watch(): void {
    if (this.timer !== undefined || this.closed) return;
    this.timer = setInterval(() => {
      for (const r of this.replicas) void this.check(r);
    }, this.healthIntervalMs);
    // Health checks alone never keep the process alive.
    this.timer.unref();
  }

  private async check(r: Replica): Promise<void> {
    if (r.checking || this.closed) return;
    r.checking = true;
    try {
      const res = await r.conn.transport.unary(CHECK, undefined, this.healthTimeoutMs, undefined, {
        service: "",
      });
      r.up = (res.message as unknown as { status: number }).status === SERVING;
    } catch (e) {
      // A server without the health service is taken at its word that it serves.
      r.up = ConnectError.from(e).code === Code.Unimplemented;
    } finally {
      r.checking = false;
    }
  }
}
