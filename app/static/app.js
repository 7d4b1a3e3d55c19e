// uplvp web page: plain JavaScript against the service's own JSON API (no build step).
"use strict";

const $ = (id) => document.getElementById(id);
const COLORS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45",
                "#fabed4", "#469990", "#dcbeff", "#9a6324", "#800000", "#aaffc3", "#808000", "#000075"];
const state = { jobId: null, timer: null, image: null, result: null, hidden: new Set() };

// ------------------------------------------------------------------ API

function headers() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function api(method, path, body) {
  const resp = await fetch(path, { method, body, headers: headers() });
  const type = resp.headers.get("content-type") || "";
  const data = type.includes("json") ? await resp.json() : await resp.blob();
  if (!resp.ok) {
    const err = (data && data.error) || { code: "http_error", message: resp.statusText };
    const details = Array.isArray(err.details)
      ? err.details.slice(0, 8).map((d) => "\n  • " + (d.problem || d.field || JSON.stringify(d))).join("") : "";
    throw new Error(`${err.message}${details}`);
  }
  return data;
}

// ------------------------------------------------------------------ readiness, models

async function refreshReady() {
  try {
    const r = await fetch("/readyz");
    const body = await r.json();
    $("ready").textContent = r.ok ? `ready · ${body.workers.length} worker(s)` : "not ready: no worker";
    $("ready").className = "pill " + (r.ok ? "ready" : "not_ready");
  } catch (e) {
    $("ready").textContent = "service unreachable";
    $("ready").className = "pill not_ready";
  }
}

function pct(v) { return v === null || v === undefined ? "–" : (100 * v).toFixed(1) + " %"; }
// class names and file names come from the user's upload: never HTML
function esc(v) { return String(v).replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c])); }

async function refreshModels() {
  let models = [];
  try { models = await api("GET", "/models"); } catch (e) { $("model-list").textContent = e.message; return; }
  const base = $("base"), seg = $("seg-model");
  const keepBase = base.value, keepSeg = seg.value;
  base.innerHTML = '<option value="none">ImageNet backbone</option>';
  seg.innerHTML = "";
  const list = $("model-list");
  list.innerHTML = models.length ? "" : "<p>No models yet: train one above.</p>";
  for (const m of models) {
    base.add(new Option(`${m.name} (production/latest)`, m.name));
    seg.add(new Option(m.name, m.name));
    const b = document.createElement("button");
    b.className = "small"; b.type = "button"; b.textContent = `${m.name} · v${m.versions.join(", v")}`;
    b.dataset.model = m.name;
    b.onclick = () => showModel(m.name);
    list.append(b, " ");
  }
  if (keepBase) base.value = keepBase;
  if (keepSeg && models.some((m) => m.name === keepSeg)) seg.value = keepSeg;
  await refreshVersions();
}

async function refreshVersions() {
  const name = $("seg-model").value, sel = $("seg-version");
  sel.innerHTML = '<option value="">production / latest</option>';
  if (!name) return;
  const m = await api("GET", `/models/${encodeURIComponent(name)}`);
  for (const v of m.items) sel.add(new Option(`v${v.version}${v.aliases.length ? " (" + v.aliases.join(", ") + ")" : ""}`, v.version));
}

async function showModel(name) {
  const m = await api("GET", `/models/${encodeURIComponent(name)}`);
  const rows = m.items.map((v) => {
    const s = (v.metrics && v.metrics.segm) || {};
    const pre = v.metrics && v.metrics.pretrain;
    return `<tr><td>v${v.version}</td><td>${v.kind}</td><td>${pre ? "loss " + pre.loss_last.toFixed(3) : pct(s.AP)}</td>
      <td>${pre ? "–" : pct(s.AP50)}</td><td>${v.aliases.join(", ")}</td><td>${v.created_at.slice(0, 19)}</td>
      <td><button class="small promote" type="button" data-version="${v.version}">promote</button></td>
      <td><button class="small download" type="button" data-version="${v.version}" data-format="pt">.pt</button>
      <button class="small download" type="button" data-version="${v.version}" data-format="onnx"
        title="the K-Net graph for ONNX Runtime alone (client/onnx_model.py); exported on the first download">.onnx</button></td></tr>`;
  }).join("");
  const latest = m.items[m.items.length - 1];
  const perCat = (latest && latest.metrics && latest.metrics.per_category) || {};
  const catRows = Object.entries(perCat).map(([c, ap]) => `<tr><td>${c}</td><td>${pct(ap)}</td></tr>`).join("");
  const pics = (latest ? latest.reports : []).map((r) => `<figure><img alt="${r} of v${latest.version}"
      class="report" data-src="/models/${encodeURIComponent(name)}/versions/${latest.version}/reports/${r}.png">
      <figcaption>${r === "curves" ? "learning curve" : "validation images: ground truth | predictions"} (v${latest.version})</figcaption></figure>`).join("");
  $("model-detail").innerHTML = `<h3>${name}</h3>
    <table id="versions"><tr><th>version</th><th>kind</th><th>mask AP</th><th>AP50</th><th>aliases</th><th>created</th><th></th><th>download</th></tr>${rows}</table>
    <p id="download-status" class="muted"></p>
    ${catRows ? `<h4>Per-category AP of v${latest.version}</h4><table id="per-category"><tr><th>category</th><th>AP</th></tr>${catRows}</table>` : ""}
    <div id="reports">${pics}</div>`;
  await loadReports();
  for (const b of document.querySelectorAll("button.download")) {
    b.onclick = () => downloadVersion(name, b.dataset.version, b.dataset.format);
  }
  for (const b of document.querySelectorAll("button.promote")) {
    b.onclick = async () => {
      await api("POST", `/models/${encodeURIComponent(name)}/versions/${b.dataset.version}/promote`);
      await showModel(name);
      await refreshVersions();
    };
  }
}

// A version's checkpoint or ONNX export. The download needs the API key, which a plain link cannot
// send: fetch it as a blob. The first ONNX download of a version exports it (seconds), so say so.
async function downloadVersion(name, version, format) {
  const status = $("download-status");
  status.textContent = format === "onnx" ? `exporting v${version} to ONNX (the first time takes a few seconds)…`
                                         : `downloading v${version}…`;
  try {
    const blob = await api("GET", `/models/${encodeURIComponent(name)}/versions/${version}/download?format=${format}`);
    const a = document.createElement("a");
    a.href = URL.createObjectURL(blob); a.download = `${name}-v${version}.${format}`; a.click();
    status.textContent = `${name}-v${version}.${format}: ${(blob.size / 1e6).toFixed(1)} MB`;
  } catch (e) {
    status.textContent = `v${version} .${format}: ${e.message}`;
  }
}

// Report pictures need the API key too, which an <img src> cannot send: fetch them as blobs.
async function loadReports() {
  for (const img of document.querySelectorAll("img.report")) {
    try {
      const blob = await api("GET", img.dataset.src);
      img.src = URL.createObjectURL(blob);
    } catch (e) { img.alt = e.message; }
  }
}

// ------------------------------------------------------------------ training and the job

async function startTraining(ev) {
  ev.preventDefault();
  $("train-error").textContent = "";
  const form = new FormData($("train-form"));
  for (const [key, value] of [...form.entries()]) if (value === "") form.delete(key);  // empty = the default
  if ($("pretrained").checked) {
    form.set("base", "pretrained");
    if ($("unlabeled").files.length) form.set("unlabeled", $("unlabeled").files[0]);
  }
  $("start").disabled = true;
  try {
    const job = await api("POST", "/finetune", form);
    watch(job.id, job.report);
  } catch (e) {
    $("train-error").textContent = e.message;
  } finally {
    $("start").disabled = false;
  }
}

// The dataset report of POST /finetune (also kept as the job's dataset.report): shown before training starts.
function showReport(report) {
  const el = $("dataset-report");
  if (!report || !report.splits) { el.innerHTML = ""; return; }
  const splits = Object.entries(report.splits);
  const classes = Object.keys(report.splits.train.instances_per_class);
  const head = splits.map(([name]) => `<th>${esc(name)}</th>`).join("");
  const row = (label, f) => `<tr><th>${label}</th>${splits.map(([, s]) => `<td>${f(s)}</td>`).join("")}</tr>`;
  const shares = (s) => ["small", "medium", "large"].map((k) => `${Math.round(100 * s.size_shares[k])} %`).join(" / ");
  const rows = [
    row("images", (s) => s.images),
    row("instances", (s) => s.instances),
    ...classes.map((c) => row(`· ${esc(c)}`, (s) => s.instances_per_class[c] ?? 0)),
    row("instances per image (max / median)", (s) => `${s.instances_per_image.max} / ${s.instances_per_image.median}`),
    row("small / medium / large", shares),
    row("images without annotations", (s) => s.images_without_annotations),
  ].join("");
  const warnings = (report.warnings || []).map((w) => `<li class="warning" data-code="${esc(w.code)}">${esc(w.message)}</li>`).join("");
  el.innerHTML = `<h3>Your dataset</h3><table id="report-table"><tr><th></th>${head}</tr>${rows}</table>` +
    (warnings ? `<ul id="report-warnings">${warnings}</ul>` : `<p>No warnings.</p>`);
}

function watch(jobId, report) {
  state.jobId = jobId;
  state.reportShown = Boolean(report);
  showReport(report);
  $("job").hidden = false;
  $("job-result").innerHTML = "";
  clearInterval(state.timer);
  state.timer = setInterval(poll, 1000);
  poll();
}

async function poll() {
  let job;
  try { job = await api("GET", `/jobs/${state.jobId}`); } catch (e) { $("job-detail").textContent = e.message; return; }
  $("job-title").textContent = `${job.kind} “${job.name}”`;
  if (!state.reportShown && job.dataset && job.dataset.report) { showReport(job.dataset.report); state.reportShown = true; }
  $("job-state").textContent = job.state;
  $("job-state").className = "pill " + job.state;
  $("job-progress").value = job.progress;
  const loss = job.losses && job.losses.loss;
  const eta = job.eta_s ? ` · about ${Math.round(job.eta_s)} s left` : "";
  $("job-detail").textContent = `${job.stage || "queued"} · epoch ${job.epoch}/${job.epochs}` +
    (loss !== undefined && loss !== null ? ` · loss ${loss.toFixed(3)}` : "") + eta + ` · ${(100 * job.progress).toFixed(0)} %`;
  drawLoss(job.history || []);
  $("cancel").hidden = !["queued", "running"].includes(job.state);
  if (["succeeded", "failed", "cancelled"].includes(job.state)) {
    clearInterval(state.timer);
    if (job.state === "succeeded" && job.result) {
      const s = job.result.metrics.segm || {};
      const t = (job.result.metrics.test || {}).segm;
      $("job-result").innerHTML = `<p>Model <b>${job.result.model} v${job.result.version}</b>: mask AP ${pct(s.AP)},
        AP50 ${pct(s.AP50)} (on ${job.result.metrics.evaluated_on || "val"} images)` +
        (t ? `; on the test split, kept aside: mask AP ${pct(t.AP)}, AP50 ${pct(t.AP50)}` : "") + `.</p>`;
      await refreshModels();
      $("seg-model").value = job.result.model;
      await refreshVersions();
    } else if (job.error) {
      $("job-result").innerHTML = `<p class="error">${job.error.message}</p>`;
    }
  }
}

function drawLoss(history) {
  const c = $("loss-chart"), g = c.getContext("2d");
  g.clearRect(0, 0, c.width, c.height);
  g.fillStyle = "#666"; g.font = "12px sans-serif";
  if (!history.length) { g.fillText("the loss curve appears after the first epoch", 10, 20); return; }
  const ys = history.map((h) => h.loss), max = Math.max(...ys), min = Math.min(...ys);
  const x = (i) => 40 + (i / Math.max(1, history.length - 1)) * (c.width - 60);
  const y = (v) => 15 + (1 - (v - min) / Math.max(1e-9, max - min)) * (c.height - 40);
  g.fillText(max.toFixed(2), 2, 18); g.fillText(min.toFixed(2), 2, c.height - 22);
  g.fillText(`epoch (${history.length})`, c.width / 2 - 30, c.height - 4);
  g.strokeStyle = "#2f6fed"; g.lineWidth = 2; g.beginPath();
  history.forEach((h, i) => (i ? g.lineTo(x(i), y(h.loss)) : g.moveTo(x(i), y(h.loss))));
  g.stroke();
  history.forEach((h, i) => { g.fillStyle = h.stage === "pretraining" ? "#f58231" : "#2f6fed"; g.fillRect(x(i) - 2, y(h.loss) - 2, 4, 4); });
  // Validation AP50 per epoch (0..100 % over the chart's height), where the epoch was evaluated.
  const aps = history.map((h, i) => [i, h.AP50]).filter(([, v]) => v !== null && v !== undefined);
  if (aps.length) {
    const ya = (v) => 15 + (1 - v) * (c.height - 40);
    g.strokeStyle = "#3cb44b"; g.beginPath();
    aps.forEach(([i, v], k) => (k ? g.lineTo(x(i), ya(v)) : g.moveTo(x(i), ya(v))));
    g.stroke();
    g.fillStyle = "#3cb44b"; g.fillText(`val AP50 ${(100 * aps[aps.length - 1][1]).toFixed(1)} %`, c.width - 120, 14);
  }
}

// ------------------------------------------------------------------ segmentation

async function runSegment(ev) {
  ev.preventDefault();
  $("segment-error").textContent = "";
  const file = $("photo").files[0];
  const form = new FormData();
  form.set("images", file);
  form.set("model", $("seg-model").value);
  if ($("seg-version").value) form.set("version", $("seg-version").value);
  form.set("score_threshold", $("threshold").value);
  $("run-segment").disabled = true;
  try {
    state.result = await api("POST", "/segment", form);
    state.hidden = new Set();
    state.image = await loadImage(file);
    render();
  } catch (e) {
    $("segment-error").textContent = e.message;
  } finally {
    $("run-segment").disabled = false;
  }
}

function loadImage(file) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("the browser cannot display this image"));
    img.src = URL.createObjectURL(file);
  });
}

function render() {
  const res = state.result.images[0], c = $("overlay"), g = c.getContext("2d");
  c.width = res.width; c.height = res.height;
  g.drawImage(state.image, 0, 0, res.width, res.height);
  const list = $("instances");
  list.innerHTML = "";
  res.instances.forEach((inst, i) => {
    const color = COLORS[inst.category_id % COLORS.length];
    if (!state.hidden.has(i)) {
      g.fillStyle = color + "88"; g.strokeStyle = color; g.lineWidth = 2;
      for (const poly of inst.polygons || []) {
        g.beginPath();
        for (let k = 0; k < poly.length; k += 2) (k ? g.lineTo(poly[k], poly[k + 1]) : g.moveTo(poly[k], poly[k + 1]));
        g.closePath(); g.fill(); g.stroke();
      }
      const [bx, by] = inst.bbox;
      const label = `${inst.category_name} ${inst.score.toFixed(2)}`;
      g.font = "bold 13px sans-serif";
      g.fillStyle = color; g.fillRect(bx, Math.max(0, by - 16), g.measureText(label).width + 6, 16);
      g.fillStyle = "#fff"; g.fillText(label, bx + 3, Math.max(12, by - 4));
    }
    const li = document.createElement("li");
    li.innerHTML = `<input type="checkbox" ${state.hidden.has(i) ? "" : "checked"} data-i="${i}">
      <span class="swatch" style="background:${color}"></span>${inst.category_name} · ${inst.score.toFixed(2)}`;
    li.querySelector("input").onchange = (e) => { e.target.checked ? state.hidden.delete(i) : state.hidden.add(i); render(); };
    list.append(li);
  });
  $("segment-summary").textContent = `${res.instances.length} instance(s) from ${state.result.model} v${state.result.version}`;
  $("download-json").hidden = false;
}

function downloadJson() {
  const blob = new Blob([JSON.stringify(state.result, null, 2)], { type: "application/json" });
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob); a.download = "segmentation.json"; a.click();
}

// ------------------------------------------------------------------ wiring

window.addEventListener("DOMContentLoaded", () => {
  $("api-key").value = localStorage.getItem("uplvp-api-key") || "";
  $("api-key").onchange = () => { localStorage.setItem("uplvp-api-key", $("api-key").value.trim()); refreshModels(); };
  $("pretrained").onchange = () => { $("unlabeled-row").hidden = !$("pretrained").checked; };
  $("train-form").onsubmit = startTraining;
  $("segment-form").onsubmit = runSegment;
  $("seg-model").onchange = refreshVersions;
  $("cancel").onclick = () => api("POST", `/jobs/${state.jobId}/cancel`).then(poll);
  $("download-json").onclick = downloadJson;
  refreshReady(); setInterval(refreshReady, 10000);
  refreshModels();
  const jobParam = new URLSearchParams(location.search).get("job");
  if (jobParam) watch(jobParam);
});
