// The page's entry point: views by URL fragment, the server status line, reports and streams.

import { api, bytes, el } from "./api.js";
import { initClassify, initCompare } from "./classify.js";
import { redraw, startDashboard } from "./dashboard.js";
import { initModels, showModels } from "./models.js";

const $ = (id) => document.getElementById(id);
const VIEWS = ["classify", "compare", "models", "dashboard", "reports", "streams"];
let config = { admin: false, reports: false };

function currentView() {
  const name = location.hash.slice(1);
  return VIEWS.includes(name) && !($(`view-${name}`).dataset.off === "true") ? name : "classify";
}

function show() {
  const view = currentView();
  for (const name of VIEWS) $(`view-${name}`).hidden = name !== view;
  for (const link of document.querySelectorAll("nav a[data-view]")) {
    if (link.dataset.view === view) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  document.title = `tinyserve · ${view[0].toUpperCase()}${view.slice(1)}`;
  if (view === "models") showModels();
  if (view === "dashboard") redraw();
  if (view === "reports") showReports();
}

async function health() {
  const line = $("server-status");
  try {
    const { body } = await api("/health");
    line.classList.toggle("bad", body.status !== "ok");
    const failed = body.failed && body.failed.length ? `; failed: ${body.failed.join(", ")}` : "";
    line.textContent = `tinyserve ${body.version} · ${body.status} · ${body.models.length} model(s)${failed}`;
  } catch (err) {
    line.classList.add("bad");
    line.textContent = `Server unreachable (${err.message})`;
  }
}

// -- bench reports ---------------------------------------------------------------------------

async function showReports() {
  const hint = $("reports-hint");
  const list = $("reports-list");
  if (!config.reports) {
    hint.textContent =
      "No reports folder is configured: start the server with --reports-dir DIR (or TINYSERVE_REPORTS_DIR) " +
      "and write reports there with `tinyserve bench http URL --image IMG --report DIR/NAME.html`.";
    list.replaceChildren();
    return;
  }
  const { body } = await api("/ui/reports");
  hint.textContent = `${body.reports.length} report(s) in ${body.folder}, newest first.`;
  list.replaceChildren(
    ...body.reports.map((r) => {
      const href = `/ui/reports/${r.name.split("/").map(encodeURIComponent).join("/")}`;
      const open = el("a", {
        href,
        text: r.name,
        onclick: (event) => {
          event.preventDefault();
          const frame = $("report-frame");
          frame.src = href;
          frame.title = `Benchmark report ${r.name}`;
          frame.hidden = false;
          frame.focus();
        },
      });
      const when = new Date(r.modified * 1000).toLocaleString();
      return el(
        "li",
        {},
        open,
        ` · ${when} · ${bytes(r.bytes)} · `,
        el("a", { href, target: "_blank", rel: "noopener", text: "open in a new tab" }),
      );
    }),
  );
}

// -- streams: shown only once the server has them (GET /v1/streams answers 200) -------------

async function findStreams() {
  let body;
  try {
    ({ body } = await api("/v1/streams"));
  } catch {
    $("view-streams").dataset.off = "true";
    return;
  }
  const streams = Array.isArray(body) ? body : body.streams || [];
  $("nav-streams").hidden = false;
  $("view-streams").dataset.off = "false";
  let events = null;
  $("streams-list").replaceChildren(
    ...streams.map((s) => {
      const id = String(s.id ?? s.name);
      const base = `/v1/streams/${encodeURIComponent(id)}`;
      return el(
        "li",
        {},
        el("button", {
          type: "button",
          text: `Open ${s.name ?? id}`,
          onclick: () => {
            if (events) events.close();
            $("stream-view").hidden = false;
            $("stream-name").textContent = s.name ?? id;
            $("stream-image").src = s.view_url || `${base}/view`;
            const log = $("stream-events");
            log.replaceChildren();
            events = new EventSource(s.events_url || `${base}/events`);
            events.onmessage = (event) => {
              log.prepend(el("li", { text: event.data }));
              while (log.children.length > 200) log.lastChild.remove();
            };
          },
        }),
        s.source ? ` ${s.source}` : "",
      );
    }),
  );
  if (location.hash === "#streams") show();
}

async function main() {
  try {
    config = (await api("/ui/config")).body;
  } catch {
    // an older server: the page still classifies
  }
  initModels(config);
  window.addEventListener("hashchange", () => {
    show();
    $("main").focus();
  });
  show();
  health();
  setInterval(health, 5000);
  startDashboard(() => currentView() === "dashboard");
  await Promise.allSettled([initClassify(), initCompare(), findStreams()]);
  document.body.dataset.ready = "true";
}

main();
