/**
 * The real mesh for the tests: `autoecoops up` (the worktree's .venv) on free
 * ports with its own data directory, and real tokens from `autoecoops token`.
 */
import { type ChildProcess, execFile, spawn } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "../../../..");
export const BIN = process.env["AUTOECOOPS_BIN"] ?? join(ROOT, ".venv/bin/autoecoops");

export const SERVICES = [
  "auth-service",
  "memory-hub",
  "event-bus",
  "policy-audit",
  "infra-manager",
  "autoops",
  "iaops",
  "machine-ops",
] as const;

/** `n` distinct free TCP ports on loopback (all bound at once, then released). */
export async function freePorts(n: number): Promise<number[]> {
  const servers = await Promise.all(
    Array.from(
      { length: n },
      () =>
        new Promise<ReturnType<typeof createServer>>((ok, fail) => {
          const s = createServer();
          s.on("error", fail);
          s.listen(0, "127.0.0.1", () => ok(s));
        }),
    ),
  );
  const ports = servers.map((s) => {
    const addr = s.address();
    return typeof addr === "object" && addr ? addr.port : 0;
  });
  await Promise.all(servers.map((s) => new Promise((ok) => s.close(ok))));
  return ports;
}

export interface Mesh {
  /** `host:port` of each mesh service. */
  addrs: Record<string, string>;
  env: Record<string, string>;
  dataDir: string;
  proc: ChildProcess;
  output: string[];
  /** A real token signed with the mesh's key ring. */
  token(subject: string, roles?: string[], ttl?: string): Promise<string>;
  /** Run another `autoecoops` command against this mesh. */
  cli(...args: string[]): Promise<string>;
  stop(): Promise<void>;
}

/** Start `autoecoops up` on free ports; resolves once it reports all SERVING. */
export async function startMesh(extraEnv: Record<string, string> = {}): Promise<Mesh> {
  const env: Record<string, string> = {};
  for (const [k, v] of Object.entries(process.env))
    if (v !== undefined && !k.startsWith("AUTOECOOPS_") && k !== "REDIS_URL") env[k] = v;
  const addrs: Record<string, string> = {};
  const ports = await freePorts(SERVICES.length + 1);
  for (const svc of SERVICES) {
    const port = ports.pop()!;
    env[`AUTOECOOPS_${svc.toUpperCase().replace(/-/g, "_")}_PORT`] = String(port);
    addrs[svc] = `127.0.0.1:${port}`;
  }
  const dataDir = mkdtempSync(join(tmpdir(), "aeo-ts-"));
  env["AUTOECOOPS_DATA_DIR"] = dataDir;
  env["AUTOECOOPS_GATEWAY_PORT"] = String(ports.pop()!);
  Object.assign(env, extraEnv);
  const proc = spawn(BIN, ["up"], { env, stdio: ["ignore", "pipe", "pipe"] });
  // Never leave a mesh behind, however the test process ends (but SIGKILL).
  const reap = (): void => {
    if (proc.exitCode === null) proc.kill("SIGKILL");
  };
  process.once("exit", reap);
  for (const sig of ["SIGINT", "SIGTERM"] as const)
    process.once(sig, () => {
      reap();
      process.exit(1);
    });
  const output: string[] = [];
  await new Promise<void>((ok, fail) => {
    const timer = setTimeout(() => {
      proc.kill("SIGKILL");
      fail(new Error(`autoecoops up did not report SERVING:\n${output.join("")}`));
    }, 120_000);
    const onData = (chunk: Buffer): void => {
      output.push(chunk.toString());
      if (output.join("").includes("services SERVING")) {
        clearTimeout(timer);
        ok();
      }
    };
    proc.stdout!.on("data", onData);
    proc.stderr!.on("data", onData);
    proc.on("exit", (code) => {
      clearTimeout(timer);
      fail(new Error(`autoecoops up exited (${code}):\n${output.join("")}`));
    });
  });
  const run = promisify(execFile);
  const cli = async (...args: string[]): Promise<string> =>
    (await run(BIN, args, { env, timeout: 60_000 })).stdout;
  return {
    addrs,
    env,
    dataDir,
    proc,
    output,
    cli,
    token: async (subject, roles = ["admin"], ttl = "1h") =>
      (await cli("token", "--subject", subject, "--roles", roles.join(","), "--ttl", ttl)).trim(),
    stop: async () => {
      if (proc.exitCode === null) {
        const exited = new Promise((ok) => proc.once("exit", ok));
        proc.kill("SIGTERM");
        const t = setTimeout(() => proc.kill("SIGKILL"), 30_000);
        await exited;
        clearTimeout(t);
      }
      rmSync(dataDir, { recursive: true, force: true });
    },
  };
}
