// Memory: search a namespace; each hit with its score and source.
import { get, post } from "../api.js";
import { h, replace, errorBox, table } from "../ui.js";

export async function memoryPage(root) {
  const select = h("select", { id: "m-ns", name: "namespace", required: true });
  const query = h("input", { id: "m-q", name: "query", type: "search", required: true, autocomplete: "off" });
  const hits = h("section", { class: "card", "aria-live": "polite", "aria-labelledby": "hits-h" });
  const form = h(
    "form",
    { class: "card filters", role: "search", "aria-label": "Search memory" },
    h("div", { class: "field" }, h("label", { for: "m-ns" }, "Namespace"), select),
    h("div", { class: "field grow" }, h("label", { for: "m-q" }, "Query"), query),
    h("div", { class: "field" }, h("button", { type: "submit" }, "Search")),
  );
  replace(root, h("h1", {}, "Memory"), form, hits);
  try {
    const namespaces = (await get("/v1/memory/namespaces", { pageSize: 200 })).namespaces || [];
    replace(select, namespaces.map((n) => h("option", { value: n.name }, `${n.name} (${n.documentCount || 0} documents)`)));
    if (!namespaces.length) replace(hits, h("p", { class: "empty" }, "No namespace yet."));
  } catch (err) {
    replace(hits, errorBox(err));
  }
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    replace(hits, h("p", { "aria-busy": "true" }, "Searching…"));
    try {
      const res = await post(`/v1/memory/namespaces/${encodeURIComponent(select.value)}/documents:search`, {
        query: query.value,
        k: 10,
      });
      const rows = (res.results || []).map((r, i) =>
        h(
          "tr",
          { class: "hit" },
          h("td", { class: "num" }, i + 1),
          h("td", { class: "num" }, Number(r.score || 0).toFixed(3)),
          h(
            "td",
            {},
            h("strong", {}, r.chunk?.title || r.chunk?.documentId || ""),
            h("p", { class: "snippet" }, r.chunk?.text || ""),
          ),
          h("td", { class: "mono small source" }, r.chunk?.sourceUri || r.chunk?.documentId || ""),
        ),
      );
      replace(hits, h("h2", { id: "hits-h" }, "Hits"), table(`Hits for “${query.value}”`, ["#", "Score", "Text", "Source"], rows, "No hit."));
    } catch (err) {
      replace(hits, h("h2", { id: "hits-h" }, "Hits"), errorBox(err));
    }
  });
}
