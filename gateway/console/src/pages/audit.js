// Audit explorer: entries by time, actor, resource and trace id; one entry's
// inclusion proof verified in this page against the latest signed checkpoint.
import { get } from "../api.js";
import { h, replace, errorBox, when, label, badge, table } from "../ui.js";
import { verifyEntry } from "../verify.js";

const FIELDS = [
  ["actor", "Actor (subject)"],
  ["resource", "Resource"],
  ["traceId", "Trace id"],
  ["type", "Type"],
];

function rfc3339(local) {
  return local ? new Date(local).toISOString() : "";
}

export async function auditPage(root) {
  const results = h("section", { "aria-labelledby": "audit-results", class: "card" });
  const proof = h("section", { "aria-live": "polite", id: "proof" });
  const inputs = {};
  const form = h(
    "form",
    { class: "card filters", role: "search", "aria-label": "Filter audit entries" },
    FIELDS.map(([name, text]) => {
      inputs[name] = h("input", { id: `f-${name}`, name, autocomplete: "off" });
      return h("div", { class: "field" }, h("label", { for: `f-${name}` }, text), inputs[name]);
    }),
    ["startTime", "endTime"].map((name) => {
      inputs[name] = h("input", { id: `f-${name}`, name, type: "datetime-local", step: 1 });
      return h(
        "div",
        { class: "field" },
        h("label", { for: `f-${name}` }, name === "startTime" ? "From (local time)" : "Before (local time)"),
        inputs[name],
      );
    }),
    h("div", { class: "field" }, h("button", { type: "submit" }, "Search")),
  );
  let pageToken = "";
  async function load(append = false) {
    const params = { pageSize: 50, pageToken: append ? pageToken : "" };
    for (const [name] of FIELDS) params[name] = inputs[name].value.trim();
    params.startTime = rfc3339(inputs.startTime.value);
    params.endTime = rfc3339(inputs.endTime.value);
    try {
      const res = await get("/v1/audit/entries", params);
      pageToken = res.nextPageToken || "";
      show(res.entries || [], append);
    } catch (err) {
      replace(results, h("h2", { id: "audit-results" }, "Entries"), errorBox(err));
    }
  }
  let rows = [];
  function show(entries, append) {
    const made = entries.map((e) =>
      h(
        "tr",
        { "data-index": e.index },
        h("td", { class: "num" }, e.index),
        h("td", {}, when(e.time)),
        h("td", {}, e.type),
        h("td", {}, e.actor?.subject || ""),
        h("td", {}, e.action),
        h("td", { class: "mono" }, e.resource),
        h("td", {}, badge(label(e.outcome, "OUTCOME_"), e.outcome === "OUTCOME_SUCCESS" ? "good" : "bad")),
        h("td", { class: "mono small" }, e.traceId),
        h(
          "td",
          {},
          h(
            "button",
            { type: "button", class: "small", onclick: () => verify(e.index), "aria-label": `Verify entry ${e.index}` },
            "Verify",
          ),
        ),
      ),
    );
    rows = append ? rows.concat(made) : made;
    replace(
      results,
      h("h2", { id: "audit-results" }, "Entries"),
      table("Audit entries, oldest first", ["#", "Time (UTC)", "Type", "Actor", "Action", "Resource", "Outcome", "Trace id", "Proof"], rows, "No entry matches."),
      pageToken ? h("button", { type: "button", onclick: () => load(true) }, "More") : null,
    );
  }
  async function verify(index) {
    replace(proof, h("div", { class: "card" }, h("h2", {}, `Entry ${index}`), h("p", { "aria-busy": "true" }, "Verifying in the browser…")));
    let entryResponse;
    const result = await verifyEntry(index, async () => {
      const [checkpointResponse, entry] = await Promise.all([
        get("/v1/audit/checkpoint"),
        get(`/v1/audit/entries/${encodeURIComponent(index)}`),
      ]);
      entryResponse = entry;
      return {
        checkpointResponse,
        entryResponse,
        proofFor: (size) => get("/v1/audit/proofs/inclusion", { index, treeSize: size.toString() }),
      };
    });
    let pretty = "";
    try {
      const bin = atob(entryResponse?.entryBytes || "");
      pretty = JSON.stringify(JSON.parse(new TextDecoder().decode(Uint8Array.from(bin, (c) => c.charCodeAt(0)))), null, 2);
    } catch {
      pretty = "";
    }
    replace(
      proof,
      h(
        "div",
        { class: `card verdict ${result.ok ? "verified" : "failed"}`, "data-verdict": result.ok ? "verified" : "failed" },
        h("h2", {}, `Entry ${index}: `, h("span", { class: "verdict-word" }, result.ok ? "verified" : "failed")),
        h(
          "ul",
          { class: "checks" },
          result.checks.map((c) =>
            h("li", { class: c.ok ? "ok" : "bad" }, h("strong", {}, c.ok ? "✓ " : "✗ ", c.name), ": ", c.detail),
          ),
        ),
        pretty ? h("details", {}, h("summary", {}, "The entry's logged bytes"), h("pre", {}, pretty)) : null,
      ),
    );
  }
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    load();
  });
  replace(root, h("h1", {}, "Audit explorer"), form, proof, results);
  await load();
}
