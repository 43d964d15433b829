// The Models view: every model and version with its contract, lineage and reports.

import { api, ApiError, bytes, el, models, percent, withAdminToken } from "./api.js";

let adminOn = false;

export function initModels(config) {
  adminOn = Boolean(config.admin);
  document.getElementById("models-admin-hint").hidden = !adminOn;
}

export async function showModels() {
  const box = document.getElementById("models-list");
  let list;
  let failed = [];
  try {
    const { body } = await api("/v1/models");
    list = body.models;
    failed = body.failed || [];
  } catch (err) {
    box.replaceChildren(el("p", { class: "error", text: String(err) }));
    return;
  }
  const cards = await Promise.all(list.map(modelCard));
  const broken = failed.map((f) =>
    el("article", { class: "card failed" }, el("h3", { text: f.name }), el("p", { class: "error", text: f.error })),
  );
  box.replaceChildren(...cards, ...broken);
  if (!cards.length && !broken.length) box.append(el("p", { text: "The repository has no models." }));
}

async function modelCard(summary) {
  const { body: info } = await api(`/v1/models/${encodeURIComponent(summary.name)}`);
  const versions = await Promise.all(
    info.versions.map(async (v) => {
      let files = null;
      try {
        files = (await api(`/ui/models/${encodeURIComponent(info.name)}/${v.version}`)).body;
      } catch {
        files = null;
      }
      return versionCard(info, v, files);
    }),
  );
  const title = `${info.name}` + (summary.default ? " (default model)" : "");
  return el(
    "article",
    { class: "card model", "data-model": info.name },
    el("h3", { text: title }),
    el("p", { class: "meta", text: `default version ${info.default_version} · ${info.versions.length} version(s) served` }),
    adminOn ? adminButtons(info.name) : null,
    el("div", { class: "versions" }, versions),
  );
}

function versionCard(info, v, files) {
  const source = v.source || {};
  const optimization = source.optimization || {};
  const gate = optimization.gate || null;
  const input = v.input || {};
  const rows = [
    ["input", `${input.dtype} ${JSON.stringify(input.shape)} ${input.color}, resize ${input.resize}`],
    ["classes", String(v.num_classes)],
    ["size", bytes(files ? files.bytes : null)],
    ["architecture", source.architecture],
    ["dataset", source.dataset],
    ["parent", source.parent_version !== undefined ? `version ${source.parent_version}` : "none (trained)"],
    ["method", optimization.method || (source.architecture ? "export from training" : null)],
    ["validation accuracy", source.val_accuracy !== undefined ? percent(source.val_accuracy) : null],
    ["gate", gate ? gateText(gate) : null],
    ["batching", v.batching ? `up to ${v.batching.max_batch_size}, wait ${v.batching.max_delay_ms} ms` : null],
    ["loaded", v.loaded_at ? new Date(v.loaded_at * 1000).toLocaleString() : null],
  ].filter(([, value]) => value !== undefined && value !== null);
  const reports = files ? Object.entries(files.reports) : [];
  return el(
    "section",
    { class: "card version", "data-version": String(v.version), "aria-label": `${info.name} version ${v.version}` },
    el("h4", { text: `Version ${v.version}` + (v.version === info.default_version ? " (default)" : "") }),
    el("dl", { class: "kv" }, rows.flatMap(([k, value]) => [el("dt", { text: k }), el("dd", { text: value })])),
    el("details", {}, el("summary", { text: `Labels (${v.labels.length})` }), el("p", { class: "labels", text: v.labels.join(", ") })),
    reports.map(([name, content]) =>
      el(
        "details",
        {},
        el("summary", { text: name.endsWith(".md") ? `Report: ${name}` : `Report: ${name}` }),
        el("pre", { text: typeof content === "string" ? content : JSON.stringify(content, null, 2) }),
      ),
    ),
  );
}

function gateText(gate) {
  const verdict = gate.passed ? "passed" : "failed";
  const accuracy = gate.accuracy !== undefined ? `, accuracy ${percent(gate.accuracy)}` : "";
  const parent = gate.parent_accuracy !== undefined ? ` (parent ${percent(gate.parent_accuracy)})` : "";
  const agree = gate.agreement !== undefined ? `, agreement ${percent(gate.agreement)}` : "";
  return `${verdict}${accuracy}${parent}${agree} on ${gate.samples} ${gate.dataset} images`;
}

// Reload (REST admin), load and unload (V2 repository API): each asks for the admin token.
function adminButtons(name) {
  const status = el("p", { class: "meta", role: "status" });
  const act = (label, path) =>
    el("button", {
      type: "button",
      class: "admin",
      text: label,
      onclick: async () => {
        status.textContent = `${label}…`;
        try {
          const done = await withAdminToken((headers) => api(path, { method: "POST", headers }));
          if (done === null) {
            status.textContent = `${label}: cancelled.`;
            return;
          }
          status.textContent = `${label}: done.`;
          await models(true);
          setTimeout(showModels, 300);
        } catch (err) {
          status.textContent = `${label} failed: ${err instanceof ApiError ? err.toString() : err}`;
        }
      },
    });
  const m = encodeURIComponent(name);
  return el(
    "div",
    { class: "buttons" },
    act("Reload", `/admin/models/${m}/reload`),
    act("Load", `/v2/repository/models/${m}/load`),
    act("Unload", `/v2/repository/models/${m}/unload`),
    status,
  );
}
