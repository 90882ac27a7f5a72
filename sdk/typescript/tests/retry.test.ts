/**
 * Retries against the real auth-service behind a fault-injecting HTTP/2 hop:
 * only idempotent RPCs (their proto option) are retried, with full-jitter
 * backoff inside one overall deadline, RetryInfo honoured, and a retry
 * budget that stops a storm.
 */
import assert from "node:assert/strict";
import { after, before, beforeEach, describe, test } from "node:test";
import { Code } from "@connectrpc/connect";
import {
  AutoEcoOps,
  type AutoEcoOpsOptions,
  NotFound,
  ResourceExhausted,
  RetryBudget,
  RetryPolicy,
  Unavailable,
  contractOf,
  services,
  staticToken,
} from "../src/index.js";
import { FaultProxy } from "./faults.js";
import { type Mesh, startMesh } from "./mesh.js";

let mesh: Mesh;
let proxy: FaultProxy;
let token: string;
const UNAVAILABLE = { code: Code.Unavailable, message: "injected: server restarting" };

before(async () => {
  mesh = await startMesh();
  token = await mesh.token("root");
  proxy = await new FaultProxy(mesh.addrs["auth-service"]!).start();
});
after(async () => {
  await proxy?.stop();
  await mesh?.stop();
});
beforeEach(() => {
  proxy.faults = [];
  proxy.always = undefined;
  proxy.seen.length = 0;
});

function client(options: AutoEcoOpsOptions = {}): AutoEcoOps {
  return new AutoEcoOps({
    addresses: { ...mesh.addrs, "auth-service": proxy.address },
    credentials: staticToken(token),
    ...options,
  });
}

test("the contract comes from the generated descriptors' method option", () => {
  const m = services.auth.method;
  assert.equal(contractOf(m.listRoles).idempotent, true);
  assert.equal(contractOf(m.createRole).idempotent, false);
  assert.equal(contractOf(m.issueToken).public, true);
  assert.equal(contractOf(m.createRole).permission, "auth.roles.create");
});

describe("a method that is not idempotent", () => {
  test("is never retried, whatever the policy", async () => {
    proxy.faults = [UNAVAILABLE, UNAVAILABLE, UNAVAILABLE];
    const c = client({ retry: new RetryPolicy({ maxAttempts: 10, initialDelayMs: 10 }) });
    try {
      const name = `never-retried-${process.pid}`;
      await assert.rejects(
        c.auth.createRole({ role: { name, permissions: ["memory.documents.get"] } }),
        (err: unknown) => {
          assert.ok(err instanceof Unavailable, String(err));
          assert.equal(err.attempts, 1);
          assert.match(err.message, /not idempotent/);
          return true;
        },
      );
      assert.equal(proxy.calls("/CreateRole").length, 1, "one attempt reached the server side");
      // Nothing was created behind the failure.
      proxy.faults = [];
      await assert.rejects(c.auth.getRole({ name }), NotFound);
    } finally {
      c.close();
    }
  });
});

describe("an idempotent method", () => {
  test("is retried on UNAVAILABLE with full-jitter waits and succeeds", async () => {
    proxy.faults = [UNAVAILABLE, UNAVAILABLE, UNAVAILABLE];
    // Fixed draws, so the waits are known: random * min(max, 100 * 2^(n-1)).
    const draws = [0.9, 0.1, 0.5];
    const c = client({
      retry: new RetryPolicy({ initialDelayMs: 100, maxDelayMs: 1000, maxAttempts: 5 }),
      clock: { now: () => performance.now(), random: () => draws.shift() ?? 0 },
    });
    try {
      const { response, info } = await c.auth.listRoles.withCall({}, { timeoutMs: 5000 });
      assert.ok(response.roles.length > 0, "the last attempt reached the real auth-service");
      assert.equal(info.attempts, 4);
      const at = proxy.calls("/ListRoles").map((s) => s.at);
      assert.equal(at.length, 4);
      const expected = [90, 20, 200];
      for (let i = 0; i < 3; i++) {
        const gap = at[i + 1]! - at[i]!;
        assert.ok(gap >= expected[i]! - 2, `wait ${i + 1}: ${gap}ms >= ${expected[i]}ms`);
        // Generous: a loaded machine delays timers, it never fires them early.
        assert.ok(gap < expected[i]! + 750, `wait ${i + 1}: ${gap}ms is about ${expected[i]}ms`);
      }
    } finally {
      c.close();
    }
  });

  test("waits are random (full jitter) with the default randomness", async () => {
    const gaps: number[] = [];
    for (let round = 0; round < 4; round++) {
      proxy.seen.length = 0;
      proxy.faults = [UNAVAILABLE];
      const c = client({ retry: new RetryPolicy({ initialDelayMs: 200, maxDelayMs: 200 }) });
      try {
        await c.auth.listRoles({});
      } finally {
        c.close();
      }
      const [a, b] = proxy.calls("/ListRoles").map((s) => s.at);
      gaps.push(b! - a!);
    }
    assert.ok(gaps.every((g) => g < 200 + 750), `within the bound: ${gaps}`);
    assert.ok(Math.max(...gaps) - Math.min(...gaps) > 5, `not a fixed wait: ${gaps}`);
  });

  test("gives up inside one overall deadline across attempts", async () => {
    proxy.always = UNAVAILABLE;
    const c = client({
      retry: new RetryPolicy({ initialDelayMs: 100, maxDelayMs: 400, maxAttempts: 100 }),
      retryBudget: false,
    });
    try {
      const start = performance.now();
      await assert.rejects(c.auth.listRoles({}, { timeoutMs: 800 }), (err: unknown) => {
        assert.ok(err instanceof Unavailable, String(err));
        assert.ok(err.attempts > 1, "it did retry");
        return true;
      });
      const elapsed = performance.now() - start;
      assert.ok(elapsed < 800 + 400, `ended by the deadline: ${elapsed}ms`);
      const calls = proxy.calls("/ListRoles");
      // Each attempt starts before the deadline (it may arrive a hair later).
      assert.ok(calls.every((s) => s.at - start < 800 + 50), "no attempt after the deadline");
    } finally {
      c.close();
    }
  });

  test("honours the server's RetryInfo delay", async () => {
    proxy.faults = [{ ...UNAVAILABLE, retryDelayMs: 400 }];
    const c = client({ retry: new RetryPolicy({ initialDelayMs: 1, maxDelayMs: 1 }) });
    try {
      await c.auth.listRoles({});
      const [a, b] = proxy.calls("/ListRoles").map((s) => s.at);
      assert.ok(b! - a! >= 398, `waited as told: ${b! - a!}ms`);
    } finally {
      c.close();
    }
  });

  test("RESOURCE_EXHAUSTED is retried only when the server sent RetryInfo", async () => {
    const exhausted = { code: Code.ResourceExhausted, message: "injected: quota" };
    const c = client();
    try {
      proxy.faults = [{ ...exhausted, retryDelayMs: 50 }];
      const { info } = await c.auth.listRoles.withCall({});
      assert.equal(info.attempts, 2);
      proxy.faults = [exhausted];
      await assert.rejects(c.auth.listRoles({}), (err: unknown) => {
        assert.ok(err instanceof ResourceExhausted);
        assert.equal(err.retryDelayMs, undefined);
        assert.equal(err.attempts, 1);
        return true;
      });
    } finally {
      c.close();
    }
  });

  test("the retry budget stops retries against a server that keeps failing", async () => {
    proxy.always = UNAVAILABLE;
    const c = client({
      retry: new RetryPolicy({ initialDelayMs: 5, maxDelayMs: 5, maxAttempts: 10 }),
      retryBudget: new RetryBudget({ maxTokens: 4, tokenRatio: 0.1 }),
    });
    try {
      await assert.rejects(c.auth.listRoles({}), (err: unknown) => {
        assert.ok(err instanceof Unavailable);
        assert.equal(err.attempts, 2);
        assert.match(err.message, /retry budget/);
        return true;
      });
      // Drained: the next call is not retried at all.
      await assert.rejects(c.auth.listRoles({}), (err: unknown) => {
        assert.ok(err instanceof Unavailable);
        assert.equal(err.attempts, 1);
        return true;
      });
      assert.equal(proxy.calls("/ListRoles").length, 3);
    } finally {
      c.close();
    }
  });
});

describe("several replicas behind one address", () => {
  // Two real HTTP/2 hops to the real auth-service stand for two replicas:
  // each counts what it was sent, answers injected faults, or dies.
  let a: FaultProxy;
  let b: FaultProxy;
  before(async () => {
    a = await new FaultProxy(mesh.addrs["auth-service"]!).start();
    b = await new FaultProxy(mesh.addrs["auth-service"]!).start();
  });
  after(async () => {
    await a?.stop();
    await b?.stop();
  });
  const replicas = (): AutoEcoOps =>
    new AutoEcoOps({
      addresses: { ...mesh.addrs, "auth-service": [a.address, b.address] },
      credentials: staticToken(token),
      replicas: { healthIntervalMs: 100 },
    });
  const until = async (what: string, check: () => Promise<boolean>): Promise<void> => {
    const deadline = performance.now() + 30_000;
    while (!(await check())) {
      assert.ok(performance.now() < deadline, `${what}: not within 30 s`);
      await new Promise((ok) => setTimeout(ok, 20));
    }
  };

  test("calls go round robin; a failing replica leaves the rotation until it is healthy", async () => {
    const c = replicas();
    try {
      for (let i = 0; i < 20; i++) await c.auth.listRoles({});
      assert.deepEqual([a.calls("/ListRoles").length, b.calls("/ListRoles").length], [10, 10]);

      // `a` now fails everything, its health checks too: the call that meets
      // it is retried on `b` (idempotent), and `a` is out of the rotation.
      a.always = UNAVAILABLE;
      const before = a.calls("/ListRoles").length;
      for (let i = 0; i < 20; i++) await c.auth.listRoles({});
      assert.ok(a.calls("/ListRoles").length <= before + 1, "a failing replica got one call at most");
      assert.ok(a.calls("grpc.health.v1.Health/Check").length > 0, "its health is checked");

      // Healthy again: back in the rotation after a health check says SERVING.
      a.always = undefined;
      const back = a.calls("/ListRoles").length;
      await until("the replica is back", async () => {
        await c.auth.listRoles({});
        return a.calls("/ListRoles").length > back;
      });
    } finally {
      c.close();
    }
  });

  test("a replica that dies: idempotent calls go on, a create succeeds once or says UNAVAILABLE", async () => {
    const c = replicas();
    const dead = await new FaultProxy(mesh.addrs["auth-service"]!).start();
    const c2 = new AutoEcoOps({
      addresses: { ...mesh.addrs, "auth-service": `${dead.address},${b.address}` },
      credentials: staticToken(token),
      replicas: { healthIntervalMs: 100 },
    });
    try {
      for (let i = 0; i < 4; i++) await c2.auth.listRoles({});
      assert.ok(dead.calls("/ListRoles").length > 0);
      await dead.stop();
      const reads = await Promise.all(Array.from({ length: 20 }, () => c2.auth.listRoles({})));
      assert.equal(reads.length, 20);
      const names = Array.from({ length: 6 }, (_, i) => `replica-ts-${process.pid}-${i}`);
      for (const name of names) {
        const role = { name, permissions: ["memory.documents.get"] };
        try {
          await c2.auth.createRole({ role });
        } catch (err) {
          // Not retried by the client (not idempotent); the caller's retry tells the truth.
          assert.ok(err instanceof Unavailable, String(err));
          await c2.auth.createRole({ role }).catch((again: unknown) => {
            assert.equal((again as { code?: number }).code, Code.AlreadyExists, String(again));
          });
        }
        assert.equal((await c2.auth.getRole({ name })).role?.name, name);
      }
    } finally {
      c.close();
      c2.close();
      await dead.stop();
    }
  });
});
