// The jlad demo page. It talks to the public API of the service that served it (relative
// URLs under the page's <base>, so a gateway's path prefix is kept) and nothing else.
import { greyPng, zipStored } from "./encode.js";

const SAMPLES = [
  { file: "astronaut.png", label: "Astronaut" },
  { file: "astronaut-shifted.png", label: "Astronaut, moved 16 px right and 8 px down" },
  { file: "face.png", label: "Face (for the faces model)" },
  { file: "chelsea.png", label: "Cat" },
  { file: "coffee.png", label: "Coffee cup" },
];
const SAMPLE_DIR = "demo/assets/samples/";
// Long side of the drawing canvases: small pictures are drawn larger so marks stay sharp.
const CANVAS_SIDE = 768;
// Landmark colours by index (tab10), label colours of the masks by label value.
const PALETTE = [
  "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
  "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
];
const LABEL_RGB = [
  [0, 0, 0], [230, 40, 40], [40, 110, 240], [245, 200, 0],
  [40, 180, 90], [200, 60, 220], [0, 190, 200], [255, 130, 0],
];
const MASK_ALPHA = 115;
const VIEW_CAPTIONS = {
  flow: "Where each source pixel moves: hue is the direction, saturation the distance (Middlebury colour wheel).",
  confidence: "How sure the model is of each source pixel's match: bright is reliable, dark is not.",
  warped: "The source picture warped into the target's frame; black where the target has no source.",
};

const $ = (id) => document.getElementById(id);

const state = {
  apiKey: "",
  model: "",
  ready: false,
  slots: { source: null, target: null },
  nextId: 1,
  extras: [],
  field: null,
  views: {},
  view: "flow",
  mode: "match",
  cursor: null,
  pinned: null,
  mask: null, // Uint8Array of source labels, or null
  maskUpload: null, // an uploaded mask file, sent as it is until painted over
  maskCanvas: null,
  stroke: null,
  results: [],
  busy: 0,
};

// -- errors, status and the spinner ------------------------------------------------------------

class ApiError extends Error {
  constructor(message, status = 0, problem = null) {
    super(message);
    this.status = status;
    this.problem = problem;
  }
}

async function problemOf(response) {
  const type = response.headers.get("content-type") || "";
  if (type.includes("json")) {
    try {
      const body = await response.json();
      const title = body.title || response.statusText || "Error";
      let text = `${title} (${response.status})`;
      if (body.detail) text += `: ${body.detail}`;
      if (body.request_id) text += `\nRequest id: ${body.request_id}`;
      return new ApiError(text, response.status, body);
    } catch {
      // fall through to the plain message
    }
  }
  return new ApiError(`The service answered ${response.status} ${response.statusText}`.trim(), response.status);
}

function showError(error) {
  const message = error instanceof Error ? error.message : String(error);
  $("error-text").textContent = message;
  $("error").hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error-text").textContent = "";
}

function setStatus(text) {
  $("service-status").textContent = text;
}

function busy(delta) {
  state.busy = Math.max(0, state.busy + delta);
  $("spinner").hidden = state.busy === 0;
  $("main").setAttribute("aria-busy", state.busy > 0 ? "true" : "false");
}

function report(promise) {
  promise.catch(showError);
}

// -- talking to the API ------------------------------------------------------------------------

/** fetch `path` (relative to the service root); throws ApiError with the problem's text. */
async function api(path, { body = null, accept = "application/json" } = {}) {
  const headers = { Accept: accept };
  if (state.apiKey) headers["X-API-Key"] = state.apiKey;
  let response;
  try {
    response = await fetch(path, { method: body ? "POST" : "GET", headers, body });
  } catch (error) {
    const hint = body
      ? " If a large file was being sent, the service may have refused it for its size."
      : "";
    throw new ApiError(`Could not reach the service (${error.message}).${hint}`);
  }
  if (!response.ok) {
    const problem = await problemOf(response);
    if (response.status === 401) $("api-key").focus();
    throw problem;
  }
  return response;
}

async function withBusy(work) {
  busy(+1);
  try {
    return await work();
  } finally {
    busy(-1);
  }
}

const modelQuery = () => `model=${encodeURIComponent(state.model)}`;

function float32s(encoded) {
  const bytes = Uint8Array.from(atob(encoded.data), (c) => c.charCodeAt(0));
  if (encoded.dtype !== "float32") throw new Error(`unexpected dtype ${encoded.dtype}`);
  return new Float32Array(bytes.buffer);
}

async function waitUntilReady() {
  for (;;) {
    try {
      const response = await fetch("readyz", { headers: { Accept: "application/json" } });
      if (response.ok) return;
      const problem = await problemOf(response);
      setStatus(`${problem.message.split("\n")[0]} Trying again…`);
    } catch (error) {
      setStatus(`Cannot reach the service (${error.message}); trying again…`);
    }
    await new Promise((resolve) => setTimeout(resolve, 2000));
  }
}

async function loadModels() {
  const select = $("model");
  let body;
  try {
    body = await withBusy(async () => (await api("models")).json());
  } catch (error) {
    setStatus(error.status === 401 ? "Enter the API key to continue." : "Could not list the models.");
    throw error;
  }
  const previous = state.model;
  select.replaceChildren(
    ...body.models.map((m) => {
      const option = new Option(`${m.name} v${m.version} · ${m.num_landmarks} landmarks`, m.name);
      option.title = m.description;
      return option;
    }),
  );
  const names = body.models.map((m) => m.name);
  state.model = names.includes(previous) ? previous : body.default_model;
  select.value = state.model;
  select.disabled = false;
  const current = body.models.find((m) => m.name === state.model);
  state.ready = true;
  setStatus(`Ready: ${body.models.length} model(s)${current && current.provider ? ` on ${current.provider}` : ""}.`);
  document.body.dataset.ready = "true";
}

// -- pictures ----------------------------------------------------------------------------------

function fillSampleSelects() {
  for (const select of document.querySelectorAll("select.samples")) {
    const first = select.id === "extra-sample" ? "add a sample…" : "choose…";
    select.replaceChildren(new Option(first, ""), ...SAMPLES.map((s) => new Option(s.label, s.file)));
  }
}

async function fetchSample(file) {
  const response = await fetch(SAMPLE_DIR + file);
  if (!response.ok) throw new ApiError(`Sample ${file} is missing (${response.status})`);
  return response.blob();
}

async function decodeBitmap(blob) {
  try {
    return await createImageBitmap(blob);
  } catch {
    return null; // the service may still read it (TIFF, say): we say so below
  }
}

/** Put a picture in the source or target slot: landmarks, then the pair's field. */
async function setSlot(slot, blob, name) {
  clearError();
  const picture = { id: state.nextId++, blob, name, bitmap: null, width: 0, height: 0, landmarks: null };
  const old = state.slots[slot];
  state.slots[slot] = picture;
  if (slot === "source") {
    state.pinned = null;
    state.cursor = null;
  }
  pairChanged();
  $(`${slot}-info`).textContent = `${name}: finding landmarks…`;
  picture.bitmap = await decodeBitmap(blob);
  let answer;
  try {
    answer = await withBusy(async () => {
      const form = new FormData();
      form.append("image", blob, name);
      return (await api(`landmarks?${modelQuery()}`, { body: form })).json();
    });
  } catch (error) {
    if (state.slots[slot] === picture) {
      // The service refused the picture: leave the slot empty rather than half-filled.
      state.slots[slot] = null;
      $(`${slot}-file`).value = "";
      $(`${slot}-sample`).value = "";
      $(`${slot}-info`).textContent = "";
      renderLandmarkList(slot);
      pairChanged();
    }
    throw error;
  }
  if (state.slots[slot] !== picture) return; // replaced meanwhile
  picture.width = answer.image_size.width;
  picture.height = answer.image_size.height;
  picture.landmarks = answer.landmarks;
  if (slot === "source" && state.mask && state.mask.length !== picture.width * picture.height) {
    clearMask();
  } else if (slot === "source" && old && (old.width !== picture.width || old.height !== picture.height)) {
    clearMask();
  }
  let info = `${name} · ${picture.width}×${picture.height} · ${answer.landmarks.length} landmarks`;
  if (!picture.bitmap) info += " · this browser cannot display the file type, but the service read it";
  $(`${slot}-info`).textContent = info;
  renderLandmarkList(slot);
  draw();
  await computeField();
}

function renderLandmarkList(slot) {
  const list = $(`${slot}-landmarks`);
  const picture = state.slots[slot];
  if (!picture || !picture.landmarks) {
    list.replaceChildren();
    return;
  }
  list.replaceChildren(
    ...picture.landmarks.map((lm) => {
      const item = document.createElement("li");
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.background = PALETTE[lm.index % PALETTE.length];
      item.append(swatch, `${lm.index}: ${lm.confidence.toFixed(2)}`);
      item.title = `landmark ${lm.index} at (${lm.x.toFixed(1)}, ${lm.y.toFixed(1)}), confidence ${lm.confidence.toFixed(3)}`;
      item.dataset.x = lm.x;
      item.dataset.y = lm.y;
      item.dataset.confidence = lm.confidence;
      return item;
    }),
  );
}

/** Anything that depends on the (source, target, model) pair is stale now. */
function pairChanged() {
  state.field = null;
  for (const url of Object.values(state.views)) URL.revokeObjectURL(url);
  state.views = {};
  $("view-image").hidden = true;
  $("view-image").removeAttribute("src");
  $("view-caption").textContent = "The field appears once a source and a target are chosen.";
  clearResults();
  updateReadout();
  draw();
}

function pairKey() {
  const { source, target } = state.slots;
  return source && target ? `${source.id}/${target.id}/${state.model}` : null;
}

// -- the dense field and point matches ---------------------------------------------------------

/** Ask for the grid field source -> target; keep it as per-cell normalised displacements. */
async function computeField() {
  const { source, target } = state.slots;
  const key = pairKey();
  if (!key || !source.landmarks || !target.landmarks) return;
  const body = await withBusy(async () => {
    const form = new FormData();
    form.append("source", source.blob, source.name);
    form.append("target", target.blob, target.name);
    return (await api(`correspond?${modelQuery()}`, { body: form })).json();
  });
  if (pairKey() !== key) return;
  state.field = fieldOf(body);
  document.body.dataset.field = "ready";
  updateReadout();
  draw();
  await showView(state.view);
}

/**
 * The answer's grid flow (pixels, at cell centres) as normalised displacements per cell, so
 * that a point's match is read exactly as jlad_client.coords.transfer_points reads it: the
 * displacement interpolated bilinearly at the point's cell coordinates, added to the point's
 * own normalised position, expressed in target pixels.
 */
function fieldOf(body) {
  const [rows, cols] = body.flow.shape;
  const flow = float32s(body.flow);
  const confidence = float32s(body.confidence);
  const sw = body.source_size.width;
  const sh = body.source_size.height;
  const tw = body.target_size.width;
  const th = body.target_size.height;
  const displacement = new Float32Array(rows * cols * 2);
  for (let i = 0; i < rows; i++) {
    for (let j = 0; j < cols; j++) {
      const k = i * cols + j;
      const centreX = ((j + 0.5) * sw) / cols - 0.5;
      const centreY = ((i + 0.5) * sh) / rows - 0.5;
      const matchX = (2 * (centreX + flow[2 * k]) + 1) / tw - 1;
      const matchY = (2 * (centreY + flow[2 * k + 1]) + 1) / th - 1;
      displacement[2 * k] = matchX - ((2 * j + 1) / cols - 1);
      displacement[2 * k + 1] = matchY - ((2 * i + 1) / rows - 1);
    }
  }
  return { rows, cols, displacement, confidence, sw, sh, tw, th };
}

/** Bilinear sample of a (rows, cols, channels) array at cell (x, y), edges clamped. */
function bilinear(values, rows, cols, channels, x, y) {
  const cx = Math.min(Math.max(x, 0), cols - 1);
  const cy = Math.min(Math.max(y, 0), rows - 1);
  const x0 = Math.floor(cx);
  const y0 = Math.floor(cy);
  const x1 = Math.min(x0 + 1, cols - 1);
  const y1 = Math.min(y0 + 1, rows - 1);
  const fx = cx - x0;
  const fy = cy - y0;
  const out = [];
  for (let c = 0; c < channels; c++) {
    const at = (r, q) => values[(r * cols + q) * channels + c];
    const top = at(y0, x0) * (1 - fx) + at(y0, x1) * fx;
    const bottom = at(y1, x0) * (1 - fx) + at(y1, x1) * fx;
    out.push(top * (1 - fy) + bottom * fy);
  }
  return out;
}

/** Match in target pixels and confidence of the source pixel (x, y). */
function matchOf(x, y) {
  const f = state.field;
  const cellX = ((x + 0.5) * f.cols) / f.sw - 0.5;
  const cellY = ((y + 0.5) * f.rows) / f.sh - 0.5;
  const [dx, dy] = bilinear(f.displacement, f.rows, f.cols, 2, cellX, cellY);
  const [confidence] = bilinear(f.confidence, f.rows, f.cols, 1, cellX, cellY);
  const nx = (2 * x + 1) / f.sw - 1 + dx;
  const ny = (2 * y + 1) / f.sh - 1 + dy;
  return { x: ((nx + 1) * f.tw) / 2 - 0.5, y: ((ny + 1) * f.th) / 2 - 0.5, confidence };
}

function minConfidence() {
  return Number($("min-confidence").value);
}

function updateReadout() {
  const readout = $("match-readout");
  const point = state.cursor || state.pinned;
  for (const key of ["sourceX", "sourceY", "targetX", "targetY", "confidence", "kind"]) {
    delete readout.dataset[key];
  }
  if (!state.field) {
    readout.textContent = pairKey()
      ? "Computing the correspondence…"
      : "Pick a source and a target, then hover or click on the source.";
    return;
  }
  if (!point) {
    readout.textContent = "Hover over the source to see where each point goes; click to pin it.";
    return;
  }
  const match = matchOf(point.x, point.y);
  const reliable = match.confidence >= minConfidence() ? "reliable" : "unreliable";
  const kind = state.cursor ? "hover" : "pinned";
  readout.textContent =
    `${kind === "pinned" ? "Pinned: s" : "S"}ource (${point.x.toFixed(1)}, ${point.y.toFixed(1)}) → ` +
    `target (${match.x.toFixed(1)}, ${match.y.toFixed(1)}), confidence ${match.confidence.toFixed(2)} (${reliable})`;
  Object.assign(readout.dataset, {
    sourceX: point.x,
    sourceY: point.y,
    targetX: match.x,
    targetY: match.y,
    confidence: match.confidence,
    kind,
  });
}

/** Evenly spread source points (as the service's matches view), with their matches. */
function confidentMatches() {
  const f = state.field;
  const perSide = 14;
  const out = [];
  let total = 0;
  for (let i = 0; i < perSide; i++) {
    for (let j = 0; j < perSide; j++) {
      const x = ((j + 0.5) * f.sw) / perSide - 0.5;
      const y = ((i + 0.5) * f.sh) / perSide - 0.5;
      const match = matchOf(x, y);
      total++;
      if (match.confidence >= minConfidence()) out.push({ x, y, match, hue: (360 * (i * perSide + j)) / (perSide * perSide) });
    }
  }
  return { shown: out, total };
}

// -- the views (PNG renderings by the service) -------------------------------------------------

async function showView(view) {
  state.view = view;
  const image = $("view-image");
  const key = pairKey();
  if (!state.field || !key) return;
  $("view-caption").textContent = VIEW_CAPTIONS[view];
  if (!state.views[view]) {
    const { source, target } = state.slots;
    const blob = await withBusy(async () => {
      const form = new FormData();
      form.append("source", source.blob, source.name);
      form.append("target", target.blob, target.name);
      const path = `correspond?${modelQuery()}&view=${encodeURIComponent(view)}`;
      return (await api(path, { body: form, accept: "image/png" })).blob();
    });
    if (pairKey() !== key) return;
    state.views[view] = URL.createObjectURL(blob);
  }
  if (state.view !== view) return;
  image.src = state.views[view];
  image.alt = `${view} view of the correspondence from ${state.slots.source.name} to ${state.slots.target.name}`;
  image.dataset.view = view;
  image.hidden = false;
}

// -- the mask ----------------------------------------------------------------------------------

function sourceSize() {
  const source = state.slots.source;
  return source && source.width ? [source.width, source.height] : null;
}

function ensureMask() {
  const size = sourceSize();
  if (!size) return false;
  if (!state.mask || state.mask.length !== size[0] * size[1]) state.mask = new Uint8Array(size[0] * size[1]);
  return true;
}

function stamp(x, y, radius, value) {
  const [width, height] = sourceSize();
  const r2 = radius * radius;
  const x0 = Math.max(0, Math.floor(x - radius));
  const x1 = Math.min(width - 1, Math.ceil(x + radius));
  const y0 = Math.max(0, Math.floor(y - radius));
  const y1 = Math.min(height - 1, Math.ceil(y + radius));
  for (let py = y0; py <= y1; py++) {
    for (let px = x0; px <= x1; px++) {
      if ((px - x) ** 2 + (py - y) ** 2 <= r2) state.mask[py * width + px] = value;
    }
  }
}

function paintSegment(from, to) {
  const source = state.slots.source;
  const radius = Number($("brush-size").value) / 2 / canvasScale(source);
  const value = state.mode === "erase" ? 0 : Number($("brush-label").value);
  const length = Math.hypot(to.x - from.x, to.y - from.y);
  const steps = Math.max(1, Math.ceil(length / Math.max(1, radius / 2)));
  for (let s = 0; s <= steps; s++) {
    stamp(from.x + ((to.x - from.x) * s) / steps, from.y + ((to.y - from.y) * s) / steps, radius, value);
  }
  state.maskUpload = null;
  renderMaskCanvas();
}

function renderMaskCanvas() {
  const size = sourceSize();
  if (!state.mask || !size) {
    state.maskCanvas = null;
    draw();
    return;
  }
  const [width, height] = size;
  const canvas = state.maskCanvas && state.maskCanvas.width === width && state.maskCanvas.height === height
    ? state.maskCanvas
    : Object.assign(document.createElement("canvas"), { width, height });
  state.maskCanvas = canvas;
  canvas.getContext("2d").putImageData(labelsToImage(state.mask, width, height), 0, 0);
  draw();
}

function labelsToImage(labels, width, height) {
  const image = new ImageData(width, height);
  for (let i = 0; i < labels.length; i++) {
    const v = labels[i];
    if (!v) continue;
    const [r, g, b] = LABEL_RGB[v % LABEL_RGB.length] || LABEL_RGB[1];
    image.data[4 * i] = r;
    image.data[4 * i + 1] = g;
    image.data[4 * i + 2] = b;
    image.data[4 * i + 3] = MASK_ALPHA;
  }
  return image;
}

/** Label values of a decoded mask picture: grey level = label (8-bit L or RGB masks). */
async function labelsOfPng(blob) {
  const bitmap = await createImageBitmap(blob, { premultiplyAlpha: "none", colorSpaceConversion: "none" });
  const canvas = Object.assign(document.createElement("canvas"), { width: bitmap.width, height: bitmap.height });
  const context = canvas.getContext("2d", { willReadFrequently: true });
  context.drawImage(bitmap, 0, 0);
  const rgba = context.getImageData(0, 0, bitmap.width, bitmap.height).data;
  const labels = new Uint8Array(bitmap.width * bitmap.height);
  for (let i = 0; i < labels.length; i++) {
    const r = rgba[4 * i];
    // A palette mask decodes to colours: any non-black pixel is at least label 1.
    labels[i] = r || (rgba[4 * i + 1] || rgba[4 * i + 2] ? 1 : 0);
  }
  return { labels, width: bitmap.width, height: bitmap.height };
}

function maskHasLabels() {
  return Boolean(state.mask && state.mask.some((v) => v !== 0));
}

async function maskBlob() {
  if (state.maskUpload) return state.maskUpload;
  if (!maskHasLabels()) return null;
  const [width, height] = sourceSize();
  return greyPng(width, height, state.mask);
}

let sourceMaskUrl = null;

async function updateSourceMaskLink() {
  const link = $("download-source-mask");
  if (sourceMaskUrl) URL.revokeObjectURL(sourceMaskUrl);
  sourceMaskUrl = null;
  const blob = await maskBlob();
  if (!blob) {
    link.href = "#";
    link.setAttribute("aria-disabled", "true");
    return;
  }
  sourceMaskUrl = URL.createObjectURL(blob);
  link.href = sourceMaskUrl;
  link.removeAttribute("aria-disabled");
}

function clearMask() {
  state.mask = null;
  state.maskUpload = null;
  $("mask-file").value = "";
  renderMaskCanvas();
  report(updateSourceMaskLink());
}

async function uploadMask(file) {
  clearError();
  if (!state.slots.source) throw new ApiError("Choose the source picture before its mask.");
  state.maskUpload = file;
  try {
    const decoded = await labelsOfPng(file);
    const size = sourceSize();
    // Only a mask of the source's size can be drawn or painted on; any other is sent as it
    // is, and the service says what is wrong with it.
    state.mask = size && decoded.width === size[0] && decoded.height === size[1] ? decoded.labels : null;
  } catch {
    state.mask = null;
  }
  renderMaskCanvas();
  await updateSourceMaskLink();
}

// -- carrying the mask -------------------------------------------------------------------------

function clearResults() {
  for (const result of state.results) URL.revokeObjectURL(result.url);
  state.results = [];
  $("results").replaceChildren();
  const all = $("download-all");
  if (all.href.startsWith("blob:")) URL.revokeObjectURL(all.href);
  all.hidden = true;
  all.removeAttribute("href");
  delete document.body.dataset.propagated;
}

function base64Blob(text, type) {
  const bytes = Uint8Array.from(atob(text), (c) => c.charCodeAt(0));
  return new Blob([bytes], { type });
}

function stem(name) {
  return name.replace(/\.[^.]*$/, "").replace(/[^A-Za-z0-9._-]+/g, "_") || "target";
}

async function propagate() {
  clearError();
  const source = state.slots.source;
  if (!source || !source.width) throw new ApiError("Choose a source picture first.");
  const targets = [state.slots.target, ...state.extras].filter(Boolean);
  if (!targets.length) throw new ApiError("Choose a target picture or add further targets first.");
  const mask = await maskBlob();
  if (!mask) throw new ApiError("Paint a mask on the source (choose “Paint the mask”) or upload one first.");
  const key = `${pairKey()}/${state.extras.map((e) => e.id).join(",")}`;
  const body = await withBusy(async () => {
    const form = new FormData();
    form.append("source", source.blob, source.name);
    form.append("mask", mask, "mask.png");
    for (const target of targets) form.append("targets", target.blob, target.name);
    form.append("min_confidence", String(minConfidence()));
    form.append("refine", $("refine-colour").checked ? "colour" : "none");
    return (await api(`propagate?${modelQuery()}`, { body: form })).json();
  });
  if (`${pairKey()}/${state.extras.map((e) => e.id).join(",")}` !== key) return;
  clearResults();
  const used = new Set();
  for (const answer of body.masks) {
    const target = targets[answer.index];
    let name = `mask_${stem(target.name)}.png`;
    for (let n = 2; used.has(name); n++) name = `mask_${stem(target.name)}_${n}.png`;
    used.add(name);
    const blob = base64Blob(answer.mask, "image/png");
    const decoded = await labelsOfPng(blob);
    const overlay = Object.assign(document.createElement("canvas"), { width: decoded.width, height: decoded.height });
    overlay.getContext("2d").putImageData(labelsToImage(decoded.labels, decoded.width, decoded.height), 0, 0);
    state.results.push({
      target,
      name,
      blob,
      url: URL.createObjectURL(blob),
      overlay,
      labels: answer.labels,
      reliable: answer.reliable_fraction,
    });
  }
  await renderResults();
  draw();
}

async function renderResults() {
  const list = $("results");
  const items = [];
  for (const [i, result] of state.results.entries()) {
    const item = document.createElement("li");
    const canvas = document.createElement("canvas");
    const { bitmap } = result.target;
    const width = result.overlay.width;
    const height = result.overlay.height;
    const scale = Math.min(1, 480 / Math.max(width, height)) || 1;
    canvas.width = Math.round(width * scale);
    canvas.height = Math.round(height * scale);
    const context = canvas.getContext("2d");
    if (bitmap) context.drawImage(bitmap, 0, 0, canvas.width, canvas.height);
    context.drawImage(result.overlay, 0, 0, canvas.width, canvas.height);
    canvas.setAttribute("role", "img");
    canvas.setAttribute("aria-label", `Mask carried to ${result.target.name}`);
    const title = document.createElement("p");
    title.textContent = `${i === 0 && result.target === state.slots.target ? "Target" : "Further target"}: ${result.target.name}`;
    const reliable = document.createElement("p");
    reliable.className = "reliable";
    reliable.textContent = `Reliable pixels: ${(100 * result.reliable).toFixed(1)} % · labels ${result.labels.join(", ")}`;
    reliable.dataset.reliable = result.reliable;
    const link = document.createElement("a");
    link.className = "button download-mask";
    link.href = result.url;
    link.download = result.name;
    link.textContent = `Download ${result.name}`;
    item.append(title, canvas, reliable, link);
    items.push(item);
  }
  list.replaceChildren(...items);
  const all = $("download-all");
  if (state.results.length > 1) {
    const files = await Promise.all(
      state.results.map(async (r) => ({ name: r.name, bytes: new Uint8Array(await r.blob.arrayBuffer()) })),
    );
    all.href = URL.createObjectURL(zipStored(files));
    all.hidden = false;
  }
  document.body.dataset.propagated = String(state.results.length);
}

function renderExtras() {
  $("extra-list").replaceChildren(
    ...state.extras.map((extra) => {
      const item = document.createElement("li");
      const remove = document.createElement("button");
      remove.type = "button";
      remove.textContent = "×";
      remove.setAttribute("aria-label", `Remove ${extra.name}`);
      remove.addEventListener("click", () => {
        state.extras = state.extras.filter((e) => e !== extra);
        renderExtras();
        clearResults();
        draw();
      });
      item.append(extra.name, remove);
      return item;
    }),
  );
}

async function addExtra(blob, name) {
  state.extras.push({ id: state.nextId++, blob, name, bitmap: await decodeBitmap(blob) });
  renderExtras();
}

// -- drawing -----------------------------------------------------------------------------------

function canvasScale(picture) {
  return CANVAS_SIDE / Math.max(picture.width || 1, picture.height || 1);
}

function ring(context, x, y, radius, colour, width = 2) {
  context.beginPath();
  context.arc(x, y, radius, 0, 2 * Math.PI);
  context.lineWidth = width;
  context.strokeStyle = colour;
  context.stroke();
}

function dot(context, x, y, radius, fill, alpha = 1, k = 1) {
  context.beginPath();
  context.arc(x, y, radius, 0, 2 * Math.PI);
  context.globalAlpha = alpha;
  context.fillStyle = fill;
  context.fill();
  context.globalAlpha = 1;
  context.lineWidth = 1.5 * k;
  context.strokeStyle = "#fff";
  context.stroke();
}

function crosshair(context, x, y, colour, k = 1) {
  const [inner, outer] = [3 * k, 10 * k];
  for (const [w, c] of [[4 * k, "#000a"], [2 * k, colour]]) {
    context.lineWidth = w;
    context.strokeStyle = c;
    context.beginPath();
    context.moveTo(x - outer, y);
    context.lineTo(x - inner, y);
    context.moveTo(x + inner, y);
    context.lineTo(x + outer, y);
    context.moveTo(x, y - outer);
    context.lineTo(x, y - inner);
    context.moveTo(x, y + inner);
    context.lineTo(x, y + outer);
    context.stroke();
  }
}

function confidenceColour(confidence) {
  // red (unreliable) -> yellow -> green (reliable)
  const hue = Math.round(120 * Math.min(1, Math.max(0, confidence)));
  return `hsl(${hue} 90% 50%)`;
}

function drawPanel(slot) {
  const picture = state.slots[slot];
  const canvas = $(`${slot}-canvas`);
  $(`${slot}-empty`).hidden = Boolean(picture);
  if (!picture || !picture.width) {
    canvas.width = 320;
    canvas.height = 160;
    canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
    return;
  }
  const scale = canvasScale(picture);
  const width = Math.round(picture.width * scale);
  const height = Math.round(picture.height * scale);
  if (canvas.width !== width) canvas.width = width;
  if (canvas.height !== height) canvas.height = height;
  const context = canvas.getContext("2d");
  // Canvas pixels per CSS pixel: marks keep their on-screen size on a phone and a desktop.
  const k = width / Math.max(1, canvas.getBoundingClientRect().width || width);
  context.clearRect(0, 0, width, height);
  if (picture.bitmap) context.drawImage(picture.bitmap, 0, 0, width, height);
  // Image pixel (x, y) (pixel centres at integers) -> canvas position.
  const at = (x, y) => [(x + 0.5) * scale, (y + 0.5) * scale];
  if (slot === "source" && state.maskCanvas) context.drawImage(state.maskCanvas, 0, 0, width, height);
  if (slot === "target" && state.results.length && state.results[0].target === picture) {
    context.drawImage(state.results[0].overlay, 0, 0, width, height);
  }
  if ($("show-landmarks").checked && picture.landmarks) {
    context.font = `bold ${Math.round(12 * k)}px system-ui, sans-serif`;
    const labelled = [];
    for (const lm of picture.landmarks) {
      const [x, y] = at(lm.x, lm.y);
      const colour = PALETTE[lm.index % PALETTE.length];
      dot(context, x, y, 6 * k, colour, 0.25 + 0.75 * lm.confidence, k);
      // Landmarks that sit together keep one label; the list below the picture has them all.
      if (labelled.some(([lx, ly]) => Math.hypot(lx - x, ly - y) < 18 * k)) continue;
      labelled.push([x, y]);
      context.fillStyle = "#fff";
      context.strokeStyle = "#000";
      context.lineWidth = 3 * k;
      const label = `${lm.index} ${lm.confidence.toFixed(2)}`;
      context.strokeText(label, x + 8 * k, y - 6 * k);
      context.fillText(label, x + 8 * k, y - 6 * k);
    }
  }
  if (!state.field) return;
  if ($("show-all").checked) {
    const { shown } = confidentMatches();
    for (const m of shown) {
      const [x, y] = slot === "source" ? at(m.x, m.y) : at(m.match.x, m.match.y);
      dot(context, x, y, 3.5 * k, `hsl(${m.hue} 85% 55%)`, 1, k);
    }
  }
  for (const [point, kind] of [[state.pinned, "pinned"], [state.cursor, "hover"]]) {
    if (!point) continue;
    if (slot === "source") {
      const [x, y] = at(point.x, point.y);
      ring(context, x, y, 9 * k, "#000", 5 * k);
      ring(context, x, y, 9 * k, kind === "pinned" ? "#fff" : "#ffeb3b", 3 * k);
      crosshair(context, x, y, kind === "pinned" ? "#fff" : "#ffeb3b", k);
    } else {
      const match = matchOf(point.x, point.y);
      const [x, y] = at(match.x, match.y);
      ring(context, x, y, 9 * k, "#000", 5 * k);
      ring(context, x, y, 9 * k, confidenceColour(match.confidence), 3 * k);
      crosshair(context, x, y, kind === "pinned" ? "#fff" : "#ffeb3b", k);
    }
  }
}

let drawQueued = false;

function draw() {
  if (drawQueued) return;
  drawQueued = true;
  requestAnimationFrame(() => {
    drawQueued = false;
    drawPanel("source");
    drawPanel("target");
    const note = $("show-all").checked && state.field ? confidentMatches() : null;
    $("show-all").parentElement.dataset.count = note ? String(note.shown.length) : "";
    if (note) $("show-all").parentElement.title = `${note.shown.length} of ${note.total} spread points match confidently`;
  });
}

// -- pointer and keyboard on the source --------------------------------------------------------

function imagePoint(event) {
  const source = state.slots.source;
  const rect = $("source-canvas").getBoundingClientRect();
  const x = ((event.clientX - rect.left) / rect.width) * source.width - 0.5;
  const y = ((event.clientY - rect.top) / rect.height) * source.height - 0.5;
  return {
    x: Math.min(Math.max(x, 0), source.width - 1),
    y: Math.min(Math.max(y, 0), source.height - 1),
  };
}

function bindSourcePointer() {
  const canvas = $("source-canvas");
  canvas.addEventListener("pointerdown", (event) => {
    if (!state.slots.source || !state.slots.source.width) return;
    const point = imagePoint(event);
    if (state.mode === "match") {
      if (!state.field) return;
      state.pinned = point;
      state.cursor = null;
      updateReadout();
      draw();
      return;
    }
    if (!ensureMask()) return;
    canvas.setPointerCapture(event.pointerId);
    state.stroke = point;
    paintSegment(point, point);
  });
  canvas.addEventListener("pointermove", (event) => {
    if (!state.slots.source || !state.slots.source.width) return;
    const point = imagePoint(event);
    if (state.mode === "match") {
      if (!state.field || event.pointerType === "touch") return;
      state.cursor = point;
      updateReadout();
      draw();
    } else if (state.stroke) {
      paintSegment(state.stroke, point);
      state.stroke = point;
    }
  });
  const endStroke = () => {
    if (state.stroke) {
      state.stroke = null;
      report(updateSourceMaskLink());
    }
  };
  canvas.addEventListener("pointerup", endStroke);
  canvas.addEventListener("pointercancel", endStroke);
  canvas.addEventListener("pointerleave", () => {
    if (state.cursor) {
      state.cursor = null;
      updateReadout();
      draw();
    }
  });
  canvas.addEventListener("keydown", (event) => {
    const source = state.slots.source;
    if (!source || !source.width || !state.field || state.mode !== "match") return;
    const step = event.shiftKey ? 16 : 4;
    const point = state.cursor || state.pinned || { x: source.width / 2, y: source.height / 2 };
    const moves = { ArrowLeft: [-step, 0], ArrowRight: [step, 0], ArrowUp: [0, -step], ArrowDown: [0, step] };
    if (moves[event.key]) {
      const [dx, dy] = moves[event.key];
      state.cursor = {
        x: Math.min(Math.max(point.x + dx, 0), source.width - 1),
        y: Math.min(Math.max(point.y + dy, 0), source.height - 1),
      };
    } else if (event.key === "Enter" || event.key === " ") {
      state.pinned = point;
      state.cursor = null;
    } else if (event.key === "Escape") {
      state.cursor = null;
      state.pinned = null;
    } else {
      return;
    }
    event.preventDefault();
    updateReadout();
    draw();
  });
}

// -- wiring ------------------------------------------------------------------------------------

function bind() {
  for (const slot of ["source", "target"]) {
    $(`${slot}-file`).addEventListener("change", (event) => {
      const file = event.target.files[0];
      if (!file) return;
      $(`${slot}-sample`).value = "";
      report(setSlot(slot, file, file.name));
    });
    $(`${slot}-sample`).addEventListener("change", (event) => {
      const file = event.target.value;
      if (!file) return;
      $(`${slot}-file`).value = "";
      report(fetchSample(file).then((blob) => setSlot(slot, blob, file)));
    });
  }
  $("model").addEventListener("change", (event) => {
    state.model = event.target.value;
    clearError();
    pairChanged();
    report(
      (async () => {
        const names = ["source", "target"].filter((slot) => state.slots[slot]);
        await Promise.all(names.map((slot) => setSlot(slot, state.slots[slot].blob, state.slots[slot].name)));
      })(),
    );
  });
  $("api-key").addEventListener("change", (event) => {
    state.apiKey = event.target.value.trim();
    sessionStorage.setItem("jlad-api-key", state.apiKey);
    clearError();
    report(loadModels());
  });
  for (const radio of document.querySelectorAll('input[name="mode"]')) {
    radio.addEventListener("change", (event) => {
      state.mode = event.target.value;
      state.cursor = null;
      $("source-canvas").style.cursor = state.mode === "match" ? "crosshair" : "cell";
      updateReadout();
      draw();
    });
  }
  for (const radio of document.querySelectorAll('input[name="view"]')) {
    radio.addEventListener("change", (event) => report(showView(event.target.value)));
  }
  $("show-landmarks").addEventListener("change", draw);
  $("show-all").addEventListener("change", draw);
  $("min-confidence").addEventListener("input", (event) => {
    $("min-confidence-value").textContent = Number(event.target.value).toFixed(2);
    updateReadout();
    draw();
  });
  $("clear-mask").addEventListener("click", clearMask);
  $("mask-file").addEventListener("change", (event) => {
    const file = event.target.files[0];
    if (file) report(uploadMask(file));
  });
  $("extra-files").addEventListener("change", (event) => {
    const files = [...event.target.files];
    event.target.value = "";
    report(Promise.all(files.map((file) => addExtra(file, file.name))));
  });
  $("extra-sample").addEventListener("change", (event) => {
    const file = event.target.value;
    event.target.value = "";
    if (file) report(fetchSample(file).then((blob) => addExtra(blob, file)));
  });
  $("propagate").addEventListener("click", () => report(propagate()));
  $("error-close").addEventListener("click", clearError);
  $("download-source-mask").addEventListener("click", (event) => {
    if ($("download-source-mask").getAttribute("aria-disabled") === "true") event.preventDefault();
  });
  bindSourcePointer();
  window.addEventListener("resize", draw);
  window.addEventListener("unhandledrejection", (event) => showError(event.reason));
}

async function start() {
  fillSampleSelects();
  bind();
  state.apiKey = sessionStorage.getItem("jlad-api-key") || "";
  $("api-key").value = state.apiKey;
  draw();
  await waitUntilReady();
  await loadModels();
}

report(start());
