/**
 * One exception tree: `AutoEcoOpsError` at the root and one subclass per gRPC
 * status code, each carrying the `google.rpc.Status` details the server sent
 * in `grpc-status-details-bin` (ErrorInfo, BadRequest, RetryInfo,
 * ResourceInfo), decoded with the generated google.rpc messages.
 *
 * `toAutoEcoOpsError` is the one place a lower-layer error (a ConnectError
 * from the transport, an abort, anything thrown) becomes one of these.
 */
import { Code, ConnectError } from "@connectrpc/connect";
import {
  BadRequestSchema,
  ErrorInfoSchema,
  ResourceInfoSchema,
  RetryInfoSchema,
} from "./gen/google/rpc/error_details_pb.js";

/** A violated field of a bad request (google.rpc.BadRequest.FieldViolation). */
export interface FieldViolation {
  /** The field's path, e.g. `service_account.name`. */
  readonly field: string;
  /** Why the value is wrong. */
  readonly description: string;
  /** A machine-readable reason, when the server gives one. */
  readonly reason: string;
}

/** The gRPC status codes by name, as the servers and grpcurl print them. */
export const CODE_NAMES: Readonly<Record<number, string>> = {
  0: "OK",
  1: "CANCELLED",
  2: "UNKNOWN",
  3: "INVALID_ARGUMENT",
  4: "DEADLINE_EXCEEDED",
  5: "NOT_FOUND",
  6: "ALREADY_EXISTS",
  7: "PERMISSION_DENIED",
  8: "RESOURCE_EXHAUSTED",
  9: "FAILED_PRECONDITION",
  10: "ABORTED",
  11: "OUT_OF_RANGE",
  12: "UNIMPLEMENTED",
  13: "INTERNAL",
  14: "UNAVAILABLE",
  15: "DATA_LOSS",
  16: "UNAUTHENTICATED",
};

/** What an error is built from; every field but the message is optional. */
export interface ErrorFields {
  /** ErrorInfo.reason, e.g. `TOKEN_EXPIRED`. */
  reason?: string;
  /** ErrorInfo.domain, e.g. `autoecoops.io`. */
  domain?: string;
  /** ErrorInfo.metadata. */
  metadata?: Readonly<Record<string, string>>;
  /** BadRequest.field_violations. */
  fieldViolations?: readonly FieldViolation[];
  /** RetryInfo.retry_delay in milliseconds; undefined when the server sent none. */
  retryDelayMs?: number;
  /** ResourceInfo. */
  resourceType?: string;
  resourceName?: string;
  resourceOwner?: string;
  /** The call's trace id (32 hex digits), as the servers' spans and logs show it. */
  traceId?: string;
  /** The gRPC path of the call, `/package.Service/Method`. */
  method?: string;
  /** Attempts made before the call gave up. */
  attempts?: number;
  /** The lower-layer error. */
  cause?: unknown;
}

/** The root of every error the SDK throws for a call: a non-OK gRPC status. */
export class AutoEcoOpsError extends Error {
  /** The gRPC status code (numeric, as on the wire). */
  readonly code: Code;
  /** The status message the server sent, without decoration. */
  readonly rawMessage: string;
  readonly reason: string;
  readonly domain: string;
  readonly metadata: Readonly<Record<string, string>>;
  readonly fieldViolations: readonly FieldViolation[];
  readonly retryDelayMs: number | undefined;
  readonly resourceType: string;
  readonly resourceName: string;
  readonly resourceOwner: string;
  /** The trace id of the call (32 hex digits), or "" when it has none. */
  readonly traceId: string;
  /** The gRPC path of the call, or "". */
  method: string;
  /** Attempts made, the last one included (1 when never retried). */
  attempts: number;
  /** Why the call ended where it did, when retrying was considered. */
  readonly notes: string[] = [];

  constructor(code: Code, message: string, fields: ErrorFields = {}) {
    super(
      `${CODE_NAMES[code] ?? code}: ${message}`,
      fields.cause === undefined ? undefined : { cause: fields.cause },
    );
    this.code = code;
    this.rawMessage = message;
    this.reason = fields.reason ?? "";
    this.domain = fields.domain ?? "";
    this.metadata = fields.metadata ?? {};
    this.fieldViolations = fields.fieldViolations ?? [];
    this.retryDelayMs = fields.retryDelayMs;
    this.resourceType = fields.resourceType ?? "";
    this.resourceName = fields.resourceName ?? "";
    this.resourceOwner = fields.resourceOwner ?? "";
    this.traceId = fields.traceId ?? this.metadata["trace_id"] ?? "";
    this.method = fields.method ?? "";
    this.attempts = fields.attempts ?? 1;
    this.name = new.target.name;
  }

  /** The code's name, e.g. `NOT_FOUND`. */
  get codeName(): string {
    return CODE_NAMES[this.code] ?? String(this.code);
  }

  /** Record why the call ended here (shown with the message). */
  addNote(note: string): void {
    this.notes.push(note);
    this.message = `${this.message} (${note})`;
  }
}

/** CANCELLED: the call was cancelled, usually by the caller. */
export class Cancelled extends AutoEcoOpsError {}
/** UNKNOWN: an error the server or transport could not classify. */
export class Unknown extends AutoEcoOpsError {}
/** INVALID_ARGUMENT: the request is wrong; see `fieldViolations`. */
export class InvalidArgument extends AutoEcoOpsError {}
/** DEADLINE_EXCEEDED: the call's deadline passed. */
export class DeadlineExceeded extends AutoEcoOpsError {}
/** NOT_FOUND: the resource does not exist; see `resourceType`/`resourceName`. */
export class NotFound extends AutoEcoOpsError {}
/** ALREADY_EXISTS: a create met an existing resource. */
export class AlreadyExists extends AutoEcoOpsError {}
/** PERMISSION_DENIED: the caller lacks the permission (in `metadata`). */
export class PermissionDenied extends AutoEcoOpsError {}
/** RESOURCE_EXHAUSTED: a quota or size limit was hit. */
export class ResourceExhausted extends AutoEcoOpsError {}
/** FAILED_PRECONDITION: the system is not in a state for this call. */
export class FailedPrecondition extends AutoEcoOpsError {}
/** ABORTED: a conflict, e.g. a stale etag; retry the read-modify-write. */
export class Aborted extends AutoEcoOpsError {}
/** OUT_OF_RANGE: a value past the valid range. */
export class OutOfRange extends AutoEcoOpsError {}
/** UNIMPLEMENTED: the server does not implement the method. */
export class Unimplemented extends AutoEcoOpsError {}
/** INTERNAL: a server bug; `metadata.error_id` finds it in the server's log. */
export class Internal extends AutoEcoOpsError {}
/** UNAVAILABLE: the server is unreachable or overloaded; idempotent calls are retried. */
export class Unavailable extends AutoEcoOpsError {}
/** DATA_LOSS: unrecoverable data loss. */
export class DataLoss extends AutoEcoOpsError {}
/** UNAUTHENTICATED: no valid token; `reason` says why (e.g. `TOKEN_EXPIRED`). */
export class Unauthenticated extends AutoEcoOpsError {}

type ErrorClass = new (code: Code, message: string, fields?: ErrorFields) => AutoEcoOpsError;

/** The class of each status code. */
export const ERROR_CLASSES: Readonly<Record<number, ErrorClass>> = {
  [Code.Canceled]: Cancelled,
  [Code.Unknown]: Unknown,
  [Code.InvalidArgument]: InvalidArgument,
  [Code.DeadlineExceeded]: DeadlineExceeded,
  [Code.NotFound]: NotFound,
  [Code.AlreadyExists]: AlreadyExists,
  [Code.PermissionDenied]: PermissionDenied,
  [Code.ResourceExhausted]: ResourceExhausted,
  [Code.FailedPrecondition]: FailedPrecondition,
  [Code.Aborted]: Aborted,
  [Code.OutOfRange]: OutOfRange,
  [Code.Unimplemented]: Unimplemented,
  [Code.Internal]: Internal,
  [Code.Unavailable]: Unavailable,
  [Code.DataLoss]: DataLoss,
  [Code.Unauthenticated]: Unauthenticated,
};

/** A new error of the class of `code`. */
export function errorFor(code: Code, message: string, fields: ErrorFields = {}): AutoEcoOpsError {
  const cls = ERROR_CLASSES[code] ?? Unknown;
  return new cls(code, message, fields);
}

/** The details of a ConnectError (decoded from `grpc-status-details-bin`). */
export function detailsOf(err: ConnectError): ErrorFields {
  const fields: ErrorFields = {};
  const info = err.findDetails(ErrorInfoSchema)[0];
  if (info !== undefined) {
    fields.reason = info.reason;
    fields.domain = info.domain;
    fields.metadata = { ...info.metadata };
  }
  const violations = err.findDetails(BadRequestSchema).flatMap((b) => b.fieldViolations);
  if (violations.length > 0) {
    fields.fieldViolations = violations.map((v) => ({
      field: v.field,
      description: v.description,
      reason: v.reason,
    }));
  }
  const retry = err.findDetails(RetryInfoSchema)[0];
  if (retry?.retryDelay !== undefined) {
    const d = retry.retryDelay;
    fields.retryDelayMs = Number(d.seconds) * 1000 + d.nanos / 1e6;
  }
  const resource = err.findDetails(ResourceInfoSchema)[0];
  if (resource !== undefined) {
    fields.resourceType = resource.resourceType;
    fields.resourceName = resource.resourceName;
    fields.resourceOwner = resource.owner;
  }
  return fields;
}

/**
 * Any error of a call as an AutoEcoOpsError: a ConnectError keeps its code and
 * details; an abort is CANCELLED; anything else is UNKNOWN with it as cause.
 */
export function toAutoEcoOpsError(
  err: unknown,
  context: { traceId?: string; method?: string } = {},
): AutoEcoOpsError {
  if (err instanceof AutoEcoOpsError) return err;
  if (err instanceof ConnectError) {
    const fields = detailsOf(err);
    return errorFor(err.code, err.rawMessage, {
      ...fields,
      cause: err,
      ...(fields.metadata?.["trace_id"] ? {} : { traceId: context.traceId ?? "" }),
      method: context.method ?? "",
    });
  }
  if (err instanceof Error && err.name === "AbortError") {
    return new Cancelled(Code.Canceled, err.message || "the call was aborted", {
      cause: err,
      traceId: context.traceId ?? "",
      method: context.method ?? "",
    });
  }
  const message = err instanceof Error ? err.message : String(err);
  return new Unknown(Code.Unknown, message, {
    cause: err,
    traceId: context.traceId ?? "",
    method: context.method ?? "",
  });
}
