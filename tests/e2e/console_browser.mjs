// Drives Debian's headless Chromium (playwright-core, never a downloaded
// browser) through every console page; run by tests/e2e/test_console.py,
// which created the data named in CONSOLE_SPEC. Prints one JSON report line;
// exits non-zero on the first failed expectation.
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { createRequire } from "node:module";
import { tmpdir } from "node:os";
import { join } from "node:path";

const env = process.env;
// The npm packages are gateway/console's (pinned in its package-lock.json).
const require = createRequire(join(env.CONSOLE_MODULES, "package.json"));
const { chromium } = require("playwright-core");
const { default: AxeBuilder } = require("@axe-core/playwright");

const BASE = env.CONSOLE_BASE;
const SPEC = JSON.parse(env.CONSOLE_SPEC);
const SHOTS = env.CONSOLE_SCREENSHOTS;
const report = { verdicts: {}, offsite: [], cspViolations: [], axe: {}, steps: [] };
const step = (s) => {
  report.steps.push(s);
  console.error(`console e2e: ${s}`);
};

const profile = mkdtempSync(join(tmpdir(), "console-chromium-"));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: env.CONSOLE_CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
  viewport: { width: 1360, height: 900 },
});
context.setDefaultTimeout(20000);

// Offline by construction: any request that is not to the gateway is refused and recorded.
await context.route("**/*", (route) => {
  const url = route.request().url();
  if (url.startsWith(BASE) || url.startsWith("data:")) return route.continue();
  report.offsite.push(url);
  return route.abort();
});

async function scan(page, name) {
  const result = await new AxeBuilder({ page }).analyze();
  report.axe[name] = result.violations
    .filter((v) => v.impact === "serious" || v.impact === "critical")
    .map((v) => `${v.id} (${v.impact}): ${v.nodes.map((n) => n.target.join(" ")).slice(0, 3).join(", ")}`);
}

async function shot(page, name) {
  await page.screenshot({ path: join(SHOTS, `${name}.png`), fullPage: true });
}

function watch(page) {
  page.on("console", (msg) => {
    if (msg.type() === "error" && /Content Security Policy/i.test(msg.text())) report.cspViolations.push(msg.text());
  });
  page.on("pageerror", (err) => report.cspViolations.push(`page error: ${err.message}`));
}

try {
  const page = await context.newPage();
  watch(page);

  step("sign-in");
  await page.goto(`${BASE}/console`);
  await page.getByLabel("Access token").waitFor();
  await scan(page, "signin");
  await shot(page, "signin");
  await page.getByLabel("Access token").fill(env.CONSOLE_ADMIN_TOKEN);
  await page.getByRole("button", { name: "Sign in" }).click();

  step("audit explorer");
  await page.locator("#page-audit table").waitFor();
  await page.getByLabel("Trace id").fill(SPEC.traceId);
  await page.getByRole("button", { name: "Search" }).click();
  const rows = page.locator("#page-audit tbody tr");
  await page.waitForFunction(
    (n) => document.querySelectorAll("#page-audit tbody tr").length === n,
    2,
  );
  assert.deepEqual(
    await rows.evaluateAll((trs) => trs.map((tr) => tr.dataset.index)),
    [String(SPEC.goodIndex), String(SPEC.tamperedIndex)],
  );
  await page.getByRole("button", { name: `Verify entry ${SPEC.goodIndex}` }).click();
  const verdict = page.locator("#proof [data-verdict]");
  await verdict.waitFor();
  report.verdicts.good = await verdict.getAttribute("data-verdict");
  await scan(page, "audit");
  await shot(page, "audit");
  await page.getByRole("button", { name: `Verify entry ${SPEC.tamperedIndex}` }).click();
  await page.locator(`#proof h2:has-text("Entry ${SPEC.tamperedIndex}")`).waitFor();
  await verdict.waitFor();
  report.verdicts.tampered = await verdict.getAttribute("data-verdict");
  assert.match(await verdict.innerText(), /do not recompute the signed root/);
  await shot(page, "audit-failed");

  step("events");
  await page.goto(`${BASE}/console#/events`);
  const letter = page.locator(`tr[data-dead-letter="${SPEC.deadLetterId}"]`);
  await letter.waitFor();
  assert.match(await letter.innerText(), /schema mismatch/);
  const group = page.locator(`tr[data-topic="${SPEC.topic}"][data-group="${SPEC.group}"]`);
  await group.waitFor();
  await scan(page, "events");
  await shot(page, "events");
  await letter.getByRole("button", { name: "Redrive" }).click();
  await letter.waitFor({ state: "detached" });
  await page.getByText(/Redrove 1 dead letter/).waitFor();

  step("gitops");
  await page.goto(`${BASE}/console#/gitops`);
  const app = page.locator(`tr[data-app="${SPEC.app}"]`);
  await app.waitFor();
  await page.locator("pre.diff .add").first().waitFor();
  assert.match(await page.locator("pre.diff").first().innerText(), /v2/);
  await scan(page, "gitops");
  await shot(page, "gitops");
  await page.getByRole("button", { name: "Sync", exact: true }).click();
  await page.getByText(/Sync of shop/).waitFor();
  await app.getByText("Synced").waitFor();
  await page.getByText("Live state matches the desired state.").waitFor();

  step("memory");
  await page.goto(`${BASE}/console#/memory`);
  await page.locator(`#m-ns option[value="${SPEC.namespace}"]`).waitFor({ state: "attached" });
  await page.getByLabel("Namespace").selectOption(SPEC.namespace);
  await page.getByLabel("Query").fill(SPEC.query);
  await page.getByRole("button", { name: "Search" }).click();
  await page.locator("tr.hit").first().waitFor();
  assert.equal(await page.locator("tr.hit .source").first().innerText(), SPEC.expectedSource);
  await scan(page, "memory");
  await shot(page, "memory");

  step("docs");
  await page.goto(`${BASE}/docs`);
  await page.locator(".swagger-ui .opblock").first().waitFor();
  await scan(page, "docs");
  await shot(page, "docs");

  step("read-only token: actions disabled");
  const viewer = await context.newPage();
  watch(viewer);
  await viewer.goto(`${BASE}/console#/gitops`);
  // sessionStorage is per tab: this tab signs in on its own.
  await viewer.getByLabel("Access token").fill(env.CONSOLE_VIEWER_TOKEN);
  await viewer.getByRole("button", { name: "Sign in" }).click();
  await viewer.locator(`tr[data-app="${SPEC.app}"]`).waitFor();
  const sync = viewer.getByRole("button", { name: "Sync", exact: true });
  await sync.waitFor();
  await viewer.waitForFunction(() => {
    const b = [...document.querySelectorAll("button")].find((x) => x.textContent === "Sync");
    return b && b.disabled && b.title.includes("permission");
  });
  // The server refuses too: the viewer's sync call is a 403.
  const status = await viewer.evaluate(async (token) => {
    const r = await fetch("/v1/applications/shop:sync", {
      method: "POST",
      headers: { authorization: `Bearer ${token}`, "content-type": "application/json" },
      body: "{}",
    });
    return r.status;
  }, env.CONSOLE_VIEWER_TOKEN);
  assert.equal(status, 403);
  step("done");
} catch (err) {
  console.error(JSON.stringify(report, null, 1));
  console.error(err);
  await context.close();
  rmSync(profile, { recursive: true, force: true });
  process.exit(1);
}
await context.close();
rmSync(profile, { recursive: true, force: true });
console.log(JSON.stringify(report));
