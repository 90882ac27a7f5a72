/**
 * The client against the real mesh: every service reachable through its
 * generated sub-client, errors with their details decoded, the client's
 * trace id arriving at the server (in its audit entry), credentials, and the
 * streaming shapes.
 */
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { SpanKind, trace } from "@opentelemetry/api";
import {
  AutoEcoOps,
  AutoEcoOpsError,
  InvalidArgument,
  NotFound,
  OutOfRange,
  PermissionDenied,
  Unauthenticated,
  Unimplemented,
  clientCredentials,
  contractOf,
  jwtExpiry,
  services,
  staticToken,
  tokenExchange,
} from "../src/index.js";
import { Outcome } from "../src/gen/autoecoops/audit/v1/audit_pb.js";
import { type Mesh, startMesh } from "./mesh.js";
import { exporter, installTracing } from "./tracing.js";

installTracing();
let mesh: Mesh;
let admin: AutoEcoOps;

before(async () => {
  mesh = await startMesh();
  admin = new AutoEcoOps({ addresses: mesh.addrs, credentials: staticToken(await mesh.token("root")) });
});
after(async () => {
  admin?.close();
  await mesh?.stop();
});

/** The audit entries of one trace (written synchronously by audited RPCs). */
async function entriesOf(traceId: string) {
  return (await admin.audit.listEntries({ traceId, pageSize: 100 })).entries;
}

describe("every service", () => {
  test("is reachable through its generated sub-client", async () => {
    const names = Object.keys(services);
    assert.deepEqual(names.sort(), [
      "audit", "auth", "autoops", "events", "iaops", "infra", "machineops", "memory", "policy",
    ]);
    for (const name of names) {
      const service = services[name as keyof typeof services];
      // The first read (Get/List, unary, idempotent) of each service, with an empty request.
      const read = service.methods.find(
        (m) => m.methodKind === "unary" && contractOf(m).idempotent && /^(List|Get)/.test(m.name),
      );
      assert.ok(read, `${service.typeName} has a unary read`);
      const method = (admin as unknown as Record<string, Record<string, (r: object) => Promise<unknown>>>)[name]![read.localName]!;
      try {
        await method({});
      } catch (err) {
        // An answer from the server itself (its validation, an empty log's
        // OUT_OF_RANGE, or a method not built yet), never the transport's.
        assert.ok(err instanceof AutoEcoOpsError, `${read.name}: ${err}`);
        assert.ok(
          err instanceof InvalidArgument ||
            err instanceof NotFound ||
            err instanceof OutOfRange ||
            err instanceof Unimplemented,
          `${service.typeName}/${read.name}: ${err.message}`,
        );
        assert.equal(err.domain, "autoecoops.io", `${read.name} answered with ErrorInfo`);
      }
    }
  });

  test("kernel reads return real data", async () => {
    const roles = await admin.auth.listRoles({});
    assert.ok(roles.roles.some((r) => r.name === "admin"));
    const ns = await admin.memory.listNamespaces({});
    assert.ok(Array.isArray(ns.namespaces));
    const topics = await admin.events.listTopics({});
    assert.ok(Array.isArray(topics.topics));
    const checkpoint = await admin.audit.getCheckpoint({});
    assert.ok(checkpoint.checkpoint !== undefined);
  });
});

describe("errors", () => {
  test("no token: Unauthenticated with its ErrorInfo reason", async () => {
    const anonymous = new AutoEcoOps({ addresses: mesh.addrs });
    try {
      await assert.rejects(anonymous.auth.listRoles({}), (err: unknown) => {
        assert.ok(err instanceof Unauthenticated && err instanceof AutoEcoOpsError);
        assert.equal(err.codeName, "UNAUTHENTICATED");
        assert.equal(err.reason, "CREDENTIALS_MISSING");
        assert.equal(err.domain, "autoecoops.io");
        assert.equal(err.method, "/autoecoops.auth.v1.AuthService/ListRoles");
        return true;
      });
    } finally {
      anonymous.close();
    }
  });

  test("bad input: InvalidArgument with BadRequest field violations", async () => {
    await assert.rejects(admin.auth.createServiceAccount({ serviceAccount: {} }), (err: unknown) => {
      assert.ok(err instanceof InvalidArgument, String(err));
      assert.ok(err.fieldViolations.length > 0, "field violations decoded");
      assert.ok(
        err.fieldViolations.some((v) => v.field.includes("name")),
        JSON.stringify(err.fieldViolations),
      );
      assert.equal(err.attempts, 1, "a bad request is never retried");
      return true;
    });
  });

  test("missing resource: NotFound with ResourceInfo", async () => {
    await assert.rejects(admin.auth.getRole({ name: "no-such-role" }), (err: unknown) => {
      assert.ok(err instanceof NotFound, String(err));
      assert.equal(err.resourceName, "no-such-role");
      assert.ok(err.resourceType.length > 0);
      return true;
    });
  });

  test("no permission: PermissionDenied naming the permission, in the client's trace", async () => {
    const viewer = new AutoEcoOps({
      addresses: mesh.addrs,
      credentials: staticToken(await mesh.token("vera", ["viewer"])),
    });
    try {
      await assert.rejects(
        viewer.auth.createRole({ role: { name: "sneaky", permissions: ["*"] } }),
        (err: unknown) => {
          assert.ok(err instanceof PermissionDenied, String(err));
          assert.equal(err.reason, "PERMISSION_MISSING");
          assert.equal(err.metadata["permission"], "auth.roles.create");
          // The server wrote its trace id into the details: the client's.
          assert.match(err.traceId, /^[0-9a-f]{32}$/);
          const span = exporter.getFinishedSpans().find((s) => s.spanContext().traceId === err.traceId);
          assert.ok(span, "the client's span has the server's trace id");
          assert.equal(span.kind, SpanKind.CLIENT);
          assert.equal(span.attributes["rpc.grpc.status_code"], 7);
          return true;
        },
      );
    } finally {
      viewer.close();
    }
  });
});

describe("tracing", () => {
  test("traceparent reaches the server: its audit entry has the caller's trace id", async () => {
    const tracer = trace.getTracer("test");
    const name = `traced-${process.pid}`;
    const traceId = await tracer.startActiveSpan("user operation", async (span) => {
      try {
        const { info } = await admin.auth.createRole.withCall({
          role: { name, permissions: ["memory.documents.get"] },
        });
        assert.equal(info.traceId, span.spanContext().traceId, "the call joined the active trace");
        return info.traceId;
      } finally {
        span.end();
      }
    });
    const entries = await entriesOf(traceId);
    assert.ok(
      entries.some((e) => e.resource.includes(name) && e.traceId === traceId),
      JSON.stringify(entries.map((e) => [e.action, e.resource, e.traceId])),
    );
    const client = exporter.getFinishedSpans().find(
      (s) => s.spanContext().traceId === traceId && s.kind === SpanKind.CLIENT,
    );
    assert.ok(client);
    assert.equal(client.name, "autoecoops.auth.v1.AuthService/CreateRole");
    assert.equal(client.attributes["rpc.system"], "grpc");
  });

  test("each call outside a span is its own trace, still propagated", async () => {
    const a = await admin.auth.getJwks.withCall({});
    const b = await admin.auth.getJwks.withCall({});
    assert.match(a.info.traceId, /^[0-9a-f]{32}$/);
    assert.notEqual(a.info.traceId, b.info.traceId);
  });
});

describe("credentials", () => {
  async function serviceAccount(name: string) {
    const created = await admin.auth.createServiceAccount({
      serviceAccount: { name, roles: ["viewer"] },
    });
    return clientCredentials(name, created.clientSecret);
  }

  /** IssueToken calls auth-service answered (from its audit entries; the tests run one at a time). */
  async function issued(): Promise<number> {
    let count = 0;
    let pageToken = "";
    do {
      const page = await admin.audit.listEntries({ pageSize: 500, pageToken });
      count += page.entries.filter((e) => e.action.endsWith("IssueToken") && e.outcome === Outcome.SUCCESS).length;
      pageToken = page.nextPageToken;
    } while (pageToken);
    return count;
  }

  test("client credentials: one IssueToken for 50 concurrent calls, refreshed once before expiry", async () => {
    const creds = await serviceAccount(`sdk-ts-${process.pid}`);
    const before = await issued();
    let now = Date.now();
    const client = new AutoEcoOps({ addresses: mesh.addrs, credentials: creds, wallClock: () => now });
    try {
      const replies = await Promise.all(Array.from({ length: 50 }, () => client.auth.listRoles({})));
      assert.ok(replies.every((r) => r.roles.length > 0));
      assert.equal(client.tokens!.fetches, 1);
      assert.equal((await issued()) - before, 1, "auth-service issued one token");
      const first = await client.tokens!.get();
      const expires = jwtExpiry(first)!;
      // 2 minutes before expiry (the margin is 1): kept.
      now = expires - 120_000;
      await Promise.all(Array.from({ length: 50 }, () => client.auth.listRoles({})));
      assert.equal(client.tokens!.fetches, 1);
      // 30 s before expiry: replaced before it lapses, by one request for all 50 calls.
      now = expires - 30_000;
      await Promise.all(Array.from({ length: 50 }, () => client.auth.listRoles({})));
      assert.equal(client.tokens!.fetches, 2);
      assert.equal((await issued()) - before, 2, "auth-service issued exactly one more");
      assert.notEqual(await client.tokens!.get(), first);
    } finally {
      client.close();
    }
  });

  test("a wrong secret is Unauthenticated, reported as the call's error", async () => {
    const client = new AutoEcoOps({
      addresses: mesh.addrs,
      credentials: clientCredentials("nobody", "wrong"),
    });
    try {
      await assert.rejects(client.auth.listRoles({}), Unauthenticated);
    } finally {
      client.close();
    }
  });

  test("token exchange on behalf of a user, with the service as actor", async () => {
    const actor = await serviceAccount(`sdk-ts-actor-${process.pid}`);
    const user = await mesh.token("alice", ["admin"]);
    const client = new AutoEcoOps({
      addresses: mesh.addrs,
      credentials: tokenExchange(user, { actor }),
    });
    try {
      const roles = await client.auth.listRoles({});
      assert.ok(roles.roles.length > 0);
      const token = await client.tokens!.get();
      const claims = JSON.parse(Buffer.from(token.split(".")[1]!, "base64url").toString());
      assert.equal(claims.sub, "alice");
      assert.equal(claims.act?.sub, actor.clientId);
    } finally {
      client.close();
    }
  });
});

describe("streaming", () => {
  test("client streaming: documents streamed into memory-hub", async () => {
    const ns = `ts-${process.pid}`;
    await admin.memory.createNamespace({ namespace: { name: ns } });
    const reply = await admin.memory.streamIngestDocuments([
      { namespace: ns, documents: [{ id: "a", body: { case: "text", value: "alpha beta" } }] },
      { namespace: ns, documents: [{ id: "b", body: { case: "text", value: "gamma delta" } }] },
    ]);
    assert.ok(reply !== undefined);
    const docs = await admin.memory.listDocuments({ namespace: ns });
    assert.deepEqual(docs.documents.map((d) => d.id).sort(), ["a", "b"]);
  });

  test("bidirectional: the stream reaches the platform and its answer is typed", async () => {
    const requests = (async function* () {
      yield {};
    })();
    const stream = admin.machineops.agentSession(requests);
    assert.match(stream.traceId, /^[0-9a-f]{32}$/);
    await assert.rejects(async () => {
      for await (const _ of stream) {
        /* drain */
      }
    }, AutoEcoOpsError);
  });
});
