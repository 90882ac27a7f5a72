// Small DOM helpers: elements are built, never parsed from strings (no innerHTML).

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else if (v === true) el.setAttribute(k, "");
    else el.setAttribute(k, String(v));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

export function replace(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

/** A status line for a region: loading, an error (role=alert), or nothing. */
export function errorBox(err) {
  return h("p", { class: "error", role: "alert" }, `Error: ${err.message || err}`);
}

export function when(ts) {
  if (!ts) return "";
  const d = new Date(ts);
  return Number.isNaN(d.getTime()) ? ts : d.toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
}

/** An enum value without its type prefix: SYNC_STATUS_CODE_SYNCED -> Synced. */
export function label(value, prefix) {
  if (!value) return "—";
  const s = String(value).startsWith(prefix) ? String(value).slice(prefix.length) : String(value);
  return s.charAt(0) + s.slice(1).toLowerCase().replaceAll("_", " ");
}

export function badge(text, kind) {
  return h("span", { class: `badge ${kind || ""}` }, text);
}

export function table(caption, head, rows, empty = "Nothing to show.") {
  if (!rows.length) return h("p", { class: "empty" }, empty);
  return h(
    "table",
    {},
    h("caption", {}, caption),
    h("thead", {}, h("tr", {}, head.map((c) => h("th", { scope: "col" }, c)))),
    h("tbody", {}, rows),
  );
}

/** A button that runs an async action, shows it running and reports the outcome. */
export function actionButton(text, { allowed, run, confirmText, title }) {
  const btn = h("button", { type: "button", disabled: true, title: title || "" }, text);
  Promise.resolve(allowed).then((ok) => {
    btn.disabled = !ok;
    if (!ok) btn.title = "Your token does not have the permission for this action";
  });
  btn.addEventListener("click", async () => {
    if (confirmText && !window.confirm(confirmText)) return;
    btn.disabled = true;
    btn.setAttribute("aria-busy", "true");
    try {
      await run();
    } finally {
      btn.removeAttribute("aria-busy");
      btn.disabled = false;
    }
  });
  return btn;
}

export function flash(region, text, kind = "ok") {
  replace(region, h("p", { class: kind === "ok" ? "notice" : "error", role: "status" }, text));
}
