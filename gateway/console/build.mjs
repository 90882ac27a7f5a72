// Builds the console bundle in dist/ from src/ and the pinned npm packages.
//
//   node build.mjs          write dist/ (what `./dev gen` runs)
//   node build.mjs --check  build into memory and fail if dist/ differs (what `./dev test` runs)
//
// dist/ is committed so that `./dev up` and the Python package serve the console
// without Node.js; the check keeps it equal to what the sources build.
import { build } from "esbuild";
import { readFileSync, writeFileSync, mkdirSync, readdirSync, rmSync, existsSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const dist = join(here, "dist");
const check = process.argv.includes("--check");
const swagger = join(here, "node_modules", "swagger-ui-dist");

/** @type {Map<string, Buffer>} name in dist/ -> bytes */
const files = new Map();

const bundled = await build({
  entryPoints: { console: join(here, "src", "main.js"), docs: join(here, "src", "docs.js") },
  bundle: true,
  minify: true,
  format: "iife",
  target: ["chrome110", "firefox115", "safari16"],
  legalComments: "eof",
  charset: "utf8",
  write: false,
  outdir: dist,
  loader: { ".css": "css" },
  logLevel: "warning",
});
for (const out of bundled.outputFiles) {
  files.set(out.path.slice(dist.length + 1), Buffer.from(out.contents));
}
for (const page of ["index.html", "docs.html", "docs.css"]) {
  files.set(page, readFileSync(join(here, "src", page)));
}
// Swagger UI as its maintainers distribute it, unmodified, with its licence.
for (const name of ["swagger-ui-bundle.js", "swagger-ui.css", "LICENSE", "NOTICE"]) {
  files.set(`swagger-ui/${name}`, readFileSync(join(swagger, name)));
}

if (check) {
  const stale = [];
  const listed = new Set();
  const walk = (dir, prefix) => {
    for (const e of readdirSync(dir, { withFileTypes: true })) {
      const rel = prefix + e.name;
      if (e.isDirectory()) walk(join(dir, e.name), rel + "/");
      else listed.add(rel);
    }
  };
  if (existsSync(dist)) walk(dist, "");
  for (const [name, bytes] of files) {
    if (!listed.has(name) || !readFileSync(join(dist, name)).equals(bytes)) stale.push(name);
    listed.delete(name);
  }
  stale.push(...[...listed].map((n) => `${n} (not built from the sources)`));
  if (stale.length) {
    console.error(`gateway/console/dist is stale (run ./dev gen): ${stale.join(", ")}`);
    process.exit(1);
  }
  console.log(`gateway/console/dist: ${files.size} files match the sources`);
} else {
  rmSync(dist, { recursive: true, force: true });
  for (const [name, bytes] of files) {
    mkdirSync(dirname(join(dist, name)), { recursive: true });
    writeFileSync(join(dist, name), bytes);
  }
  console.log(`gateway/console/dist: wrote ${files.size} files`);
}
