// The live dashboard: /stats once a second, the last 10 minutes kept here, drawn as SVG.

import { api, el, ms } from "./api.js";

const PERIOD_MS = 1000;
const KEEP_S = 600;
const SVG = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);

// One point per poll: {t, total, rps, p50, p95, p99, queue}
const history = [];
let previous = null;
let timer = null;
let visible = () => false;

export function startDashboard(isVisible) {
  visible = isVisible;
  if (timer === null) {
    poll();
    timer = setInterval(poll, PERIOD_MS);
  }
}

async function poll() {
  if (document.visibilityState === "hidden") return;
  let stats;
  try {
    stats = (await api("/stats")).body;
  } catch {
    return; // the status line of the page says when the server is gone
  }
  const now = Date.now() / 1000;
  let rps = 0;
  if (previous && stats.uptime_seconds > previous.uptime_seconds) {
    const served = stats.total_requests - previous.total_requests;
    rps = Math.max(0, served) / (stats.uptime_seconds - previous.uptime_seconds);
  }
  previous = stats;
  const queue = Object.values(stats.queue_depth || {}).reduce((a, b) => a + b, 0);
  history.push({
    t: now,
    total: stats.total_requests,
    rps,
    p50: stats.p50_latency_ms,
    p95: stats.p95_latency_ms,
    p99: stats.p99_latency_ms,
    queue,
  });
  while (history.length && history[0].t < now - KEEP_S) history.shift();
  if (visible()) draw(stats);
}

export function redraw() {
  if (previous) draw(previous);
}

function draw(stats) {
  const last = history[history.length - 1];
  $("dash-total").textContent = stats.total_requests.toLocaleString("en");
  $("dash-rps").textContent = last ? last.rps.toFixed(1) : "–";
  $("dash-p50").textContent = ms(stats.p50_latency_ms);
  $("dash-p95").textContent = ms(stats.p95_latency_ms);
  $("dash-p99").textContent = ms(stats.p99_latency_ms);
  $("dash-queue").textContent = last ? String(last.queue) : "–";
  $("dash-failed").textContent = stats.failed_requests.toLocaleString("en");
  $("dash-uptime").textContent = duration(stats.uptime_seconds);
  $("dash-window").textContent = String(stats.latency_window ?? 0);
  lineChart($("chart-rps"), [history.map((p) => [p.t, p.rps])], ["requests/s"], "chart-rps-title");
  lineChart(
    $("chart-latency"),
    ["p50", "p95", "p99"].map((k) => history.map((p) => [p.t, p[k]])),
    ["p50", "p95", "p99"],
    "chart-latency-title",
  );
  lineChart($("chart-queue"), [history.map((p) => [p.t, p.queue])], ["queued"], "chart-queue-title");
  barChart($("chart-batch"), Object.entries(stats.batch_sizes || {}), "chart-batch-title");
  table($("dash-status"), Object.entries(stats.requests_by_status || {}));
  table($("dash-errors"), Object.entries(stats.errors_by_code || {}));
  const loaded = (stats.models_loaded || []).map((m) => el("li", { text: `${m.model} version ${m.version}` }));
  $("dash-models").replaceChildren(...(loaded.length ? loaded : [el("li", { text: "none" })]));
}

function duration(seconds) {
  const s = Math.floor(seconds);
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  return h ? `${h} h ${m} min` : m ? `${m} min ${s % 60} s` : `${s} s`;
}

function table(node, rows) {
  const body = node.tBodies[0];
  const lines = rows.map(([k, v]) => el("tr", {}, el("td", { text: k }), el("td", { text: String(v) })));
  body.replaceChildren(...(lines.length ? lines : [el("tr", {}, el("td", { colspan: 2, text: "none" }))]));
}

// -- hand-drawn SVG --------------------------------------------------------------------------

function svg(tag, attrs = {}) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  return node;
}

let W = 600; // the chart's width in CSS pixels, so text is never stretched
const H = 160;
const PAD = { left: 44, right: 8, top: 8, bottom: 20 };

function frame(labelledBy) {
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-labelledby": labelledBy });
  return root;
}

function niceMax(value) {
  if (!(value > 0)) return 1;
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 2.5, 5, 10]) if (value <= step * power) return step * power;
  return 10 * power;
}

function lineChart(node, series, names, labelledBy) {
  W = Math.max(240, Math.round(node.clientWidth || 600));
  const root = frame(labelledBy);
  const now = Date.now() / 1000;
  const x0 = now - KEEP_S;
  const top = niceMax(Math.max(0, ...series.flat().map(([, y]) => y)));
  const x = (t) => PAD.left + ((t - x0) / KEEP_S) * (W - PAD.left - PAD.right);
  const y = (v) => H - PAD.bottom - (v / top) * (H - PAD.top - PAD.bottom);
  root.append(svg("line", { class: "axis", x1: PAD.left, x2: W - PAD.right, y1: y(0), y2: y(0) }));
  root.append(svg("line", { class: "axis", x1: PAD.left, x2: W - PAD.right, y1: y(top), y2: y(top) }));
  for (const [value, text] of [[0, "0"], [top, String(+top.toPrecision(3))]]) {
    const label = svg("text", { x: PAD.left - 4, y: y(value) + 4, "text-anchor": "end" });
    label.textContent = text;
    root.append(label);
  }
  for (const [seconds, text] of [[KEEP_S, "−10 min"], [300, "−5 min"], [0, "now"]]) {
    const label = svg("text", { x: x(now - seconds), y: H - 4, "text-anchor": seconds === KEEP_S ? "start" : seconds ? "middle" : "end" });
    label.textContent = text;
    root.append(label);
  }
  series.forEach((points, i) => {
    if (points.length < 2) return;
    const d = points.map(([t, v], j) => `${j ? "L" : "M"}${x(t).toFixed(1)},${y(v).toFixed(1)}`).join("");
    root.append(svg("path", { class: `s${i}`, d }));
  });
  const latest = series.map((points) => (points.length ? points[points.length - 1][1] : 0));
  const legend = el(
    "div",
    { class: "legend" },
    names.map((name, i) => el("span", { class: `k${i}`, text: `■ ${name} ${+latest[i].toFixed(2)}` })),
  );
  node.replaceChildren(root, legend);
}

function barChart(node, entries, labelledBy) {
  W = Math.max(240, Math.round(node.clientWidth || 600));
  const root = frame(labelledBy);
  const top = niceMax(Math.max(0, ...entries.map(([, v]) => v)));
  const width = (W - PAD.left - PAD.right) / Math.max(1, entries.length);
  entries.forEach(([name, value], i) => {
    const h = (value / top) * (H - PAD.top - PAD.bottom);
    const rect = svg("rect", { x: PAD.left + i * width + 2, y: H - PAD.bottom - h, width: Math.max(1, width - 4), height: h });
    const tip = svg("title");
    tip.textContent = `batch size ${name}: ${value} batches`;
    rect.append(tip);
    root.append(rect);
    const label = svg("text", { x: PAD.left + (i + 0.5) * width, y: H - 4, "text-anchor": "middle" });
    label.textContent = name.includes("-") ? name.split("-")[1] : name; // a bucket by its top
    root.append(label);
  });
  const label = svg("text", { x: PAD.left - 4, y: PAD.top + 8, "text-anchor": "end" });
  label.textContent = String(top);
  root.append(label);
  const total = entries.reduce((a, [, v]) => a + v, 0);
  node.replaceChildren(root, el("div", { class: "legend", text: `${total} batches run` }));
}
