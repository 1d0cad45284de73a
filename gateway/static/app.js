/* imagegen web UI: submits jobs to /v1/jobs (text-to-image, or image-to-image and inpainting from an
   uploaded init image and mask), follows them all over one WebSocket (/v1/ws), which also says how their
   places in the queue move, and keeps finished images in a gallery. No dependencies, works offline. */
"use strict";

const KEY_STORE = "imagegen.apiKey";
const MAX_COUNT = 16;
const DEFAULT_STRENGTH = "0.4";
const POLL_MS = 1500;
const SILENT_MS = 4000; // a job without a WebSocket event for this long is polled
const FINAL = new Set(["done", "failed", "cancelled", "expired"]);
const EXT = { JPEG: "jpg", PNG: "png", WEBP: "webp" };
const FIELD_INPUT = {
  prompt: "prompt", negative_prompt: "negative_prompt", width: "size", height: "size", steps: "steps",
  seed: "seed", format: "format", use_refiner: "use_refiner", count: "count", n: "count",
  init_image: "init-drop", mask_image: "mask-drop", strength: "strength", hires: "hires", controlnet: "controlnet-model",
};
const FIELD_LABEL = { // the form's names for the request's fields, as errors show them
  prompt: "Prompt", negative_prompt: "Negative prompt", width: "Size", height: "Size", steps: "Steps",
  seed: "Seed", format: "Format", use_refiner: "Refiner", count: "Images", n: "Images", init_image: "Init image",
  mask_image: "Mask", strength: "Strength", model: "Model",
};
const RESTORE_JOBS = 20; // finished images a fresh page shows again from GET /v1/jobs
const MINE_STORE = "imagegen.jobs"; // ids of the jobs this browser submitted, newest last
const MINE_KEPT = 200;
const MASK_NOTE = "Must be the same size as the init image: white areas are redrawn, black ones kept.";
const HEADLINES = {
  0: "Request failed", 400: "The request was refused", 401: "An API key is needed", 403: "Not allowed for this key",
  404: "Not found", 413: "The request is too large", 429: "Too many requests", 503: "The service is unavailable",
};
const TINY_NOTE = "tiny-sdxl: an SDXL-shaped model with small random weights, for machines without a GPU. " +
  "It runs the whole pipeline quickly but draws noise; start the service on a GPU or pass --model for real pictures.";

const $ = (id) => document.getElementById(id);
const jobs = new Map(); // job id -> job record, in submission order
let socket = null;
let socketRetry = 0;
let socketTimer = null;
let modelInfo = null;
let served = {}; // model -> {steps, guidance, refiner, workers}, from /api/ls
let limits = null; // what the service accepts (GET /v1/limits): images per request, steps, pixels
let sizeTouched = false;
let reachable = false; // the last model check got through (with the key, when keys are on)
let restoredFor = null; // the API key the gallery was last restored for
let sizeBeforeInit = null;
const uploads = { init: null, mask: null }; // slot -> { dataUrl, name, bytes, width, height }

function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (value == null || value === false) continue;
    if (name === "class") el.className = value;
    else if (name === "text") el.textContent = value;
    else if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children) if (child != null) el.append(child);
  return el;
}

class ApiError extends Error {
  constructor(status, body) {
    super((body && body.error) || `HTTP ${status}`);
    this.status = status;
    this.field = (body && body.field) || null;
    this.errors = (body && body.errors) || [];
  }
}

/* ---- the API ---------------------------------------------------------------------------------- */

function apiKey() {
  return $("api-key").value.trim();
}

function authHeaders() {
  const key = apiKey();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function api(path, { method = "GET", body } = {}) {
  const headers = authHeaders();
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (err) {
    throw new ApiError(0, { error: `cannot reach the gateway (${err.message})` });
  }
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = { error: text.slice(0, 300) };
  }
  if (!response.ok) {
    let error = (data && data.error) || `${response.status} ${response.statusText}`;
    const retry = response.headers.get("Retry-After");
    if (response.status === 429 && retry) error += ` (retry in ${retry} s)`;
    throw new ApiError(response.status, { ...(data || {}), error });
  }
  return data;
}

async function fetchImage(jobId) {
  let response;
  try {
    response = await fetch(`/v1/jobs/${encodeURIComponent(jobId)}/image`, { headers: authHeaders() });
  } catch (err) {
    throw new ApiError(0, { error: `cannot reach the gateway (${err.message})` });
  }
  if (!response.ok) {
    let body = {};
    try { body = await response.json(); } catch { /* not JSON */ }
    throw new ApiError(response.status, body);
  }
  return response.blob();
}

/* ---- the model -------------------------------------------------------------------------------- */

async function loadModel() {
  const dot = $("model-dot");
  const keyBox = $("api-key").closest(".key-box");
  try {
    const [ps, ls, accepted] = await Promise.all([api("/api/ps"), api("/api/ls"), api("/v1/limits")]);
    applyLimits(accepted);
    served = ls || {};
    keyBox.classList.remove("invalid");
    const select = $("model-select");
    const names = Object.keys(served);
    if (names.length > 1) { // several models: the page picks one per request, the current one at first
      const chosen = names.includes(select.value) ? select.value : ps.model;
      select.replaceChildren(...names.map((name) => h("option", { value: name, text: name })));
      select.value = names.includes(chosen) ? chosen : names[0];
    }
    select.hidden = names.length <= 1;
    $("model").hidden = !select.hidden;
    showModel(select.hidden ? ps.model : select.value, ps);
    dot.className = "dot " + (ps.model ? "ok" : "warn");
    reachable = true;
    connect(); // live from the start, not from the first job
    if (restoredFor !== apiKey()) {
      restoredFor = apiKey();
      restoreJobs();
    }
  } catch (err) {
    reachable = false;
    dot.className = "dot bad";
    $("workers").textContent = "";
    if (err.status === 401) {
      $("model").textContent = "enter an API key";
      keyBox.classList.add("invalid");
    } else {
      $("model").textContent = "unavailable";
    }
    $("model-box").title = err.message;
  }
}

/* What the page shows and offers for a model: its workers, its default steps, its refiner. */
function showModel(name, ps) {
  const info = served[name] || null;
  modelInfo = { ...ps, model: name, refiner: Boolean(info && info.refiner) };
  $("model").textContent = name || "no worker running";
  const workers = info ? info.workers : 0;
  $("workers").textContent = name ? `${workers} worker${workers === 1 ? "" : "s"}` : "";
  $("model-note").textContent = name === "tiny-sdxl" ? TINY_NOTE : "";
  $("model-note").hidden = name !== "tiny-sdxl";
  const steps = info ? info.steps : ps.default_steps;
  $("steps").placeholder = steps ? `default (${steps})` : "default";
  const refiner = $("use_refiner");
  refiner.disabled = Boolean(name) && !modelInfo.refiner;
  if (refiner.disabled) refiner.checked = false;
  $("refiner-note").textContent = refiner.disabled
    ? "no worker has a refiner loaded"
    : "hands the last steps to the SDXL refiner";
  if (name === "tiny-sdxl" && !sizeTouched && $("size").value !== "init") $("size").value = "256x256";
}

function defaultSteps(model) {
  const info = served[model || (modelInfo && modelInfo.model)] || null;
  return (info && info.steps) || (modelInfo && modelInfo.default_steps) || null;
}

/* ---- the form --------------------------------------------------------------------------------- */

function randomSeed() {
  const word = new Uint32Array(1);
  crypto.getRandomValues(word);
  return String(word[0]);
}

function seedsFor(text, count) {
  const given = text.trim();
  const first = given === "" || given === "-1" ? randomSeed() : given; // -1: random, as in AUTOMATIC1111
  if (!/^\d+$/.test(first)) return [first]; // the gateway says what is wrong with it
  const base = BigInt(first);
  return Array.from({ length: count }, (_, i) => (base + BigInt(i)).toString());
}

function readCount() {
  const raw = $("count").value.trim();
  const count = raw === "" ? 1 : Number(raw);
  if (!Number.isInteger(count) || count < 1 || count > MAX_COUNT) {
    const message = `must be a whole number from 1 to ${MAX_COUNT}`;
    throw new ApiError(0, { error: `count: ${message}`, field: "count", errors: [{ field: "count", message }] });
  }
  return count;
}

function readForm() {
  const request = {
    prompt: $("prompt").value,
    negative_prompt: $("negative_prompt").value,
    format: $("format").value,
  };
  const size = $("size").value;
  if (size !== "init") [request.width, request.height] = size.split("x").map(Number); // "init": no size, the init image's is kept
  const steps = $("steps").value.trim();
  if (steps !== "") request.steps = Number(steps);
  if ($("use_refiner").checked) request.use_refiner = true;
  if ($("hires").checked) request.hires = { scale: 2 };
  if ($("controlnet-model").value && controlImage) {
    request.controlnet = { model: $("controlnet-model").value, image: controlImage, preprocessor: $("controlnet-canny").checked ? "canny" : "none" };
  }
  if (!$("model-select").hidden) request.model = $("model-select").value;
  if (uploads.init) {
    request.init_image = uploads.init.dataUrl;
    request.strength = Number($("strength").value);
    if (uploads.mask) request.mask_image = uploads.mask.dataUrl;
  }
  return request;
}

function fillForm(job) {
  const request = job.request;
  $("prompt").value = request.prompt;
  $("negative_prompt").value = request.negative_prompt || "";
  setUpload("init", job.uploads.init);
  setUpload("mask", job.uploads.init ? job.uploads.mask : null);
  if (request.width && request.height) {
    const size = `${request.width}x${request.height}`;
    if (![...$("size").options].some((o) => o.value === size)) {
      $("size").append(h("option", { value: size, text: `${request.width} × ${request.height}` }));
    }
    $("size").value = size;
  } else if (job.uploads.init) {
    $("size").value = "init";
  }
  sizeTouched = true;
  updateSizeNote();
  setStrength(request.strength ?? DEFAULT_STRENGTH);
  $("steps").value = request.steps ?? "";
  $("format").value = request.format;
  const select = $("model-select");
  if (!select.hidden && request.model && served[request.model]) {
    select.value = request.model;
    showModel(request.model, modelInfo);
  }
  $("use_refiner").checked = Boolean(request.use_refiner) && !$("use_refiner").disabled;
  $("hires").checked = Boolean(request.hires);
  $("seed").value = job.seed;
  $("count").value = "1";
  $("prompt").focus();
  window.scrollTo({ top: 0, behavior: "smooth" });
}

/* ---- init image and mask ---------------------------------------------------------------------- */

const SLOT_FIELD = { init: "init_image", mask: "mask_image" };

/* ControlNets: offered when a worker loaded one (GET /v1/workers), with a control image picked here. */
let controlImage = null;

async function loadControlNets() {
  let names = [];
  try {
    const view = await api("/v1/workers");
    names = [...new Set(view.workers.flatMap((w) => w.controlnets || []))].sort();
  } catch {
    names = [];
  }
  const select = $("controlnet-model");
  const chosen = select.value;
  select.replaceChildren(new Option("none", ""), ...names.map((name) => new Option(name, name)));
  select.value = names.includes(chosen) ? chosen : "";
  $("controlnet-row").hidden = names.length === 0;
}

function readAsDataUrl(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

function pictureSize(url) {
  return new Promise((resolve) => {
    const img = new Image();
    img.onload = () => resolve({ width: img.naturalWidth, height: img.naturalHeight });
    img.onerror = () => resolve(null); // the service says what is wrong with it
    img.src = url;
  });
}

function kilobytes(bytes) {
  return bytes < 1024 * 1024 ? `${Math.max(1, Math.round(bytes / 1024))} KB` : `${(bytes / 1024 / 1024).toFixed(1)} MB`;
}

function sizeText(upload) {
  return upload.width ? `${upload.width} × ${upload.height}` : "size unknown";
}

async function takeFile(slot, file, name) {
  const field = SLOT_FIELD[slot];
  if (file.type && !file.type.startsWith("image/")) {
    clearError();
    showError(new ApiError(0, { error: `${field}: ${file.name || "this file"} is ${file.type}, not an image`, field }), "Check the form");
    return;
  }
  let dataUrl = await readAsDataUrl(file);
  if (!dataUrl.startsWith("data:image/")) dataUrl = dataUrl.slice(dataUrl.indexOf(",") + 1); // plain base64
  const size = await pictureSize(dataUrl.startsWith("data:") ? dataUrl : `data:image/png;base64,${dataUrl}`);
  setUpload(slot, { dataUrl, name: name || file.name || "image", bytes: file.size, ...(size || {}) });
}

function setUpload(slot, upload) {
  uploads[slot] = upload || null;
  $(`${slot}-drop`).classList.remove("invalid");
  $(`${slot}-empty`).hidden = Boolean(upload);
  $(`${slot}-set`).hidden = !upload;
  $(`${slot}-file`).value = ""; // the same file can be picked again after a remove
  if (upload) {
    $(`${slot}-thumb`).src = upload.dataUrl.startsWith("data:") ? upload.dataUrl : `data:image/png;base64,${upload.dataUrl}`;
    $(`${slot}-name`).textContent = upload.name;
    $(`${slot}-name`).title = upload.name;
    $(`${slot}-size`).textContent = `${sizeText(upload)} · ${kilobytes(upload.bytes)}`;
  } else {
    $(`${slot}-thumb`).removeAttribute("src");
  }
  if (slot === "init") {
    if (!upload && uploads.mask) setUpload("mask", null); // a mask needs an init image to paint into
    $("init-options").hidden = !upload;
    updateSizeChoice();
  }
  updateMaskNote();
}

function updateSizeChoice() {
  const select = $("size");
  let option = select.querySelector('option[value="init"]');
  const init = uploads.init;
  if (init) {
    if (!option) {
      option = h("option", { value: "init", title: "Send no width or height: the output takes the init image's size" });
      select.prepend(option);
      sizeBeforeInit = select.value;
      select.value = "init"; // the default with an init image: keep its size
    }
    option.textContent = "As init image";
  } else if (option) {
    const chosen = select.value;
    option.remove();
    if (chosen === "init") select.value = sizeBeforeInit || "1024x1024";
  }
  updateSizeNote();
}

function updateSizeNote() {
  const init = uploads.init;
  const side = (n) => Math.max(64, Math.floor(n / 8) * 8); // the service rounds down to multiples of 8
  const fromInit = $("size").value === "init" && init && init.width;
  $("size-note").textContent = fromInit ? `${side(init.width)} × ${side(init.height)}` : "";
}

function updateMaskNote() {
  const { init, mask } = uploads;
  const mismatch = init && mask && init.width && mask.width && (init.width !== mask.width || init.height !== mask.height);
  $("mask-note").textContent = mismatch
    ? `This mask is ${sizeText(mask)} but the init image is ${sizeText(init)}: they must be the same size (white = redraw).`
    : MASK_NOTE;
  $("mask-note").classList.toggle("warn", Boolean(mismatch));
}

function setStrength(value) {
  $("strength").value = String(value);
  $("strength-value").textContent = Number($("strength").value).toFixed(2).replace(/0$/, "");
}

async function useAsInit(job, blob, name) {
  setUpload("init", { dataUrl: await readAsDataUrl(blob), name, bytes: blob.size, width: job.width, height: job.height });
  $("form").closest(".panel").scrollTo({ top: 0, behavior: "smooth" });
  window.scrollTo({ top: 0, behavior: "smooth" });
  const drop = $("init-drop");
  drop.classList.remove("flash");
  void drop.offsetWidth; // restarts the animation
  drop.classList.add("flash");
}

function draggedImage(event) {
  const types = [...(event.dataTransfer ? event.dataTransfer.types : [])];
  return types.includes("Files") || types.includes("text/uri-list");
}

function dropSlot(event) {
  return uploads.init && event.target.closest && event.target.closest("#mask-drop") ? "mask" : "init";
}

async function onDrop(event) {
  endDrag();
  const slot = dropSlot(event);
  const transfer = event.dataTransfer;
  const file = [...transfer.files].find((f) => f.type.startsWith("image/")) || transfer.files[0];
  if (file) {
    event.preventDefault();
    await takeFile(slot, file);
    return;
  }
  const url = (transfer.getData("text/uri-list") || "").split(/\r?\n/).find((line) => line && !line.startsWith("#"));
  if (!url || !/^(blob:|data:image\/)/.test(url)) return; // text dropped into a field stays the browser's
  event.preventDefault(); // a gallery image of this page, or a data URL
  try {
    const blob = await (await fetch(url)).blob();
    const link = [...document.querySelectorAll("#gallery a.download")].find((a) => a.href === url);
    await takeFile(slot, blob, link ? link.download : "dropped image");
  } catch (err) {
    showError(new ApiError(0, { error: `${SLOT_FIELD[slot]}: the dropped image could not be read (${err.message})`, field: SLOT_FIELD[slot] }), "Check the form");
  }
}

let dragDepth = 0;

function endDrag() {
  dragDepth = 0;
  $("form").closest(".panel").classList.remove("dropping");
  for (const el of document.querySelectorAll(".upload.target")) el.classList.remove("target");
}

function watchDrops() {
  const panel = $("form").closest(".panel");
  panel.addEventListener("dragenter", (event) => {
    if (!draggedImage(event)) return;
    event.preventDefault();
    dragDepth += 1;
    panel.classList.add("dropping");
  });
  panel.addEventListener("dragover", (event) => {
    if (!draggedImage(event)) return;
    event.preventDefault();
    event.dataTransfer.dropEffect = "copy";
    const slot = dropSlot(event);
    $("init-drop").classList.toggle("target", slot === "init");
    $("mask-drop").classList.toggle("target", slot === "mask");
  });
  panel.addEventListener("dragleave", () => {
    dragDepth -= 1;
    if (dragDepth <= 0) endDrag();
  });
  panel.addEventListener("drop", onDrop);
  // a file dropped beside the form does not replace the page
  window.addEventListener("dragover", (event) => { if (draggedImage(event)) event.preventDefault(); });
  window.addEventListener("drop", (event) => { if (!panel.contains(event.target)) { event.preventDefault(); endDrag(); } });
  for (const slot of ["init", "mask"]) {
    $(`${slot}-file`).addEventListener("change", (event) => {
      const file = event.target.files[0];
      if (file) takeFile(slot, file);
    });
    $(`${slot}-remove`).addEventListener("click", () => setUpload(slot, null));
  }
  $("strength").addEventListener("input", () => setStrength($("strength").value));
}

function clearError() {
  $("error").hidden = true;
  $("error").replaceChildren();
  for (const el of document.querySelectorAll(".invalid")) el.classList.remove("invalid");
  for (const el of document.querySelectorAll(".field-error")) el.remove();
}

/* The problems an error names, each as { field, label, message }: from the API's `errors` list, or
   from its one message "field: what is wrong". */
function problemsOf(err) {
  let list = err.errors.filter((e) => e && e.field);
  if (!list.length && err.field) {
    const prefix = `${err.field}: `;
    list = [{ field: err.field, message: err.message.startsWith(prefix) ? err.message.slice(prefix.length) : err.message }];
  }
  return list.map((e) => {
    const field = String(e.field).split(".")[0];
    return { field, label: FIELD_LABEL[field] || field, message: e.message };
  });
}

/* Where a field's message goes: below its input (or its upload box, seed row, toggle). */
function fieldAnchor(id) {
  const el = $(id);
  return el.closest(".upload, .seed-row, .toggle") || el;
}

function showError(err, headline) {
  const box = $("error");
  box.replaceChildren(h("strong", { text: headline || HEADLINES[err.status] || `The gateway answered ${err.status}` }));
  const problems = problemsOf(err);
  if (problems.length > 1) {
    box.append(h("ul", {}, ...problems.map((p) => h("li", { text: `${p.label}: ${p.message}` }))));
  } else if (problems.length === 1) {
    box.append(document.createTextNode(`${problems[0].label}: ${problems[0].message}`));
  } else {
    box.append(document.createTextNode(err.message));
  }
  box.hidden = false;
  let first = null;
  const shown = new Set();
  for (const p of problems) {
    const id = FIELD_INPUT[p.field];
    if (!id) continue;
    $(id).classList.add("invalid");
    const anchor = fieldAnchor(id);
    const note = h("p", { class: "field-error", "data-field": p.field, role: "alert", text: `${p.label}: ${p.message}` });
    if (!shown.has(anchor)) anchor.after(note);
    else anchor.nextElementSibling.append(` ${p.message}`);
    shown.add(anchor);
    first = first || anchor;
  }
  if (first) { // the field and its message in sight, in the form's own scroll area and on the page
    first.scrollIntoView({ block: "center", behavior: "smooth" });
    const input = $(FIELD_INPUT[problems.find((p) => FIELD_INPUT[p.field]).field]);
    if (input.focus && !input.classList.contains("upload")) input.focus({ preventScroll: true });
  } else {
    box.scrollIntoView({ block: "nearest" });
  }
  if (err.status === 413) { // the body: most often an upload too large
    for (const slot of ["init", "mask"]) if (uploads[slot]) $(`${slot}-drop`).classList.add("invalid");
  }
  if (err.status === 401) {
    $("api-key").closest(".key-box").classList.add("invalid");
    $("api-key").focus();
  }
}

/* Images one request may ask for: the service's limit, or one at a time until it is known. */
function perRequest() {
  return (limits && limits.max_images) || 1;
}

/* The service's limits on the form: sizes over its pixel budget or longest side cannot be picked. */
function applyLimits(accepted) {
  limits = accepted;
  $("steps").title = `1 to ${accepted.max_steps} steps`;
  for (const option of $("size").options) {
    const [width, height] = option.value.split("x").map(Number);
    if (!width || !height) continue;
    const over = width * height > accepted.max_pixels || Math.max(width, height) > accepted.max_side;
    option.disabled = over;
    option.title = over ? `over this service's limit of ${accepted.max_pixels} pixels` : "";
  }
}

/* One request per perRequest() seeds: `n` images with seeds seed, seed+1, ..., which the service
   queues as one group (the init image and mask are sent, and stored, once per group). */
async function submitAll(request, seeds, given = { init: uploads.init, mask: uploads.mask }) {
  clearError();
  const button = $("generate");
  button.disabled = true;
  try {
    const group = perRequest();
    for (let i = 0; i < seeds.length; i += group) {
      const chunk = seeds.slice(i, i + group);
      const body = { ...request, seed: chunk[0] };
      if (chunk.length > 1) body.n = chunk.length;
      const view = await api("/v1/jobs", { method: "POST", body });
      const ids = view.job_ids || [view.job_id];
      ids.forEach((id, k) => {
        const member = k === 0 ? view : { job_id: id, state: "queued", request: view.request, seed: chunk[k] };
        addJob(member, { ...request, seed: chunk[k] }, given);
      });
    }
  } catch (err) {
    showError(err);
  } finally {
    button.disabled = false;
  }
}

async function generate(event) {
  event.preventDefault();
  clearError();
  let count;
  try {
    count = readCount();
  } catch (err) {
    showError(err, "Check the form");
    return;
  }
  await submitAll(readForm(), seedsFor($("seed").value, count));
}

/* ---- jobs ------------------------------------------------------------------------------------- */

const STATE_RANK = { queued: 0, running: 1 };

function etaAt(seconds) {
  return typeof seconds === "number" && isFinite(seconds) ? performance.now() + seconds * 1000 : null;
}

function duration(seconds) {
  if (seconds < 10) return `${seconds.toFixed(1)} s`;
  if (seconds < 90) return `${Math.round(seconds)} s`;
  return `${Math.floor(seconds / 60)} min ${Math.round(seconds % 60)} s`;
}

function jobCard(job) {
  const card = {};
  card.preview = h("img", { class: "preview", alt: "live preview", hidden: true });
  card.badge = h("span", { class: "badge" });
  card.cancel = h("button", { class: "ghost danger cancel", type: "button", text: "Cancel", onclick: () => cancel(job) });
  card.dismiss = h("button", { class: "ghost dismiss", type: "button", text: "Dismiss", hidden: true,
    onclick: () => { card.root.remove(); updateEmpty(); } });
  card.where = h("span", { class: "where" });
  card.eta = h("span", { class: "eta" });
  card.fill = h("div");
  card.bar = h("div", { class: "bar", role: "progressbar", "aria-valuemin": 0, "aria-valuemax": 100 }, card.fill);
  card.reason = h("p", { class: "reason", hidden: true });
  const r = job.request;
  const init = job.uploads.init;
  card.root = h("article", { class: "job", "data-job-id": job.id, "data-mode": job.mode || null },
    h("div", { class: "thumb" },
      init ? h("img", { class: "init", alt: "init image", src: thumbUrl(init) }) : null,
      card.preview,
      job.mode ? h("span", { class: "mode", text: MODE_TAG[job.mode], title: modeTitle(job) }) : null),
    h("div", { class: "job-body" },
      h("div", { class: "job-head" }, card.badge, h("span", { class: "seed-tag", text: `seed ${job.seed}` }), card.cancel, card.dismiss),
      h("p", { class: "prompt", text: r.prompt, title: r.prompt }),
      h("div", { class: "status-line" }, card.where, card.eta),
      card.bar,
      card.reason));
  return card;
}

function render(job) {
  const card = job.card;
  const label = job.cancelling && !job.final ? "cancelling" : job.state;
  card.badge.textContent = label;
  card.badge.className = `badge ${job.state}`;
  card.root.dataset.state = job.state;
  card.root.classList.toggle("final", job.final);
  if (job.state === "queued") {
    const ahead = job.position;
    card.where.textContent = ahead == null ? "in queue" : `#${ahead + 1} in queue`;
    card.where.title = ahead == null ? "" : `${ahead} job${ahead === 1 ? "" : "s"} ahead`;
  } else if (job.state === "running") {
    card.where.textContent = job.total ? `step ${job.step}/${job.total}` : "starting";
  } else if (job.state === "done") {
    card.where.textContent = job.reason ? "" : "fetching the image";
  } else if (job.state === "cancelled") { // the badge says cancelled: this line says when
    card.where.textContent = job.step && job.total ? `stopped at step ${job.step}/${job.total}` : "before it started";
  } else {
    card.where.textContent = ""; // failed or expired: the badge, and the reason below
  }
  const remaining = job.etaAt == null ? null : Math.max(0, (job.etaAt - performance.now()) / 1000);
  card.eta.textContent = job.final || remaining == null ? "" : `ETA ${duration(remaining)}`;
  const percent = job.state === "done" ? 100 : job.total ? Math.min(100, (100 * job.step) / job.total) : 0;
  card.fill.style.width = `${percent}%`;
  card.bar.setAttribute("aria-valuenow", String(Math.round(percent)));
  card.bar.classList.toggle("waiting", job.state === "queued");
  if (job.preview) {
    card.preview.src = job.preview;
    card.preview.hidden = false;
  }
  card.cancel.hidden = job.final;
  card.cancel.disabled = Boolean(job.cancelling);
  card.dismiss.hidden = !job.final || (job.state === "done" && !job.reason);
  const reason = job.reason && job.reason !== job.state ? job.reason : ""; // "cancelled" once, in the badge
  card.reason.textContent = reason;
  card.reason.hidden = !reason;
}

const MODE_TAG = { "image-to-image": "img2img", inpainting: "inpaint" };

function modeOf(request) {
  if (!request.init_image) return null;
  return request.mask_image ? "inpainting" : "image-to-image";
}

function modeTitle(job) {
  return `${job.mode}, strength ${job.request.strength}`;
}

function thumbUrl(upload) {
  return upload.dataUrl.startsWith("data:") ? upload.dataUrl : `data:image/png;base64,${upload.dataUrl}`;
}

function addJob(view, request, given) {
  const sized = view.request || {}; // the service's copy: with an init image, the size it settled on
  const job = {
    id: view.job_id,
    request,
    uploads: { init: request.init_image ? given.init : null, mask: request.mask_image ? given.mask : null },
    mode: modeOf(request),
    width: sized.width || request.width,
    height: sized.height || request.height,
    seed: request.seed ?? String(view.seed),
    askedSteps: sized.steps || defaultSteps(request.model),
    state: view.state,
    position: view.position,
    etaAt: etaAt(view.eta_s),
    step: view.step || 0,
    total: view.total_steps || null,
    final: false,
    lastEvent: performance.now(),
  };
  job.card = jobCard(job);
  jobs.set(job.id, job);
  remember(job.id);
  $("jobs").append(job.card.root);
  render(job);
  updateEmpty();
  follow(job.id);
  if (FINAL.has(view.state)) applyView(job, view);
}

function advance(job, state) {
  if (FINAL.has(state)) return;
  if ((STATE_RANK[state] ?? 0) >= (STATE_RANK[job.state] ?? 0)) job.state = state;
}

function onEvent(event) {
  if (event.type === "error" && !event.job_id) {
    showError(new ApiError(0, { error: event.error }), "Live updates stopped");
    return;
  }
  const job = jobs.get(event.job_id);
  if (!job || job.final) return;
  job.lastEvent = performance.now();
  switch (event.type) {
    case "queued":
      advance(job, "queued");
      if (job.state === "queued") {
        job.position = event.position ?? job.position;
        job.etaAt = etaAt(event.eta_s) ?? job.etaAt;
      }
      break;
    case "started":
      advance(job, "running");
      job.total = event.total || job.total;
      job.step = 0;
      break;
    case "progress":
      advance(job, "running");
      job.step = Math.max(job.step, event.step || 0);
      job.total = event.total || job.total;
      job.etaAt = etaAt(event.eta_s) ?? job.etaAt;
      break;
    case "preview":
      advance(job, "running");
      if (event.preview) job.preview = `data:image/jpeg;base64,${event.preview}`;
      break;
    case "error":
      job.reason = event.error;
      break;
    default:
      if (FINAL.has(event.type)) {
        finish(job, event.type, event.reason, event.timings && event.timings.total_s);
        return;
      }
  }
  render(job);
}

function applyView(job, view) {
  if (job.final) return;
  if (FINAL.has(view.state)) {
    const took = view.finished_at && view.started_at ? view.finished_at - view.started_at : null;
    finish(job, view.state, view.error, took);
    return;
  }
  advance(job, view.state);
  if (job.state === "queued") job.position = view.position;
  if (view.total_steps) job.total = view.total_steps;
  job.step = Math.max(job.step, view.step || 0);
  job.etaAt = etaAt(view.eta_s) ?? job.etaAt;
  render(job);
}

async function finish(job, state, reason, tookSeconds) {
  if (job.final) return;
  job.final = true;
  job.state = state;
  job.reason = state === "done" ? "" : reason || "";
  job.took = tookSeconds;
  render(job);
  if (state === "done") {
    try {
      addToGallery(job, await fetchImage(job.id));
      job.card.root.remove();
    } catch (err) {
      job.reason = `the image could not be loaded: ${err.message}`;
      render(job);
    }
  }
  updateEmpty();
}

async function cancel(job) {
  job.cancelling = true;
  render(job);
  try {
    applyView(job, await api(`/v1/jobs/${encodeURIComponent(job.id)}/cancel`, { method: "POST" }));
  } catch (err) {
    job.cancelling = false;
    job.reason = `cancel failed: ${err.message}`;
    render(job);
  }
}

async function poll() {
  const now = performance.now();
  const open = socket && socket.readyState === WebSocket.OPEN;
  const due = [...jobs.values()].filter(
    (j) => !j.final && !j.polling && (!open || now - j.lastEvent > SILENT_MS), // the socket brings queue moves too
  );
  await Promise.all(due.slice(0, 8).map(async (job) => {
    job.polling = true;
    try {
      applyView(job, await api(`/v1/jobs/${encodeURIComponent(job.id)}`));
    } catch (err) {
      if (err.status === 404) finish(job, "failed", "the gateway no longer knows this job");
    } finally {
      job.polling = false;
    }
  }));
}

/* ---- live updates over one WebSocket ---------------------------------------------------------- */

function activeIds() {
  return [...jobs.values()].filter((j) => !j.final).map((j) => j.id);
}

function setLive(on) {
  $("live").textContent = on ? "live" : "offline";
  $("live").classList.toggle("on", on);
}

function connect() {
  if (socket) return;
  clearTimeout(socketTimer);
  socketTimer = null;
  const ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/v1/ws`);
  socket = ws;
  ws.onopen = () => {
    const key = apiKey();
    if (key) ws.send(JSON.stringify({ key })); // browsers cannot set headers on a WebSocket
    const ids = activeIds();
    if (ids.length) ws.send(JSON.stringify({ follow: ids }));
    socketRetry = 0;
    setLive(true);
  };
  ws.onmessage = (message) => {
    let event;
    try {
      event = JSON.parse(message.data);
    } catch {
      return;
    }
    onEvent(event);
  };
  ws.onclose = () => {
    if (socket === ws) socket = null;
    setLive(false);
    if ((reachable || activeIds().length) && !socketTimer) {
      const delay = Math.min(10000, 500 * 2 ** socketRetry++);
      socketTimer = setTimeout(() => { socketTimer = null; connect(); }, delay);
    }
  };
}

function follow(jobId) {
  if (socket && socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify({ follow: [jobId] }));
  else connect(); // on open it follows every unfinished job
}

/* ---- a fresh page: the caller's recent jobs ---------------------------------------------------- */

function mine() {
  try {
    return JSON.parse(localStorage.getItem(MINE_STORE) || "[]");
  } catch {
    return [];
  }
}

function remember(jobId) {
  const ids = mine().filter((id) => id !== jobId);
  ids.push(jobId);
  localStorage.setItem(MINE_STORE, JSON.stringify(ids.slice(-MINE_KEPT)));
}

/* The caller's recent jobs from GET /v1/jobs (with a key: the key's jobs, from any browser; without
   keys, where every caller is one, the jobs this browser submitted): unfinished ones as cards that
   follow on, the last RESTORE_JOBS finished images in the gallery, oldest first so the newest ends
   on top. An image-to-image job comes back without its init image (the view does not carry it). */
async function restoreJobs() {
  let views;
  try {
    views = await api(`/v1/jobs?limit=${MINE_KEPT}`);
  } catch {
    return; // the page works without its history
  }
  if (!apiKey()) {
    const ours = new Set(mine());
    views = views.filter((v) => ours.has(v.job_id));
  }
  const known = (id) => jobs.has(id) || document.querySelector(`#gallery figure[data-job-id="${CSS.escape(id)}"]`);
  const wanted = views.filter((v) => !known(v.job_id) && (v.state === "done" || !FINAL.has(v.state)));
  const done = wanted.filter((v) => v.state === "done").slice(0, RESTORE_JOBS).reverse();
  const blobs = await Promise.all(done.map((v) => fetchImage(v.job_id).catch(() => null)));
  done.forEach((view, i) => {
    if (blobs[i] && !known(view.job_id)) addToGallery(restoredJob(view), blobs[i]);
  });
  for (const view of wanted.filter((v) => !FINAL.has(v.state)).reverse()) {
    if (!known(view.job_id)) addJob(view, restoredRequest(view), { init: null, mask: null });
  }
  updateEmpty();
}

function restoredRequest(view) {
  const r = { ...view.request, seed: String(view.seed) };
  if (view.init_image) r.init_image = "kept by the service"; // marks the mode; the data is not in the view
  if (view.mask_image) r.mask_image = "kept by the service";
  return r;
}

function restoredJob(view) {
  const request = restoredRequest(view);
  return {
    id: view.job_id,
    request,
    uploads: { init: null, mask: null },
    mode: modeOf(request),
    width: view.request.width,
    height: view.request.height,
    seed: String(view.seed),
    askedSteps: view.request.steps || null,
    total: view.total_steps || null,
    took: view.finished_at && view.started_at ? view.finished_at - view.started_at : null,
    restored: true,
  };
}

/* ---- the gallery ------------------------------------------------------------------------------ */

const USE_INIT_ICON = '<svg viewBox="0 0 24 24" aria-hidden="true"><path d="M4 5h11v2H6v10h10v-3h2v5H4zm12-2l5 4-5 4V8h-4V6h4z"/></svg>';

function addToGallery(job, blob) {
  const r = job.request;
  const url = URL.createObjectURL(blob);
  const name = `imagegen-${job.seed}-${job.width}x${job.height}.${EXT[r.format] || "img"}`;
  const params = [
    `seed ${job.seed}`,
    `${job.width}×${job.height}`,
    stepsText(job),
    r.format,
    job.mode,
    r.use_refiner ? "refiner" : null,
    typeof job.took === "number" ? duration(job.took) : null,
  ].filter(Boolean);
  const title = r.negative_prompt ? `${r.prompt}\nnot: ${r.negative_prompt}` : r.prompt;
  const useInit = h("button", { class: "use-init", type: "button", title: "Use as init image: the next images start from this one",
    "aria-label": "Use as init image", onclick: () => useAsInit(job, blob, name) });
  useInit.innerHTML = `${USE_INIT_ICON}<span>Use as init</span>`;
  const figure = h("figure", { class: "shot", "data-job-id": job.id, "data-seed": job.seed, "data-mode": job.mode || null },
    h("div", { class: "frame" },
      h("img", { class: "result", src: url, alt: r.prompt, width: job.width, height: job.height }),
      job.mode ? h("span", { class: "mode", text: MODE_TAG[job.mode], title: modeTitle(job) }) : null,
      useInit),
    h("figcaption", {},
      h("p", { class: "prompt", text: r.prompt, title }),
      h("div", { class: "params" }, ...params.map((text) => h("span", { text }))),
      h("div", { class: "actions" },
        h("a", { class: "ghost download", href: url, download: name, text: "Download" }),
        job.mode && !job.uploads.init ? null : h("button", { class: "ghost rerun", type: "button", text: "Re-run",
          title: "Generate again with the same seed and settings", onclick: () => submitAll(r, [job.seed], job.uploads) }),
        h("button", { class: "ghost reuse", type: "button", text: "Edit", title: "Put these settings in the form",
          onclick: () => fillForm(job) }))));
  $("gallery").prepend(figure);
}

/* "30 steps"; image-to-image runs only strength x steps of them: "8 steps at strength 0.4: 3 run". */
function stepsText(job) {
  const r = job.request;
  const asked = r.steps || job.askedSteps || null;
  if (!job.mode) return asked || job.total ? `${job.total || asked} steps` : null;
  const run = job.total ? `: ${job.total} run` : "";
  return asked ? `${asked} steps at strength ${r.strength}${run}` : `strength ${r.strength}${run}`;
}

function updateEmpty() {
  $("jobs-empty").hidden = $("jobs").children.length > 0;
  const images = $("gallery").children.length;
  $("gallery-empty").hidden = images > 0;
  $("gallery-count").textContent = images ? `${images} image${images === 1 ? "" : "s"}` : "";
}

/* ---- start ------------------------------------------------------------------------------------ */

function start() {
  const keyField = $("api-key");
  keyField.value = localStorage.getItem(KEY_STORE) || "";
  let keyTimer = null;
  keyField.addEventListener("input", () => {
    const key = apiKey();
    if (key) localStorage.setItem(KEY_STORE, key);
    else localStorage.removeItem(KEY_STORE);
    keyField.closest(".key-box").classList.remove("invalid");
    clearTimeout(keyTimer);
    keyTimer = setTimeout(() => {
      loadModel();
      if (socket) socket.close(); // reconnects with the new key while jobs are unfinished
    }, 400);
  });
  $("form").addEventListener("submit", generate);
  $("model-select").addEventListener("change", () => showModel($("model-select").value, modelInfo));
  watchDrops();
  setStrength(DEFAULT_STRENGTH);
  updateMaskNote();
  $("size").addEventListener("change", () => { sizeTouched = true; updateSizeNote(); });
  $("random-seed").addEventListener("click", () => { $("seed").value = randomSeed(); });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("form").requestSubmit();
  });
  for (const id of new Set(Object.values(FIELD_INPUT))) {
    $(id).addEventListener("input", () => {
      $(id).classList.remove("invalid");
      const next = fieldAnchor(id).nextElementSibling;
      if (next && next.classList.contains("field-error")) next.remove();
    });
  }
  updateEmpty();
  loadModel();
  loadControlNets();
  setInterval(loadControlNets, 15000);
  $("controlnet-image").addEventListener("change", async (event) => {
    const file = event.target.files[0];
    controlImage = file ? await readAsDataUrl(file) : null;
  });
  setInterval(loadModel, 15000);
  setInterval(poll, POLL_MS);
  setInterval(() => { for (const job of jobs.values()) if (!job.final) render(job); }, 500);
}

start();
