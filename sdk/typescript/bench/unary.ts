/**
 * A unary call through the SDK against the same call through a raw connect
 * client on the same transport (same HTTP/2 connection, same token), against
 * the real auth-service of an `autoecoops up` on free ports. Prints p50/p90
 * of each and the ratio of the p50s (target: at most 1.15).
 *
 *     npm run bench     (or: ./dev bench)
 */
import { createClient } from "@connectrpc/connect";
import { AutoEcoOps, services, staticToken } from "../src/index.js";
import { startMesh } from "../tests/mesh.js";

const ROUNDS = Number(process.env["BENCH_ROUNDS"] ?? 20);
const PER_ROUND = Number(process.env["BENCH_CALLS"] ?? 100);

function percentile(sorted: number[], p: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor(sorted.length * p))]!;
}

const mesh = await startMesh();
try {
  const token = await mesh.token("bench");
  const sdk = new AutoEcoOps({ addresses: mesh.addrs, credentials: staticToken(token) });
  const raw = createClient(services.auth, sdk.connection(services.auth).transport);
  const headers = { authorization: `Bearer ${token}` };
  const viaSdk = () => sdk.auth.getRole({ name: "viewer" });
  const viaRaw = () => raw.getRole({ name: "viewer" }, { headers, timeoutMs: 30_000 });
  // Warm up both paths (connection, JIT, the server's caches).
  for (let i = 0; i < 200; i++) {
    await viaSdk();
    await viaRaw();
  }
  const times: Record<"sdk" | "raw", number[]> = { sdk: [], raw: [] };
  // Interleaved rounds, so drift in the server or the machine hits both alike.
  for (let r = 0; r < ROUNDS; r++) {
    for (const [name, call] of (r % 2 ? [["raw", viaRaw], ["sdk", viaSdk]] : [["sdk", viaSdk], ["raw", viaRaw]]) as [
      "sdk" | "raw",
      () => Promise<unknown>,
    ][]) {
      for (let i = 0; i < PER_ROUND; i++) {
        const t0 = performance.now();
        await call();
        times[name].push(performance.now() - t0);
      }
    }
  }
  const stats = (xs: number[]) => {
    const s = [...xs].sort((a, b) => a - b);
    return { p50: percentile(s, 0.5), p90: percentile(s, 0.9), n: s.length };
  };
  const a = stats(times.sdk);
  const b = stats(times.raw);
  const fmt = (x: number) => `${(x * 1000).toFixed(0)}µs`;
  console.log(`unary GetRole against the real auth-service, ${a.n} calls each, interleaved`);
  console.log(`  raw connect client : p50 ${fmt(b.p50)}  p90 ${fmt(b.p90)}`);
  console.log(`  AutoEcoOps SDK     : p50 ${fmt(a.p50)}  p90 ${fmt(a.p90)}`);
  console.log(`  ratio SDK/raw p50  : ${(a.p50 / b.p50).toFixed(3)} (target <= 1.15)`);
  sdk.close();
} finally {
  await mesh.stop();
}
