"""The interactive API page served at ``/docs``.

Self-contained (no CDN: clusters and laptops are often offline): it reads
``/openapi.json`` from the same gateway, lists every operation by service,
and lets a reader fill the parameters and body, send the request with a
bearer token, and see the status, headers and body (streams as they arrive).
"""

from __future__ import annotations

#: Only this page's inline script and style, and calls back to the gateway.
CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'"
)

PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>AutoEcoOps API</title>
<style>
  :root { --fg:#1d2430; --muted:#5b6577; --line:#dde2ea; --bg:#f6f8fb; --card:#fff; --accent:#2456c8; }
  * { box-sizing: border-box; }
  body { margin:0; font:14px/1.45 system-ui, -apple-system, Segoe UI, Roboto, sans-serif; color:var(--fg); background:var(--bg); }
  header { position:sticky; top:0; z-index:2; background:#16213a; color:#fff; padding:10px 20px; display:flex; gap:16px; align-items:center; flex-wrap:wrap; }
  header h1 { font-size:18px; margin:0 12px 0 0; }
  header input { padding:6px 8px; border-radius:4px; border:1px solid #4a5874; background:#0f182b; color:#fff; min-width:260px; }
  header label { font-size:12px; color:#b8c3d9; display:flex; gap:6px; align-items:center; }
  main { max-width:1100px; margin:0 auto; padding:16px 20px 60px; }
  .intro > summary { cursor:pointer; color:var(--fg); }
  #intro { white-space:pre-wrap; margin-top:8px; }
  .intro { background:var(--card); border:1px solid var(--line); border-radius:6px; padding:12px 16px; color:var(--muted); font-size:13px; }
  h2 { margin:28px 0 6px; font-size:17px; }
  .tagdesc { color:var(--muted); margin:0 0 10px; white-space:pre-wrap; }
  .op { background:var(--card); border:1px solid var(--line); border-radius:6px; margin:6px 0; }
  .op > summary { cursor:pointer; padding:8px 12px; display:flex; gap:10px; align-items:baseline; list-style:none; }
  .op > summary::-webkit-details-marker { display:none; }
  .verb { font:600 12px ui-monospace, monospace; padding:2px 6px; border-radius:3px; color:#fff; min-width:58px; text-align:center; }
  .get{background:#1f7a4d}.post{background:#2456c8}.patch{background:#a35a00}.put{background:#7b4bb7}.delete{background:#b3261e}
  .path { font-family:ui-monospace, monospace; }
  .sum { color:var(--muted); margin-left:auto; text-align:right; }
  .lock { font-size:11px; color:#a35a00; }
  .body { padding:4px 14px 14px; border-top:1px solid var(--line); }
  .desc { white-space:pre-wrap; color:var(--fg); }
  table { border-collapse:collapse; width:100%; margin:8px 0; }
  td { border-top:1px solid var(--line); padding:5px 6px; vertical-align:top; }
  td.name { font-family:ui-monospace, monospace; width:30%; }
  td input { width:100%; padding:4px 6px; border:1px solid var(--line); border-radius:3px; }
  textarea { width:100%; min-height:140px; font:12px ui-monospace, monospace; border:1px solid var(--line); border-radius:4px; padding:6px; }
  button { background:var(--accent); color:#fff; border:0; border-radius:4px; padding:6px 14px; cursor:pointer; }
  pre.out { background:#0f182b; color:#dbe4f5; padding:10px; border-radius:4px; overflow:auto; max-height:420px; font-size:12px; }
  .status { font-weight:600; }
  .hidden { display:none; }
</style>
</head>
<body>
<header>
  <h1>AutoEcoOps API</h1>
  <label>Bearer token <input id="token" type="password" placeholder="paste an access token" autocomplete="off"></label>
  <label>Filter <input id="filter" placeholder="path, method or summary"></label>
  <a href="openapi.json" style="color:#b8c3d9">openapi.json</a>
  <a href="openapi.yaml" style="color:#b8c3d9">openapi.yaml</a>
</header>
<main>
  <details class="intro"><summary>How the REST API works: JSON mapping, query parameters, errors, headers, streams</summary>
    <div id="intro">Loading openapi.json...</div></details>
  <div id="ops"></div>
</main>
<script>
"use strict";
const $ = (tag, attrs = {}, ...kids) => {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") el.className = v; else if (k === "text") el.textContent = v; else el.setAttribute(k, v);
  }
  for (const kid of kids) if (kid != null) el.append(kid);
  return el;
};
let doc = null;
const tokenBox = document.getElementById("token");
tokenBox.value = sessionStorage.getItem("autoecoops-token") || "";
tokenBox.addEventListener("input", () => sessionStorage.setItem("autoecoops-token", tokenBox.value));

function resolve(schema) {
  let s = schema || {};
  for (let i = 0; s.$ref && i < 20; i++) s = doc.components.schemas[s.$ref.split("/").pop()] || {};
  return s;
}

function example(schema, depth) {
  const s = resolve(schema);
  if (depth > 3) return undefined;
  if (s.enum) return s.enum[0];
  if (s.type === "object" && s.properties) {
    const out = {};
    for (const [k, v] of Object.entries(s.properties)) {
      if (v.readOnly) continue;
      const e = example(v, depth + 1);
      if (e !== undefined) out[k] = e;
    }
    return out;
  }
  if (s.type === "object") return {};
  if (s.type === "array") return [];
  if (s.type === "integer" || s.type === "number") return 0;
  if (s.type === "boolean") return false;
  if (s.format === "date-time") return new Date().toISOString();
  if (s.type === "string") return "";
  return null;
}

function render() {
  const intro = document.getElementById("intro");
  intro.textContent = doc.info.description || "";
  const byTag = new Map(doc.tags.map(t => [t.name, {tag: t, ops: []}]));
  for (const [path, ops] of Object.entries(doc.paths)) {
    for (const [verb, op] of Object.entries(ops)) {
      const tag = (op.tags || ["Other"])[0];
      if (!byTag.has(tag)) byTag.set(tag, {tag: {name: tag}, ops: []});
      byTag.get(tag).ops.push({path, verb, op});
    }
  }
  const root = document.getElementById("ops");
  root.replaceChildren();
  for (const {tag, ops} of byTag.values()) {
    if (!ops.length) continue;
    const section = $("section", {"data-tag": tag.name}, $("h2", {text: tag.name}));
    if (tag.description) section.append($("p", {class: "tagdesc", text: tag.description}));
    for (const o of ops) section.append(operation(o));
    root.append(section);
  }
}

function operation({path, verb, op}) {
  const secured = (op.security || []).length > 0;
  const head = $("summary", {},
    $("span", {class: "verb " + verb, text: verb.toUpperCase()}),
    $("span", {class: "path", text: path}),
    secured ? $("span", {class: "lock", text: "token"}) : null,
    $("span", {class: "sum", text: op.summary || ""}));
  const box = $("details", {class: "op", "data-search": (verb + " " + path + " " + (op.summary || "")).toLowerCase()}, head);
  box.addEventListener("toggle", () => { if (box.open && !box.dataset.built) { box.dataset.built = "1"; box.append(form(path, verb, op)); } }, {once: false});
  return box;
}

function form(path, verb, op) {
  const body = $("div", {class: "body"});
  if (op.description) body.append($("p", {class: "desc", text: op.description}));
  const inputs = [];
  const params = op.parameters || [];
  if (params.length) {
    const table = $("table");
    for (const p of params) {
      const input = $("input", {placeholder: (resolve(p.schema).type || "") + (p.required ? " (required)" : "")});
      inputs.push([p, input]);
      table.append($("tr", {}, $("td", {class: "name", text: p.name + (p.in === "path" ? " (path)" : "")}),
        $("td", {}, input, p.description ? $("div", {class: "tagdesc", text: p.description}) : null)));
    }
    body.append(table);
  }
  let area = null;
  const content = op.requestBody && op.requestBody.content;
  if (content) {
    const [type, media] = Object.entries(content)[0];
    area = $("textarea", {"data-type": type});
    area.value = JSON.stringify(example(media.schema, 0), null, 2);
    body.append($("div", {class: "tagdesc", text: "Body (" + type + ")"}), area);
  }
  const sse = $("input", {type: "checkbox"});
  const streaming = op.responses && op.responses["200"] && op.responses["200"].content && op.responses["200"].content["text/event-stream"];
  const out = $("pre", {class: "out hidden"});
  const send = $("button", {text: "Send"});
  send.addEventListener("click", () => call(path, verb, inputs, area, streaming && sse.checked, out));
  body.append($("p", {}, send, streaming ? $("label", {}, " ", sse, " as Server-Sent Events") : null), out);
  return body;
}

async function call(path, verb, inputs, area, sse, out) {
  let url = path;
  const query = new URLSearchParams();
  for (const [p, input] of inputs) {
    const v = input.value;
    if (p.in === "path") url = url.replace("{" + p.name + "}", encodeURIComponent(v));
    else if (v !== "") for (const part of (p.schema && p.schema.type === "array" ? v.split(",") : [v])) query.append(p.name, part.trim());
  }
  const qs = query.toString();
  const headers = {"Accept": sse ? "text/event-stream" : "application/json"};
  if (tokenBox.value.trim()) headers["Authorization"] = "Bearer " + tokenBox.value.trim();
  const init = {method: verb.toUpperCase(), headers};
  if (area) { init.body = area.value; headers["Content-Type"] = area.dataset.type; }
  out.classList.remove("hidden");
  out.textContent = init.method + " " + url + (qs ? "?" + qs : "") + "\n\n";
  try {
    const res = await fetch(url + (qs ? "?" + qs : ""), init);
    out.textContent += res.status + " " + res.statusText + "\n";
    for (const [k, v] of res.headers) if (/^(content-type|grpc-|www-authenticate|retry-after|allow)/.test(k)) out.textContent += k + ": " + v + "\n";
    out.textContent += "\n";
    const type = res.headers.get("content-type") || "";
    if (type.includes("ndjson") || type.includes("event-stream")) {
      const reader = res.body.getReader();
      const dec = new TextDecoder();
      for (;;) { const {done, value} = await reader.read(); if (done) break; out.textContent += dec.decode(value, {stream: true}); }
    } else {
      const text = await res.text();
      try { out.textContent += JSON.stringify(JSON.parse(text), null, 2); } catch { out.textContent += text; }
    }
  } catch (err) {
    out.textContent += "request failed: " + err;
  }
}

document.getElementById("filter").addEventListener("input", (e) => {
  const q = e.target.value.toLowerCase();
  for (const op of document.querySelectorAll(".op")) op.style.display = op.dataset.search.includes(q) ? "" : "none";
  for (const sec of document.querySelectorAll("section")) sec.style.display = sec.querySelector(".op:not([style*='none'])") ? "" : "none";
});

fetch("openapi.json").then(r => r.json()).then(d => { doc = d; render(); })
  .catch(err => { document.getElementById("intro").textContent = "Could not load openapi.json: " + err; });
</script>
</body>
</html>
"""
