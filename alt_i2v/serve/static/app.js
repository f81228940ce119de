// alt-i2v page: upload an image, show its tags (grouped by category, with calibrated thresholds), a live
// threshold, the Grad-CAM map of a clicked tag, the most similar indexed images and a copyable caption.
// Every number comes from the JSON API; the caption is formatted by the server (one formatter).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, file: null, probs: null, threshold: null, heatTag: null, captionSeq: 0, seq: 0 };

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function busy(text) {
  $("busy").hidden = !text;
  if (text) $("busy-text").textContent = text;
}

async function api(path, options) {
  const response = await fetch(path, options);
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (!response.ok) {
    const message = body && body.error ? body.error : `${response.status} ${response.statusText}`;
    const error = new Error(message);
    error.status = response.status;
    throw error;
  }
  return body;
}

function formWith(file, fields) {
  const form = new FormData();
  form.append("file", file, file.name || "pasted.png");
  for (const [k, v] of Object.entries(fields || {})) form.append(k, v);
  return form;
}

// ------------------------------------------------------------------------------------------- model info
async function loadModel() {
  try {
    state.model = await api("/api/model");
  } catch (e) {
    $("model-info").textContent = "the server did not answer: " + e.message;
    return;
  }
  const m = state.model;
  state.thresholds = Object.fromEntries(m.tags.map((t) => [t.name, t.threshold]));
  state.categories = Object.fromEntries(m.tags.map((t) => [t.name, t.category]));
  $("model-info").textContent = "";
  $("model-info").append(
    el("span", "chip", m.model),
    el("span", "chip", `${m.tags.length} tags`),
    el("span", "chip", m.calibrated ? "calibrated thresholds" : `thresholds: ${m.thresholds}`),
    el("span", "chip", m.index ? `index: ${m.index} images` : "no index"));
  $("threshold").value = m.global_threshold.toFixed(2);
  document.body.dataset.ready = "1";
}

// ------------------------------------------------------------------------------------------- upload
async function handleFile(file) {
  if (!file || !state.model) return;
  const seq = ++state.seq;
  state.file = file;
  state.probs = null;
  state.heatTag = null;
  showError("");
  $("result").hidden = false;
  $("result").dataset.state = "loading";
  $("drop").classList.add("compact");
  $("picture").src = URL.createObjectURL(file);
  $("picture").hidden = false;
  $("heatmap").hidden = true;
  $("heatmap").removeAttribute("data-tag");
  $("heat-legend").hidden = true;
  $("show-original").hidden = true;
  $("heat-caption").textContent = "Click a tag to see where the model looks for it.";
  $("file-name").textContent = `${file.name || "pasted image"} \u00b7 ${(file.size / 1024).toFixed(1)} KiB`;
  $("tags").textContent = "";
  $("rating").textContent = "";
  $("rating").hidden = true;
  $("caption").textContent = "";
  $("count").textContent = "";
  $("similar").textContent = "";
  $("similar-section").hidden = true;
  busy("Tagging\u2026");

  const similar = state.model.index ? loadSimilar(file, seq) : Promise.resolve();
  try {
    const result = await api("/api/tags", { method: "POST", body: formWith(file) });
    if (seq !== state.seq) return;
    state.probs = result.tags;
    $("caption").textContent = result.caption;
    const ratings = Object.entries(result.rating || {});
    $("rating").hidden = !ratings.length;
    $("rating").textContent = ratings.length ?
      "rating: " + ratings.map(([name, p]) => `${name} ${p.toFixed(3)}`).join(" \u00b7 ") : "";
    render();
    $("result").dataset.state = "done";
  } catch (e) {
    if (seq !== state.seq) return;
    $("result").dataset.state = "error";
    $("result").hidden = true;
    $("drop").classList.remove("compact");
    showError(e.message);
  } finally {
    if (seq === state.seq) busy("");
  }
  await similar;
}

async function loadSimilar(file, seq) {
  try {
    const result = await api(`/api/similar?k=${state.model.top_k}`, { method: "POST", body: formWith(file) });
    if (seq !== state.seq) return;
    const grid = $("similar");
    grid.textContent = "";
    for (const r of result.results) {
      const card = el("figure", "card");
      card.dataset.id = String(r.id);
      const img = el("img");
      img.alt = `indexed image ${r.id}`;
      img.loading = "lazy";
      if (r.thumbnail) img.src = r.thumbnail;
      const cap = el("figcaption");
      const score = el("span", "score", r.similarity.toFixed(3));
      const meter = el("span", "meter");
      const fill = el("span", "meter-fill");
      fill.style.width = `${Math.max(0, r.similarity) * 100}%`;
      meter.append(fill);
      cap.append(el("span", "sim-id", typeof r.id === "number" ? `#${r.id}` : String(r.id)), score, meter);
      card.append(img, cap);
      grid.append(card);
    }
    $("similar-section").hidden = result.results.length === 0;
  } catch (e) {
    if (seq === state.seq && e.status !== 415 && e.status !== 413 && e.status !== 400 && e.status !== 422) {
      showError("similar images: " + e.message);
    }
  }
}

// ------------------------------------------------------------------------------------------- tags
function thresholdOf(name) {
  return state.threshold === null ? state.thresholds[name] : state.threshold;
}

function displayName(name) {
  return name.length > 3 ? name.replace(/_/g, " ") : name;
}

function render() {
  if (!state.probs) return;
  const m = state.model;
  const box = $("tags");
  box.textContent = "";
  const shown = Object.entries(state.probs).filter(([name, p]) => p >= thresholdOf(name));
  const groups = new Map(m.categories.map((c) => [c, []]));
  for (const [name, p] of shown) {
    const cat = state.categories[name] || "general";
    if (!groups.has(cat)) groups.set(cat, []);
    groups.get(cat).push([name, p]);
  }
  const grouped = m.categories.length > 1;
  for (const [cat, rows] of groups) {
    if (!rows.length) continue;
    const group = el("div", "group");
    group.dataset.category = cat;
    if (grouped) group.append(el("h3", "group-title", `${cat} \u00b7 ${rows.length}`));
    rows.sort((a, b) => b[1] - a[1]);
    for (const [name, p] of rows) group.append(tagRow(name, p));
    box.append(group);
  }
  if (!shown.length) box.append(el("p", "empty", "No tag reaches this threshold: move the slider left."));
  const total = Object.keys(state.probs).length;
  $("count").textContent = `${shown.length} of ${total} tags`;
  $("threshold-value").textContent = state.threshold === null ? "calibrated" : state.threshold.toFixed(2);
  $("calibrated").classList.toggle("on", state.threshold === null);
}

function tagRow(name, p) {
  const row = el("button", "tag");
  row.type = "button";
  row.dataset.tag = name;
  row.dataset.prob = String(p);
  row.title = `${name}: ${p.toFixed(4)} (calibrated threshold ${state.thresholds[name].toFixed(3)})`;
  if (name === state.heatTag) row.classList.add("active");
  const bar = el("span", "bar");
  const fill = el("span", "fill");
  fill.style.width = `${(p * 100).toFixed(1)}%`;
  const mark = el("span", "mark");
  mark.style.left = `${(state.thresholds[name] * 100).toFixed(1)}%`;
  bar.append(fill, mark);
  row.append(el("span", "name", displayName(name)), bar, el("span", "prob", p.toFixed(3)));
  row.addEventListener("click", () => explainTag(name));
  return row;
}

let captionTimer = null;
function refreshCaption() {
  clearTimeout(captionTimer);
  captionTimer = setTimeout(async () => {
    if (!state.probs) return;
    const seq = ++state.captionSeq;
    try {
      const result = await api("/api/caption", {
        method: "POST", headers: { "content-type": "application/json" },
        body: JSON.stringify({ tags: state.probs, threshold: state.threshold }),
      });
      if (seq === state.captionSeq) $("caption").textContent = result.caption;
    } catch (e) {
      showError("caption: " + e.message);
    }
  }, 120);
}

async function copyCaption() {
  const text = $("caption").textContent;
  try {
    await navigator.clipboard.writeText(text);
  } catch (e) {
    const area = el("textarea");
    area.value = text;
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  $("copy").textContent = "Copied";
  setTimeout(() => { $("copy").textContent = "Copy caption"; }, 1200);
}

// ------------------------------------------------------------------------------------------- heat map
async function explainTag(name) {
  if (!state.file) return;
  if (!state.model.explain) {
    $("heat-caption").textContent = "Heat maps need a Keras model (alt-i2v, DeepDanbooru); this one has no gradients.";
    return;
  }
  const seq = state.seq;
  state.heatTag = name;
  for (const row of document.querySelectorAll(".tag")) row.classList.toggle("active", row.dataset.tag === name);
  busy(`Where is \u201c${displayName(name)}\u201d?`);
  try {
    const result = await api("/api/explain", { method: "POST", body: formWith(state.file, { tag: name }) });
    if (seq !== state.seq || state.heatTag !== name) return;
    const heat = $("heatmap");
    heat.onload = () => {
      heat.dataset.tag = name;
      heat.hidden = false;
      $("picture").hidden = true;
    };
    heat.src = result.overlay;
    $("heat-caption").textContent = `Grad-CAM for \u201c${displayName(name)}\u201d (p = ${result.probability.toFixed(3)})`;
    $("heat-legend").hidden = false;
    $("show-original").hidden = false;
  } catch (e) {
    showError("heat map: " + e.message);
  } finally {
    if (seq === state.seq) busy("");
  }
}

function showOriginal() {
  state.heatTag = null;
  $("heatmap").hidden = true;
  $("heatmap").removeAttribute("data-tag");
  $("picture").hidden = false;
  $("heat-legend").hidden = true;
  $("show-original").hidden = true;
  $("heat-caption").textContent = "Click a tag to see where the model looks for it.";
  for (const row of document.querySelectorAll(".tag.active")) row.classList.remove("active");
}

// ------------------------------------------------------------------------------------------- wiring
function setup() {
  const drop = $("drop");
  $("pick").addEventListener("click", () => $("file").click());
  drop.addEventListener("click", (e) => { if (e.target === drop) $("file").click(); });
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") $("file").click(); });
  $("file").addEventListener("change", (e) => { handleFile(e.target.files[0]); e.target.value = ""; });
  for (const type of ["dragenter", "dragover"]) {
    document.addEventListener(type, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  for (const type of ["dragleave", "drop"]) {
    document.addEventListener(type, (e) => { e.preventDefault(); drop.classList.remove("over"); });
  }
  document.addEventListener("drop", (e) => {
    const file = e.dataTransfer && e.dataTransfer.files[0];
    if (file) handleFile(file);
  });
  document.addEventListener("paste", (e) => {
    const item = [...(e.clipboardData ? e.clipboardData.items : [])].find((i) => i.type.startsWith("image/"));
    if (item) handleFile(item.getAsFile());
  });
  $("threshold").addEventListener("input", (e) => {
    state.threshold = Number(e.target.value);
    render();
    refreshCaption();
  });
  $("calibrated").addEventListener("click", () => {
    state.threshold = null;
    if (state.model) $("threshold").value = state.model.global_threshold.toFixed(2);
    render();
    refreshCaption();
  });
  $("copy").addEventListener("click", copyCaption);
  $("show-original").addEventListener("click", showOriginal);
  loadModel();
}

document.addEventListener("DOMContentLoaded", setup);
