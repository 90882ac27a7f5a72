/**
 * One CLIENT span per call (all its attempts; each retry is an event on it),
 * a child of the caller's active context, named and attributed by the RPC
 * semantic conventions. Its context goes out as W3C `traceparent` on every
 * attempt, so the server's span joins the same trace, and its trace id is
 * what `CallInfo.traceId` and `AutoEcoOpsError.traceId` report.
 *
 * Without a registered tracer provider the API's tracer records nothing; the
 * SDK then makes a non-recording span with fresh ids itself (in the caller's
 * trace if there is one), so ids still exist and propagate at the cost of a
 * few random bytes.
 */
import { randomFillSync } from "node:crypto";
import {
  type Attributes,
  type Span,
  type Tracer,
  SpanKind,
  SpanStatusCode,
  TraceFlags,
  context,
  propagation,
  trace,
} from "@opentelemetry/api";

export const INSTRUMENTATION = "@autoecoops/sdk";

/** Tracing settings of a client. */
export interface TracingOptions {
  /** The tracer to use; default: the global provider's `@autoecoops/sdk` tracer. */
  tracer?: Tracer;
  /** False: no spans and no traceparent at all. */
  enabled?: boolean;
}

const pool = Buffer.alloc(4096);
let poolAt = pool.length;

function randomHex(bytes: number): string {
  if (poolAt + bytes > pool.length) {
    randomFillSync(pool);
    poolAt = 0;
  }
  const hex = pool.toString("hex", poolAt, poolAt + bytes);
  poolAt += bytes;
  // All zeros is the invalid id; 2^-64 at worst, but never send it.
  return /^0+$/.test(hex) ? randomHex(bytes) : hex;
}

/** Starts call spans on a tracer. */
export class CallTracer {
  private readonly tracer: Tracer;

  constructor(options: TracingOptions = {}) {
    this.tracer = options.tracer ?? trace.getTracer(INSTRUMENTATION);
  }

  /** The span of one call, a child of the active context. */
  start(name: string, attributes: Attributes): Span {
    const parent = context.active();
    const span = this.tracer.startSpan(name, { kind: SpanKind.CLIENT, attributes }, parent);
    if (span.isRecording()) return span;
    // No provider: the API handed back the parent's context (or an invalid one).
    const up = trace.getSpanContext(parent);
    const valid = up !== undefined && trace.isSpanContextValid(up);
    return trace.wrapSpanContext({
      traceId: valid ? up.traceId : randomHex(16),
      spanId: randomHex(8),
      traceFlags: valid ? up.traceFlags : TraceFlags.NONE,
      ...(valid && up.traceState !== undefined ? { traceState: up.traceState } : {}),
    });
  }
}

/** The propagation headers of `span`: `traceparent` (and whatever the global propagator adds). */
export function traceHeaders(span: Span): Record<string, string> {
  const carrier: Record<string, string> = {};
  propagation.inject(trace.setSpan(context.active(), span), carrier);
  if (carrier["traceparent"] === undefined) {
    const sc = span.spanContext();
    carrier["traceparent"] =
      `00-${sc.traceId}-${sc.spanId}-${(sc.traceFlags & 0xff).toString(16).padStart(2, "0")}`;
    const state = sc.traceState?.serialize();
    if (state) carrier["tracestate"] = state;
  }
  return carrier;
}

/** Record that attempt `attempt` failed and a retry follows after `delayMs`. */
export function retried(span: Span, attempt: number, code: string, delayMs: number): void {
  if (span.isRecording())
    span.addEvent("retry", {
      "rpc.attempt": attempt,
      "rpc.grpc.status_code": code,
      "retry.delay_ms": delayMs,
    });
}

/** End the span with the call's final status code (0 is OK). */
export function finish(span: Span, code: number, message = ""): void {
  if (span.isRecording()) {
    span.setAttribute("rpc.grpc.status_code", code);
    if (code !== 0) span.setStatus({ code: SpanStatusCode.ERROR, message });
  }
  span.end();
}
