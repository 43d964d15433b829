// The Classify and Compare views: images in (pick, drop, paste, folder, camera), answers out.

import { ApiError, bars, bindModelPicker, cacheState, el, latencyLine, ms, percent, predict } from "./api.js";

const PARALLEL = 4; // requests in flight at once for a batch of files
const $ = (id) => document.getElementById(id);

// -- getting images: files, dropped folders, the clipboard, the camera -----------------------

// Every file goes to the server, which says what is wrong with one that is not an image;
// only the hidden files a folder drop brings along (.DS_Store...) are left out.
function worthSending(file) {
  const name = file.name.split("/").pop();
  return !name.startsWith(".");
}

// Every file of a drop, folders walked (Chromium, Firefox and Safari all offer entries).
async function droppedFiles(dataTransfer) {
  const entries = [...dataTransfer.items]
    .map((item) => (item.webkitGetAsEntry ? item.webkitGetAsEntry() : null))
    .filter(Boolean);
  if (!entries.length) return [...dataTransfer.files];
  const files = [];
  const walk = async (entry, prefix) => {
    if (entry.isFile) {
      const file = await new Promise((resolve, reject) => entry.file(resolve, reject));
      files.push(prefix ? new File([file], prefix + file.name, { type: file.type }) : file);
    } else if (entry.isDirectory) {
      const reader = entry.createReader();
      for (;;) {
        const batch = await new Promise((resolve, reject) => reader.readEntries(resolve, reject));
        if (!batch.length) break;
        for (const child of batch) await walk(child, `${prefix}${entry.name}/`);
      }
    }
  };
  for (const entry of entries) await walk(entry, "");
  return files;
}

function acceptDrops(zone, onFiles) {
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", async (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    onFiles(await droppedFiles(event.dataTransfer));
  });
}

// -- Classify --------------------------------------------------------------------------------

let current = []; // the files shown, so "Classify" can run them again (another version...)
let shown = []; // object URLs of the thumbnails, released when the results are replaced

export async function initClassify() {
  const form = $("classify-form");
  await bindModelPicker($("classify-model"), [$("classify-version")]);
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const picked = [...$("classify-files").files];
    run(picked.length ? picked : current);
  });
  $("classify-files").addEventListener("change", (event) => run([...event.target.files]));
  $("classify-clear").addEventListener("click", () => {
    $("classify-files").value = "";
    run([]);
  });
  acceptDrops($("drop-zone"), (files) => run(files));
  document.addEventListener("paste", (event) => {
    const view = location.hash.slice(1) || "classify";
    const files = [...(event.clipboardData?.files || [])];
    if (!files.length) return;
    event.preventDefault();
    if (view === "compare") compareFile(files[0]);
    else if (view === "classify") run(files);
  });
  initCamera();
}

async function run(files) {
  files = files.filter(worthSending);
  current = files;
  shown.forEach((url) => URL.revokeObjectURL(url));
  shown = [];
  const list = $("classify-results");
  const summary = $("classify-summary");
  list.replaceChildren();
  if (!files.length) {
    summary.textContent = "";
    return;
  }
  const model = $("classify-model").value;
  const version = $("classify-version").value;
  const topK = Number($("classify-topk").value) || 5;
  const submit = $("classify-submit");
  submit.disabled = true;
  summary.textContent = `Classifying ${files.length} image${files.length > 1 ? "s" : ""}…`;
  const items = files.map((file) => {
    const url = URL.createObjectURL(file);
    shown.push(url);
    const body = el("div", { class: "body" }, el("p", { class: "meta", text: "waiting…" }));
    const item = el(
      "li",
      { class: "result", "aria-busy": "true" },
      thumbnail(url, file.name),
      el("div", {}, el("h3", { class: "filename", text: file.name }), body),
    );
    list.append(item);
    return { file, item, body };
  });
  let failed = 0;
  let next = 0;
  const started = performance.now();
  const worker = async () => {
    while (next < items.length) {
      const entry = items[next++];
      try {
        const { body, headers } = await predict(model, version, entry.file, topK);
        showAnswer(entry, body, headers);
      } catch (err) {
        failed++;
        showError(entry, err);
      }
      entry.item.removeAttribute("aria-busy");
    }
  };
  await Promise.all(Array.from({ length: Math.min(PARALLEL, items.length) }, worker));
  submit.disabled = false;
  const seconds = ((performance.now() - started) / 1000).toFixed(2);
  const ok = items.length - failed;
  summary.textContent =
    `${ok} of ${items.length} classified` + (failed ? `, ${failed} failed` : "") + ` in ${seconds} s.`;
}

// The file as the browser decodes it (EXIF orientation applied, as the server does); a file
// the browser cannot show gets a plain placeholder instead of a broken image.
function thumbnail(url, name) {
  const img = el("img", { class: "thumb", src: url, alt: `Preview of ${name}` });
  img.addEventListener("error", () =>
    img.replaceWith(el("div", { class: "thumb none", role: "img", "aria-label": `No preview of ${name}`, text: "no preview" })),
  );
  return img;
}

function showAnswer(entry, body, headers) {
  const cache = cacheState(body, headers);
  entry.item.classList.add("done");
  entry.body.replaceChildren(
    el(
      "p",
      { class: "answer" },
      el("strong", { class: "label", text: body.label }),
      ` ${percent(body.confidence)}`,
    ),
    bars(body.predictions),
    el("p", {
      class: "meta answered-by",
      text: `${body.model} version ${body.version}` + (cache ? ` · cache ${cache}` : ""),
    }),
    el("p", { class: "meta latency", text: latencyLine(body.latency_ms) }),
  );
}

function showError(entry, err) {
  entry.item.classList.add("failed");
  const text = err instanceof ApiError ? err.toString() : String(err);
  entry.body.replaceChildren(el("p", { class: "error", role: "alert", text }));
}

// -- the camera, where the browser has one and allows it -------------------------------------

function initCamera() {
  const open = $("camera-open");
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) return;
  open.hidden = false;
  let stream = null;
  const video = $("camera-video");
  const close = () => {
    if (stream) stream.getTracks().forEach((t) => t.stop());
    stream = null;
    $("camera").hidden = true;
    open.focus();
  };
  open.addEventListener("click", async () => {
    try {
      stream = await navigator.mediaDevices.getUserMedia({ video: { facingMode: "environment" } });
    } catch (err) {
      $("classify-summary").textContent = `The camera is not available: ${err.message}`;
      return;
    }
    video.srcObject = stream;
    $("camera").hidden = false;
    $("camera-snap").focus();
  });
  $("camera-close").addEventListener("click", close);
  $("camera-snap").addEventListener("click", () => {
    const canvas = document.createElement("canvas");
    canvas.width = video.videoWidth;
    canvas.height = video.videoHeight;
    canvas.getContext("2d").drawImage(video, 0, 0);
    canvas.toBlob((blob) => {
      const stamp = new Date().toISOString().slice(11, 19).replaceAll(":", "");
      run([new File([blob], `camera-${stamp}.png`, { type: "image/png" })]);
    }, "image/png");
  });
}

// -- Compare ---------------------------------------------------------------------------------

export async function initCompare() {
  const list = await bindModelPicker($("compare-model"), [$("compare-a"), $("compare-b")], {
    withDefault: false,
  });
  const form = $("compare-form");
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const file = $("compare-file").files[0];
    if (file) compareFile(file);
    else $("compare-summary").textContent = "Choose an image first.";
  });
  $("compare-file").addEventListener("change", (event) => {
    if (event.target.files[0]) compareFile(event.target.files[0]);
  });
  acceptDrops($("compare-drop"), (files) => files[0] && compareFile(files[0]));
  if (!list.some((m) => m.versions.length > 1)) {
    $("compare-summary").textContent =
      "No model serves two versions: tinyserve quantize adds one, and versions = \"all\" in the " +
      "model's config.toml serves every version. A version can still be compared with itself.";
  }
}

let compareUrl = null;

async function compareFile(file) {
  const model = $("compare-model").value;
  const versions = [$("compare-a").value, $("compare-b").value];
  const out = $("compare-results");
  const summary = $("compare-summary");
  if (compareUrl) URL.revokeObjectURL(compareUrl);
  compareUrl = URL.createObjectURL(file);
  summary.textContent = `Sending ${file.name} to versions ${versions.join(" and ")}…`;
  const answers = await Promise.all(
    versions.map((v) => predict(model, v, file, 5).then((r) => r, (err) => err)),
  );
  const columns = answers.map((answer, i) => {
    const head = el("h3", { text: `Version ${versions[i]}` });
    if (answer instanceof Error) {
      const text = answer instanceof ApiError ? answer.toString() : String(answer);
      return el("div", { class: "card side failed" }, head, el("p", { class: "error", role: "alert", text }));
    }
    const body = answer.body;
    return el(
      "div",
      { class: "card side", "data-version": String(body.version) },
      head,
      el("p", { class: "answer" }, el("strong", { class: "label", text: body.label }), ` ${percent(body.confidence)}`),
      bars(body.predictions),
      el("p", { class: "meta latency", text: latencyLine(body.latency_ms) }),
    );
  });
  const thumb = el("img", { class: "thumb", src: compareUrl, alt: `Preview of ${file.name}` });
  out.replaceChildren(el("div", { class: "card agreement" }, thumb, " ", agreement(answers)), ...columns);
  summary.textContent = `${file.name}: compared.`;
}

// Whether both versions name the same class, how many of their top-5 they share, and how far
// apart their confidences and latencies are.
function agreement(answers) {
  if (answers.some((a) => a instanceof Error)) {
    return el("p", { class: "error", id: "compare-agreement", text: "One of the versions failed: no agreement to show." });
  }
  const [a, b] = answers.map((x) => x.body);
  const same = a.class_id === b.class_id;
  const topA = new Set(a.predictions.map((p) => p.class_id));
  const shared = b.predictions.filter((p) => topA.has(p.class_id)).length;
  const confB = b.predictions.find((p) => p.class_id === a.class_id);
  const delta = confB ? Math.abs(a.confidence - confB.confidence) : null;
  const speed = a.latency_ms && b.latency_ms ? `; total ${ms(a.latency_ms.total)} vs ${ms(b.latency_ms.total)}` : "";
  return el(
    "p",
    { id: "compare-agreement", class: same ? "ok" : "error" },
    el("strong", { text: same ? `Agree: both say ${a.label}.` : `Disagree: ${a.label} vs ${b.label}.` }),
    ` Top-${a.predictions.length} classes shared: ${shared} of ${a.predictions.length}` +
      (delta !== null ? `; confidence in ${a.label} differs by ${(100 * delta).toFixed(2)} points` : "") +
      speed + ".",
  );
}
