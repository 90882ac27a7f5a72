/**
 * The pure parts, without a network: backoff bounds, the retry decision,
 * the retry budget, routes, error mapping and the token cache.
 */
import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { Code, ConnectError } from "@connectrpc/connect";
import {
  Attempts,
  AutoEcoOps,
  AutoEcoOpsError,
  Cancelled,
  DeadlineExceeded,
  InvalidArgument,
  NotFound,
  RetryBudget,
  RetryPolicy,
  Routes,
  TokenSource,
  Unavailable,
  Unknown,
  errorFor,
  services,
  staticToken,
  toAutoEcoOpsError,
} from "../src/index.js";
import { isLoopback } from "../src/routes.js";

describe("RetryPolicy", () => {
  test("full jitter inside an exponentially growing, capped bound", () => {
    const p = new RetryPolicy({ initialDelayMs: 100, multiplier: 2, maxDelayMs: 1000 });
    assert.deepEqual([1, 2, 3, 4, 5, 6].map((n) => p.bound(n)), [100, 200, 400, 800, 1000, 1000]);
    assert.equal(p.backoff(3, 0), 0);
    assert.equal(p.backoff(3, 0.5), 200);
    assert.ok(p.backoff(3, 0.999999) < 400);
  });

  test("rejects nonsense and is immutable", () => {
    assert.throws(() => new RetryPolicy({ initialDelayMs: 0 }), RangeError);
    assert.throws(() => new RetryPolicy({ maxAttempts: 0 }), RangeError);
    assert.throws(() => new RetryPolicy({ multiplier: 0.5 }), RangeError);
    assert.throws(() => new RetryPolicy({ initialDelayMs: 10, maxDelayMs: 5 }), RangeError);
    const p = new RetryPolicy();
    const q = p.with({ maxAttempts: 2 });
    assert.equal(p.maxAttempts, 5);
    assert.equal(q.maxAttempts, 2);
    assert.ok(Object.isFrozen(p));
  });

  test("retryable codes: UNAVAILABLE always, RESOURCE_EXHAUSTED/ABORTED only with RetryInfo", () => {
    const p = new RetryPolicy();
    assert.ok(p.retryable(errorFor(Code.Unavailable, "x")));
    assert.ok(!p.retryable(errorFor(Code.ResourceExhausted, "x")));
    assert.ok(p.retryable(errorFor(Code.ResourceExhausted, "x", { retryDelayMs: 10 })));
    assert.ok(!p.retryable(errorFor(Code.InvalidArgument, "x")));
    assert.ok(!p.retryable(errorFor(Code.Internal, "x")));
  });
});

describe("Attempts", () => {
  const clock = (t: { now: number }) => ({ now: () => t.now, random: () => 0.5 });

  test("a non-idempotent method is never retried", () => {
    const a = new Attempts(new RetryPolicy(), false, undefined, undefined, clock({ now: 0 }));
    a.start();
    const err = errorFor(Code.Unavailable, "down");
    assert.equal(a.failed(err), undefined);
    assert.match(err.message, /not idempotent/);
  });

  test("one deadline: each attempt gets what is left; no wait past it", () => {
    const t = { now: 0 };
    const a = new Attempts(new RetryPolicy({ initialDelayMs: 400, maxDelayMs: 400 }), true, 500, undefined, clock(t));
    assert.equal(a.start(), 500);
    t.now = 100;
    assert.equal(a.failed(errorFor(Code.Unavailable, "x")), 200);
    t.now = 300;
    assert.equal(a.start(), 200);
    t.now = 350;
    const err = errorFor(Code.Unavailable, "x");
    assert.equal(a.failed(err), undefined, "350 + 200 passes 500");
    assert.match(err.message, /would pass the deadline/);
  });

  test("RetryInfo's delay wins over the backoff", () => {
    const a = new Attempts(new RetryPolicy(), true, undefined, undefined, clock({ now: 0 }));
    a.start();
    assert.equal(a.failed(errorFor(Code.Unavailable, "x", { retryDelayMs: 1234 })), 1234);
  });

  test("the retry budget drains on failures and refills on successes", () => {
    const bucket = new RetryBudget({ maxTokens: 4, tokenRatio: 0.5 }).bucket();
    assert.ok(bucket.allowsRetry());
    bucket.failed();
    assert.ok(bucket.allowsRetry());
    bucket.failed();
    assert.ok(!bucket.allowsRetry(), "half or less left");
    bucket.succeeded();
    assert.equal(bucket.tokens, 2.5);
    assert.ok(bucket.allowsRetry());
  });
});

describe("errors", () => {
  test("one class per code under one base", () => {
    const cases: [Code, new (...a: never[]) => AutoEcoOpsError][] = [
      [Code.Unavailable, Unavailable],
      [Code.NotFound, NotFound],
      [Code.InvalidArgument, InvalidArgument],
      [Code.DeadlineExceeded, DeadlineExceeded],
      [Code.Canceled, Cancelled],
    ];
    for (const [code, cls] of cases) {
      const err = toAutoEcoOpsError(new ConnectError("m", code), { traceId: "a".repeat(32) });
      assert.ok(err instanceof cls && err instanceof AutoEcoOpsError && err instanceof Error);
      assert.equal(err.code, code);
      assert.equal(err.rawMessage, "m");
      assert.equal(err.traceId, "a".repeat(32));
      assert.equal(err.name, cls.name);
    }
    assert.ok(toAutoEcoOpsError(new TypeError("boom")) instanceof Unknown);
  });
});

describe("routes", () => {
  test("options, then AUTOECOOPS_<SERVICE>_ADDR, then host and the port table", () => {
    const env = { AUTOECOOPS_MEMORY_HUB_ADDR: "mem:1", AUTOECOOPS_EVENT_BUS_PORT: "9003" };
    const r = new Routes({ env, addresses: { "autoecoops.auth.v1.AuthService": "a:1", "policy-audit": "p:4" } });
    assert.equal(r.address("autoecoops.auth.v1.AuthService"), "a:1");
    assert.equal(r.address("autoecoops.audit.v1.AuditService"), "p:4");
    assert.equal(r.address("autoecoops.policy.v1.PolicyService"), "p:4");
    assert.equal(r.address("autoecoops.memory.v1.MemoryService"), "mem:1");
    assert.equal(r.address("autoecoops.events.v1.EventBusService"), "127.0.0.1:9003");
    assert.equal(r.address("autoecoops.machineops.v1.MachineOpsService"), "127.0.0.1:5003");
    const one = new Routes({ env: {}, resolver: ({ meshService }) => `ingress:443#${meshService}` });
    assert.equal(one.address("autoecoops.infra.v1.InfraService"), "ingress:443#infra-manager");
  });

  test("loopback detection", () => {
    assert.ok(isLoopback("127.0.0.1:4001"));
    assert.ok(isLoopback("localhost:1"));
    assert.ok(isLoopback("[::1]:4001"));
    assert.ok(!isLoopback("mesh.example.com:443"));
    assert.ok(!isLoopback("10.0.0.1:4001"));
  });
});

describe("TokenSource", () => {
  test("single flight, refresh before expiry, never in the first half of life", async () => {
    let now = 1_000_000;
    let issued = 0;
    const source = new TokenSource(
      { kind: "client_credentials", clientId: "c", clientSecret: "s" },
      {
        issueToken: async () => {
          issued += 1;
          await new Promise((r) => setTimeout(r, 10));
          return {
            accessToken: `t${issued}`,
            expireTime: { seconds: BigInt((now + 600_000) / 1000), nanos: 0 },
          } as never;
        },
        exchangeToken: async () => {
          throw new Error("unused");
        },
      },
      () => now,
    );
    const tokens = await Promise.all(Array.from({ length: 50 }, () => source.get()));
    assert.deepEqual(new Set(tokens), new Set(["t1"]));
    assert.equal(issued, 1);
    now += 500_000; // 100 s before expiry, margin 60 s: kept
    assert.equal(await source.get(), "t1");
    now += 50_000; // 50 s before expiry: replaced, once
    const again = await Promise.all(Array.from({ length: 50 }, () => source.get()));
    assert.deepEqual(new Set(again), new Set(["t2"]));
    assert.equal(issued, 2);
  });

  test("a static token is sent as is and never replaced", () => {
    const source = new TokenSource(staticToken("abc"), {} as never);
    assert.equal(source.get(), "abc");
    assert.equal(source.invalidate("abc"), false);
    assert.throws(() => staticToken(" "), TypeError);
  });
});

describe("sub-clients", () => {
  test("every RPC of every generated service is a method, with its contract, without a network", () => {
    const client = new AutoEcoOps({ addresses: {} });
    try {
      let count = 0;
      for (const [name, service] of Object.entries(services)) {
        const sub = (client as unknown as Record<string, Record<string, unknown>>)[name];
        assert.ok(sub, `client.${name}`);
        for (const m of service.methods) {
          const fn = sub[m.localName] as { descriptor: unknown; contract: { permission: string; public: boolean } };
          assert.equal(typeof fn, "function", `${name}.${m.localName}`);
          assert.equal(fn.descriptor, m);
          assert.ok(fn.contract.permission || fn.contract.public, `${m.name} declares its permission`);
          count += 1;
        }
      }
      assert.ok(count > 50, `${count} RPCs`);
      // Any descriptor, also one the index does not list, gets a typed sub-client.
      const auth = client.subClient(services.auth);
      assert.equal(typeof auth.listRoles.withCall, "function");
    } finally {
      client.close();
    }
  });
});

describe("replica addresses", () => {
  test("a list or a dns: name is a replica set; a list is checked", async () => {
    const { isReplicaSet, replicaList } = await import("../src/index.js");
    assert.ok(isReplicaSet("127.0.0.1:1,127.0.0.1:2"));
    assert.ok(isReplicaSet("dns:///auth.autoecops-core:4001"));
    assert.ok(!isReplicaSet("127.0.0.1:4001"));
    assert.deepEqual(replicaList("ipv4:10.0.0.1:1, 10.0.0.2:1"), ["10.0.0.1:1", "10.0.0.2:1"]);
    assert.deepEqual(replicaList("[::1]:1,[::1]:2"), ["[::1]:1", "[::1]:2"]);
    assert.throws(() => replicaList("127.0.0.1:1,nohostport"), /not host:port/);
  });

  test("routes join a list; loopback means every replica is local", () => {
    const r = new Routes({ addresses: { "auth-service": ["127.0.0.1:1", "127.0.0.2:2"] }, env: {} });
    assert.equal(r.address(services.auth), "127.0.0.1:1,127.0.0.2:2");
    assert.ok(isLoopback("127.0.0.1:1,127.0.0.2:2"));
    assert.ok(!isLoopback("127.0.0.1:1,10.0.0.2:2"));
    assert.ok(isLoopback("dns:///localhost:4001"));
    assert.ok(!isLoopback("dns:///auth.example:4001"));
  });
});
