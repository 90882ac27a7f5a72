// Every call the console makes: the gateway's REST API with the signed-in token.

const KEY = "autoecoops.console.token";

/** The token lives in sessionStorage: per tab, gone when the tab closes. */
export const session = {
  get: () => sessionStorage.getItem(KEY) || "",
  set: (t) => sessionStorage.setItem(KEY, t.trim()),
  clear: () => sessionStorage.removeItem(KEY),
};

/** A non-2xx answer: the google.rpc.Status the gateway returned. */
export class ApiError extends Error {
  constructor(http, status) {
    const reason = (status.details || []).find((d) => d.reason)?.reason;
    super(`${status.message || "request failed"} (HTTP ${http}${reason ? `, ${reason}` : ""})`);
    this.http = http;
    this.status = status;
    this.reason = reason || "";
  }
}

function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params || {})) {
    if (v !== undefined && v !== null && v !== "") q.append(k, String(v));
  }
  const s = q.toString();
  return s ? `?${s}` : "";
}

export async function call(method, path, { params, body } = {}) {
  const headers = { accept: "application/json" };
  const token = session.get();
  if (token) headers.authorization = `Bearer ${token}`;
  const init = { method, headers, credentials: "omit", cache: "no-store" };
  if (body !== undefined) {
    headers["content-type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const res = await fetch(path + query(params), init);
  const text = await res.text();
  let data;
  try {
    data = text ? JSON.parse(text) : {};
  } catch {
    data = { message: text.slice(0, 200) };
  }
  if (!res.ok) throw new ApiError(res.status, data);
  return data;
}

export const get = (path, params) => call("GET", path, { params });
export const post = (path, body = {}) => call("POST", path, { body });

const allowed = new Map();

/**
 * Whether the signed-in token holds a permission (auth-service decides; the
 * server still enforces every call, this only greys out buttons).
 */
export async function can(permission, namespace = "") {
  const key = `${permission}@${namespace}`;
  if (!allowed.has(key)) {
    allowed.set(
      key,
      post("/v1/auth:checkPermission", { permission, namespace }).then(
        (r) => Boolean(r.allowed),
        () => false,
      ),
    );
  }
  return allowed.get(key);
}

export function forgetPermissions() {
  allowed.clear();
}
