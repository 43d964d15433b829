// What every view shares: calls to the JSON API, the models list, the admin token, DOM helpers.

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
  toString() {
    return `${this.status} ${this.code}: ${this.message}`;
  }
}

// A JSON request; a non-2xx answer throws ApiError with the server's own code and message.
export async function api(path, options = {}) {
  let response;
  try {
    response = await fetch(path, options);
  } catch (err) {
    throw new ApiError(0, "network", `the server did not answer (${err.message})`);
  }
  const text = await response.text();
  let body = null;
  try {
    body = text ? JSON.parse(text) : null;
  } catch {
    body = null;
  }
  if (!response.ok) {
    const error = body && body.error;
    if (error && typeof error === "object") throw new ApiError(response.status, error.code, error.message);
    if (typeof error === "string") throw new ApiError(response.status, "error", error);
    throw new ApiError(response.status, "http_error", text.slice(0, 200) || response.statusText);
  }
  return { body, headers: response.headers, status: response.status };
}

// One image, sent as its raw bytes: the simplest body the predict route takes.
export function predict(model, version, file, topK) {
  const query = new URLSearchParams();
  if (version) query.set("version", version);
  if (topK) query.set("top_k", String(topK));
  return api(`/v1/models/${encodeURIComponent(model)}/predict?${query}`, {
    method: "POST",
    headers: { "content-type": file.type || "application/octet-stream" },
    body: file,
  });
}

// -- models ----------------------------------------------------------------------------------

let modelsPromise = null;

// [{name, default_version, versions: [int], default}], fetched once per page (or on refresh).
export function models(refresh = false) {
  if (refresh || !modelsPromise) {
    modelsPromise = api("/v1/models").then((r) => r.body.models);
    modelsPromise.catch(() => (modelsPromise = null));
  }
  return modelsPromise;
}

// Fill a model <select>, and keep a version <select> (or several) in step with it.
export async function bindModelPicker(modelSelect, versionSelects, { withDefault = true } = {}) {
  const list = await models();
  const previous = modelSelect.value;
  modelSelect.replaceChildren(
    ...list.map((m) => option(m.name, m.default ? `${m.name} (default)` : m.name)),
  );
  if (list.some((m) => m.name === previous)) modelSelect.value = previous;
  else {
    const chosen = list.find((m) => m.default) || list[0];
    if (chosen) modelSelect.value = chosen.name;
  }
  const fill = () => {
    const model = list.find((m) => m.name === modelSelect.value);
    versionSelects.forEach((select, i) => {
      const keep = select.value;
      const versions = model ? [...model.versions].sort((a, b) => b - a) : [];
      const options = versions.map((v) =>
        option(String(v), v === model.default_version ? `${v} (default)` : String(v)),
      );
      if (withDefault && i === 0 && versionSelects.length === 1) {
        options.unshift(option("", "default"));
      }
      select.replaceChildren(...options);
      if ([...select.options].some((o) => o.value === keep)) select.value = keep;
      else if (versionSelects.length > 1 && options[i]) select.value = options[i].value;
    });
  };
  modelSelect.onchange = fill;
  fill();
  return list;
}

// -- the admin token: asked for when needed, kept in this module's memory only ---------------

let adminToken = null;

export async function withAdminToken(action) {
  for (let attempt = 0; attempt < 2; attempt++) {
    if (adminToken === null) adminToken = await askToken();
    if (adminToken === null) return null;
    try {
      return await action({ authorization: `Bearer ${adminToken}` });
    } catch (err) {
      if (err instanceof ApiError && err.status === 401) {
        adminToken = null; // wrong token: ask once more
        if (attempt === 0) continue;
      }
      throw err;
    }
  }
  return null;
}

function askToken() {
  const dialog = document.getElementById("token-dialog");
  const input = document.getElementById("token-input");
  input.value = "";
  return new Promise((resolve) => {
    dialog.addEventListener(
      "close",
      () => {
        const value = dialog.returnValue === "ok" ? input.value : "";
        input.value = "";
        resolve(value ? value : null);
      },
      { once: true },
    );
    dialog.returnValue = "";
    dialog.showModal();
    input.focus();
  });
}

// -- DOM helpers -----------------------------------------------------------------------------

// el("p", {class: "x", text: "hi"}, child...) -> element
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "text") node.textContent = value;
    else if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined && child !== false) {
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
  }
  return node;
}

export function option(value, label) {
  const node = document.createElement("option");
  node.value = value;
  node.textContent = label;
  return node;
}

export function ms(value) {
  return value === undefined || value === null ? "–" : `${Number(value).toFixed(value < 10 ? 2 : 1)} ms`;
}

export function percent(value) {
  return `${(100 * value).toFixed(1)}%`;
}

export function bytes(n) {
  if (n === null || n === undefined) return "–";
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / 1024 / 1024).toFixed(2)} MiB`;
}

// Top-k as labelled bars: a list whose items a screen reader reads as "label, 97.1%".
export function bars(predictions) {
  return el(
    "ul",
    { class: "bars", "aria-label": "Top classes" },
    predictions.map((p) => {
      const fill = el("span", { class: "fill" });
      fill.style.width = `${Math.max(0, Math.min(100, 100 * p.confidence))}%`;
      return el(
        "li",
        {},
        el("span", { class: "name", title: p.label, text: p.label }),
        el("span", { class: "track", "aria-hidden": "true" }, fill),
        el("span", { class: "pct", text: percent(p.confidence) }),
      );
    }),
  );
}

// Whether the answer came from the result cache: a `cached` field or an X-Cache header.
export function cacheState(body, headers) {
  if (typeof body.cached === "boolean") return body.cached ? "hit" : "miss";
  if (body.cache && typeof body.cache === "object" && "hit" in body.cache) return body.cache.hit ? "hit" : "miss";
  const header = headers && (headers.get("x-cache") || headers.get("x-tinyserve-cache"));
  return header ? header.toLowerCase() : null;
}

export function latencyLine(latency) {
  if (!latency) return "";
  return ["decode", "queue", "inference", "total"]
    .filter((k) => k in latency)
    .map((k) => `${k} ${ms(latency[k])}`)
    .join(" · ");
}
