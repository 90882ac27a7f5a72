// GitOps: applications with sync and health, the live-vs-desired diff as a
// coloured unified diff, the deploy history, and sync / rollback.
import { can, get, post } from "../api.js";
import { h, replace, errorBox, when, label, badge, table, actionButton, flash } from "../ui.js";

const enc = encodeURIComponent;
const GOOD = new Set(["SYNC_STATUS_CODE_SYNCED", "HEALTH_STATUS_CODE_HEALTHY"]);

function kind(code) {
  if (GOOD.has(code)) return "good";
  if (/OUT_OF_SYNC|DEGRADED|MISSING/.test(code || "")) return "bad";
  return "warn";
}

/** One unified diff, line by line, coloured by its first character. */
export function unifiedDiff(text) {
  return h(
    "pre",
    { class: "diff", tabindex: 0, "aria-label": "Unified diff" },
    text.split("\n").map((line) => {
      let cls = "ctx";
      if (line.startsWith("+++") || line.startsWith("---")) cls = "file";
      else if (line.startsWith("@@")) cls = "hunk";
      else if (line.startsWith("+")) cls = "add";
      else if (line.startsWith("-")) cls = "del";
      return h("span", { class: cls }, `${line}\n`);
    }),
  );
}

export async function gitopsPage(root) {
  const list = h("section", { class: "card", "aria-labelledby": "apps-h" });
  const detail = h("section", { id: "app-detail" });
  const notice = h("div", { "aria-live": "polite" });
  replace(root, h("h1", {}, "GitOps"), notice, list, detail);
  const sync = can("infra.applications.sync");
  const rollback = can("infra.applications.rollback");

  async function loadList() {
    let apps;
    try {
      apps = (await get("/v1/applications", { pageSize: 200 })).applications || [];
    } catch (err) {
      replace(list, h("h2", { id: "apps-h" }, "Applications"), errorBox(err));
      return [];
    }
    const rows = apps.map((a) => {
      const s = a.status || {};
      const op = s.operationState;
      return h(
        "tr",
        { "data-app": a.name },
        h("th", { scope: "row" }, h("a", { href: "#app-detail", onclick: () => open(a.name) }, a.name)),
        h("td", {}, badge(label(s.sync?.status, "SYNC_STATUS_CODE_"), kind(s.sync?.status))),
        h("td", {}, badge(label(s.health?.status, "HEALTH_STATUS_CODE_"), kind(s.health?.status))),
        h("td", { class: "mono small" }, (s.sync?.revision || "").slice(0, 12)),
        h("td", {}, op ? `${label(op.phase, "OPERATION_PHASE_")} ${op.message || ""}` : "—"),
        h("td", { class: "mono small" }, `${a.source?.repoUrl || ""} ${a.source?.path || ""}`),
      );
    });
    replace(
      list,
      h("h2", { id: "apps-h" }, "Applications"),
      table("Applications", ["Name", "Sync", "Health", "Revision", "Last operation", "Source"], rows, "No application yet."),
    );
    return apps;
  }

  async function open(name) {
    replace(detail, h("div", { class: "card" }, h("p", { "aria-busy": "true" }, `Loading ${name}…`)));
    const act = async (what, path, body) => {
      try {
        const r = await post(path, body);
        const op = r.operation || {};
        flash(notice, `${what} of ${name}: ${label(op.phase, "OPERATION_PHASE_")} ${op.message || ""}`.trim());
      } catch (err) {
        flash(notice, `${what} of ${name} failed: ${err.message}`, "error");
      }
      // A sync runs on the server; poll until its operation is no longer running.
      for (let i = 0; i < 20; i++) {
        const app = (await get(`/v1/applications/${enc(name)}`)).application;
        if (!/RUNNING|PENDING/.test(app?.status?.operationState?.phase || "")) break;
        await new Promise((r) => setTimeout(r, 500));
      }
      await loadList();
      await open(name);
    };
    // The actions first; the diff and history each show their own error (a
    // token may read the application but not its diff).
    const [diffR, historyR] = await Promise.allSettled([
      get(`/v1/applications/${enc(name)}/diff`),
      get(`/v1/applications/${enc(name)}/history`, { pageSize: 50 }),
    ]);
    let diffPart;
    if (diffR.status === "fulfilled") {
      const diff = diffR.value;
      const changed = (diff.resourceDiffs || []).filter((d) => d.diff);
      diffPart = [
        h("h3", {}, `Diff against revision ${(diff.revision || "").slice(0, 12)} (${label(diff.syncStatus, "SYNC_STATUS_CODE_")})`),
        changed.length
          ? changed.map((d) =>
              h(
                "div",
                { class: "resource-diff" },
                h("h4", {}, `${d.resource?.kind || ""} ${d.resource?.namespace ? `${d.resource.namespace}/` : ""}${d.resource?.name || ""}`),
                unifiedDiff(d.diff),
              ),
            )
          : h("p", { class: "empty" }, "Live state matches the desired state."),
      ];
    } else {
      diffPart = [h("h3", {}, "Diff"), errorBox(diffR.reason)];
    }
    let historyPart;
    if (historyR.status === "fulfilled") {
      const rows = (historyR.value.entries || []).map((e) =>
        h(
          "tr",
          {},
          h("td", { class: "num" }, e.id),
          h("td", { class: "mono small" }, (e.revision || "").slice(0, 12)),
          h("td", {}, when(e.deployTime)),
          h("td", {}, e.initiatedBy),
          h(
            "td",
            {},
            actionButton(`Roll back to ${e.id}`, {
              allowed: rollback,
              confirmText: `Roll ${name} back to history ${e.id}?`,
              run: () => act("Rollback", `/v1/applications/${enc(name)}:rollback`, { historyId: e.id }),
            }),
          ),
        ),
      );
      historyPart = table(`Deploy history of ${name}`, ["Id", "Revision", "Deployed (UTC)", "By", "Rollback"], rows, "Never deployed.");
    } else {
      historyPart = errorBox(historyR.reason);
    }
    replace(
      detail,
      h(
        "div",
        { class: "card" },
        h("h2", {}, name),
        h(
          "p",
          { class: "actions" },
          actionButton("Sync", { allowed: sync, run: () => act("Sync", `/v1/applications/${enc(name)}:sync`, {}) }),
        ),
        diffPart,
        h("h3", {}, "History"),
        historyPart,
      ),
    );
  }

  const apps = await loadList();
  if (apps.length) await open(apps[0].name);
}
