/**
 * A real HTTP/2 hop in front of one real server: it forwards gRPC calls, or
 * answers the next ones with an injected status (and google.rpc.Status
 * details), and records when each call arrived. The tests' stand-in for an
 * overloaded or restarting server; the calls it forwards reach the real mesh.
 */
import * as http2 from "node:http2";
import type { AddressInfo } from "node:net";
import { create, toBinary } from "@bufbuild/protobuf";
import { type Any, anyPack, DurationSchema } from "@bufbuild/protobuf/wkt";
import { RetryInfoSchema } from "../src/gen/google/rpc/error_details_pb.js";
import { StatusSchema } from "../src/gen/google/rpc/status_pb.js";

export interface Fault {
  code: number;
  message: string;
  /** RetryInfo delay to send in grpc-status-details-bin, ms. */
  retryDelayMs?: number;
}

export class FaultProxy {
  /** Calls seen: path and arrival time (performance.now()). */
  readonly seen: { path: string; at: number }[] = [];
  /** Faults to answer the next calls with, in order; empty: forward. */
  faults: Fault[] = [];
  /** Answer every call with this fault (overrides `faults`). */
  always: Fault | undefined;
  private server: http2.Http2Server | undefined;
  private upstream: http2.ClientHttp2Session | undefined;
  address = "";

  constructor(private readonly target: string) {}

  async start(port = 0): Promise<this> {
    this.server = http2.createServer();
    trackSessions(this.server);
    this.server.on("stream", (stream, headers) => this.onStream(stream, headers));
    await new Promise<void>((ok) => this.server!.listen(port, "127.0.0.1", ok));
    this.address = `127.0.0.1:${(this.server.address() as AddressInfo).port}`;
    return this;
  }

  calls(path: string): { path: string; at: number }[] {
    return this.seen.filter((s) => s.path.endsWith(path));
  }

  private up(): http2.ClientHttp2Session {
    if (this.upstream === undefined || this.upstream.destroyed || this.upstream.closed) {
      this.upstream = http2.connect(`http://${this.target}`);
      this.upstream.on("error", () => undefined);
    }
    return this.upstream;
  }

  private onStream(stream: http2.ServerHttp2Stream, headers: http2.IncomingHttpHeaders): void {
    stream.on("error", () => undefined);
    const path = String(headers[":path"]);
    this.seen.push({ path, at: performance.now() });
    const fault = this.always ?? this.faults.shift();
    if (fault !== undefined) {
      const out: http2.OutgoingHttpHeaders = {
        ":status": 200,
        "content-type": "application/grpc",
        "grpc-status": String(fault.code),
        "grpc-message": encodeURIComponent(fault.message),
      };
      if (fault.retryDelayMs !== undefined) {
        const details: Any[] = [
          anyPack(
            RetryInfoSchema,
            create(RetryInfoSchema, {
              retryDelay: create(DurationSchema, {
                seconds: BigInt(Math.floor(fault.retryDelayMs / 1000)),
                nanos: (fault.retryDelayMs % 1000) * 1e6,
              }),
            }),
          ),
        ];
        const status = create(StatusSchema, { code: fault.code, message: fault.message, details });
        out["grpc-status-details-bin"] = Buffer.from(toBinary(StatusSchema, status)).toString("base64");
      }
      stream.resume();
      stream.respond(out, { endStream: true });
      return;
    }
    const forward: http2.OutgoingHttpHeaders = {};
    for (const [k, v] of Object.entries(headers)) {
      if (k.startsWith(":") && k !== ":method" && k !== ":path") continue;
      if (k === "connection" || k === "host") continue;
      forward[k] = v;
    }
    const req = this.up().request(forward);
    req.on("error", () => stream.close(http2.constants.NGHTTP2_INTERNAL_ERROR));
    stream.pipe(req);
    let trailers: http2.OutgoingHttpHeaders = {};
    req.on("trailers", (t) => {
      trailers = { ...t };
    });
    req.on("response", (h) => {
      const out: http2.OutgoingHttpHeaders = { ...h };
      if (h["grpc-status"] !== undefined) {
        stream.respond(out, { endStream: true });
        return;
      }
      stream.respond(out, { waitForTrailers: true });
      stream.on("wantTrailers", () => stream.sendTrailers(trailers));
      req.pipe(stream);
    });
    stream.on("close", () => {
      if (!req.closed) req.close(http2.constants.NGHTTP2_CANCEL);
    });
  }

  /** Kill every connection and stop listening (a dead peer). */
  async stop(): Promise<void> {
    this.upstream?.destroy();
    this.upstream = undefined;
    const server = this.server;
    this.server = undefined;
    if (server === undefined) return;
    await new Promise<void>((ok) => {
      server.close(() => ok());
      // close() waits for sessions; a killed peer does not.
      for (const s of sessions.get(server) ?? []) s.destroy();
    });
  }
}

// Sessions per server, so stop() can destroy them as a crash would.
const sessions = new WeakMap<http2.Http2Server, Set<http2.ServerHttp2Session>>();
function trackSessions(server: http2.Http2Server): void {
  const set = new Set<http2.ServerHttp2Session>();
  sessions.set(server, set);
  server.on("session", (s) => {
    set.add(s);
    s.on("close", () => set.delete(s));
  });
}
