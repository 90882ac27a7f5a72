// The console shell: sign-in with a pasted token, navigation, one page at a time.
// No SLO page yet: the draft was written against Platform-01's old paths and is
// kept on the `console` branch until it is moved to /v1/autoops/... and tested.
import "./console.css";
import { forgetPermissions, session } from "./api.js";
import { h, replace, errorBox } from "./ui.js";
import { auditPage } from "./pages/audit.js";
import { eventsPage } from "./pages/events.js";
import { gitopsPage } from "./pages/gitops.js";
import { memoryPage } from "./pages/memory.js";

const PAGES = [
  { id: "audit", title: "Audit", render: auditPage },
  { id: "events", title: "Events", render: eventsPage },
  { id: "gitops", title: "GitOps", render: gitopsPage },
  { id: "memory", title: "Memory", render: memoryPage },
];

const main = document.getElementById("main");
const nav = document.getElementById("nav");
const who = document.getElementById("who");

function current() {
  const id = location.hash.replace(/^#\/?/, "").split("?")[0];
  return PAGES.find((p) => p.id === id) || PAGES[0];
}

function renderNav(page) {
  replace(
    nav,
    h(
      "ul",
      {},
      PAGES.map((p) =>
        h("li", {}, h("a", { href: `#/${p.id}`, "aria-current": p === page ? "page" : false }, p.title)),
      ),
      h("li", {}, h("a", { href: "/docs" }, "API reference")),
    ),
  );
}

function signIn(message) {
  replace(who);
  replace(nav);
  const input = h("textarea", {
    id: "token",
    rows: 4,
    required: true,
    autocomplete: "off",
    spellcheck: "false",
    placeholder: "eyJhbGciOi…",
  });
  const form = h(
    "form",
    { class: "card signin", "aria-labelledby": "signin-title" },
    h("h1", { id: "signin-title" }, "Sign in"),
    h(
      "p",
      {},
      "Paste an access token. Get one with ",
      h("code", {}, "autoecoops token --subject you --roles admin"),
      " or POST /v1/auth/token. It is kept in this tab only (sessionStorage).",
    ),
    message ? h("p", { class: "error", role: "alert" }, message) : null,
    h("label", { for: "token" }, "Access token"),
    input,
    h("button", { type: "submit" }, "Sign in"),
  );
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    session.set(input.value);
    forgetPermissions();
    route();
  });
  replace(main, form);
  input.focus();
}

async function whoami() {
  // The token's claims, shown so the user knows who the console acts as.
  const part = session.get().split(".")[1] || "";
  try {
    const claims = JSON.parse(atob(part.replace(/-/g, "+").replace(/_/g, "/")));
    return { subject: claims.sub || "?", roles: claims.roles || [] };
  } catch {
    return { subject: "?", roles: [] };
  }
}

async function route() {
  if (!session.get()) {
    signIn();
    return;
  }
  const page = current();
  renderNav(page);
  const me = await whoami();
  const out = h(
    "button",
    {
      type: "button",
      class: "link",
      onclick: () => {
        session.clear();
        forgetPermissions();
        signIn();
      },
    },
    "Sign out",
  );
  replace(who, h("span", {}, `${me.subject}`, me.roles.length ? ` (${me.roles.join(", ")})` : ""), out);
  document.title = `${page.title} · AutoEcoOps console`;
  const region = h("div", { class: "page", id: `page-${page.id}` });
  replace(main, region);
  try {
    await page.render(region);
  } catch (err) {
    if (err.http === 401) {
      session.clear();
      signIn(`The token was refused: ${err.message}`);
      return;
    }
    region.append(errorBox(err));
  }
}

window.addEventListener("hashchange", route);
route();
