/**
 * The README's examples, as they are: every `ts` block is type-checked with
 * `tsc --strict` (importing `@autoecoops/sdk` by its package name) and run
 * with node against a real mesh, addresses in AUTOECOOPS_<SERVICE>_ADDR.
 */
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { after, before, test } from "node:test";
import { AutoEcoOps, staticToken } from "../src/index.js";
import { type Mesh, SERVICES, startMesh } from "./mesh.js";

const run = promisify(execFile);
const PKG = resolve(dirname(fileURLToPath(import.meta.url)), "../..");
const OUT = join(PKG, ".readme");
const blocks = [...readFileSync(join(PKG, "README.md"), "utf8").matchAll(/```ts\n([\s\S]*?)```/g)].map(
  (m) => m[1]!,
);
let mesh: Mesh;
let env: Record<string, string>;

before(async () => {
  rmSync(OUT, { recursive: true, force: true });
  mkdirSync(OUT, { recursive: true });
  blocks.forEach((code, i) => writeFileSync(join(OUT, `example-${i + 1}.ts`), code));
  writeFileSync(
    join(OUT, "tsconfig.json"),
    JSON.stringify({
      extends: "../tsconfig.json",
      compilerOptions: { rootDir: ".", outDir: "out", declaration: false, declarationMap: false },
      include: ["*.ts"],
    }),
  );
  mesh = await startMesh();
  const token = await mesh.token("readme");
  const admin = new AutoEcoOps({ addresses: mesh.addrs, credentials: staticToken(token) });
  const account = await admin.auth.createServiceAccount({
    serviceAccount: { name: "readme-service", roles: ["viewer"] },
  });
  admin.close();
  env = { ...(process.env as Record<string, string>), AUTOECOOPS_TOKEN: token };
  env["CLIENT_ID"] = "readme-service";
  env["CLIENT_SECRET"] = account.clientSecret;
  for (const svc of SERVICES)
    env[`AUTOECOOPS_${svc.toUpperCase().replace(/-/g, "_")}_ADDR`] = mesh.addrs[svc]!;
});
after(async () => {
  await mesh?.stop();
  rmSync(OUT, { recursive: true, force: true });
});

test("the README has examples", () => {
  assert.ok(blocks.length >= 7, `${blocks.length} ts blocks`);
});

test("every example type-checks with tsc --strict", async () => {
  const tsc = join(PKG, "node_modules/.bin/tsc");
  await run(tsc, ["-p", join(OUT, "tsconfig.json")], { cwd: PKG }).catch((err: { stdout: string }) => {
    assert.fail(`tsc failed:\n${err.stdout}`);
  });
});

test("every example runs against the mesh", async (t) => {
  for (let i = 1; i <= blocks.length; i++) {
    await t.test(`example ${i}`, async () => {
      const file = join(OUT, "out", `example-${i}.js`);
      const done = await run(process.execPath, [file], { env, cwd: PKG, timeout: 60_000 }).catch(
        (err: { stdout: string; stderr: string }) => assert.fail(`example ${i} failed:\n${blocks[i - 1]}\n${err.stderr}`),
      );
      assert.ok(done.stdout.length > 0, `example ${i} printed something`);
    });
  }
});
