// medplib's web page: open an image, mark regions, ask or segment, see the masks.
// Plain JS, no build step, no outside request: everything goes to this server's /v1 API.
"use strict";

const PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45"];
const $ = (id) => document.getElementById(id);

const state = {
  file: null,          // {name, base64}: the upload, held in this page's memory only
  options: {},         // load options sent with the image: frame, slice_index, axis, window
  render: null,        // the server's RenderResponse for what is shown
  regions: [],         // {kind, points|box, labels?} in image pixels
  masks: [],           // {mask: {size, counts}, pixels: Uint8Array, color, label, visible}
  history: [],         // ChatMessage list: earlier VQA turns about this image
  zoom: 1,
  zoomSet: false,      // the user zoomed: a new image keeps the zoom instead of fitting
  tool: "point",
  apiKey: null,
  busy: false,
  highlighted: null,
};

// ---- the API ------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, kind, message) { super(message); this.status = status; this.kind = kind; }
}

function headers() {
  const h = { "Content-Type": "application/json" };
  if (state.apiKey) h["Authorization"] = "Bearer " + state.apiKey;
  return h;
}

async function failure(response) {
  let body = null;
  try { body = await response.json(); } catch (_) { /* not JSON */ }
  const kind = body && body.error ? body.error : "http_" + response.status;
  const message = body && body.message ? body.message : `the server answered HTTP ${response.status}`;
  return new ApiError(response.status, kind, message);
}

// A call that asks for the API key on 401 and then sends the call again.
async function call(send) {
  for (;;) {
    const response = await send();
    if (response.status === 401) {
      if (await askForKey()) continue;
      throw await failure(response);  // the dialog was dismissed: the call fails with the server's words
    }
    if (!response.ok) throw await failure(response);
    return response;
  }
}

async function getJSON(path) {
  return (await call(() => fetch(path, { headers: headers() }))).json();
}

async function postJSON(path, body) {
  return (await call(() => fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body) }))).json();
}

// Server-sent events of a streamed answer: onDelta(text) per piece; returns the final result.
async function postStream(path, body, onDelta) {
  const response = await call(() => fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body) }));
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data += line.slice(5).trimStart();
      }
      const payload = JSON.parse(data);
      if (event === "delta") {
        onDelta(payload.text);
        // Pieces that arrived together are still shown one by one: a task per piece lets it paint.
        await new Promise((resolve) => setTimeout(resolve, 0));
      }
      else if (event === "result") return payload;
      else if (event === "error") throw new ApiError(500, payload.error, payload.message);
    }
    if (done) throw new ApiError(502, "internal", "the answer's stream ended without a result");
  }
}

function askForKey() {
  return new Promise((resolve) => {
    const dialog = $("key-dialog");
    $("key-error").hidden = state.apiKey === null;
    $("key-error").textContent = "That key was refused; try again.";
    $("api-key").value = "";
    dialog.onclose = () => {
      const key = $("api-key").value.trim();
      if (key) state.apiKey = key;
      resolve(key !== "");
    };
    dialog.showModal();
  });
}

// Plain words for an API error, by its kind.
function explain(error) {
  if (!(error instanceof ApiError)) return "The server could not be reached: " + error.message;
  const lead = {
    region: "A region does not fit the image",
    image_too_large: "The image is too large",
    payload_too_large: "The file is too large to send",
    capacity: "The request is over the server's limits",
    unsupported_format: "This file format cannot be read",
    invalid_input: "The server could not use this input",
    invalid_request: "The request was not understood",
    unauthorized: "The API key was refused",
    timeout: "The server took too long",
    unavailable: "The server is busy",
  }[error.kind] || "The request failed";
  return `${lead}: ${error.message}`;
}

function showError(where, error) {
  const element = $(where);
  element.textContent = typeof error === "string" ? error : explain(error);
  element.hidden = false;
}

function clearError(where) { $(where).hidden = true; $(where).textContent = ""; }

// ---- opening and rendering an image ----------------------------------------------------------------

function toBase64(buffer) {
  const bytes = new Uint8Array(buffer);
  let text = "";
  for (let i = 0; i < bytes.length; i += 0x8000) text += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  return btoa(text);
}

function imageInput() {
  const input = { base64: state.file.base64 };
  for (const [key, value] of Object.entries(state.options)) if (value !== null && value !== "") input[key] = value;
  return input;
}

async function openFile(file) {
  clearError("file-error");
  const previous = state.file;
  state.file = { name: file.name, base64: toBase64(await file.arrayBuffer()) };
  state.options = { window: $("window").value || null };
  try {
    await renderImage(true);
  } catch (error) {
    state.file = previous;  // the image on screen stays, and so does everything about it
    showError("file-error", error);
  }
}

async function renderImage(newImage) {
  const shown = await postJSON("/v1/render", { image: imageInput() });
  const sizeChanged = !state.render || state.render.width !== shown.width || state.render.height !== shown.height;
  state.render = shown;
  await drawImage(shown.png, shown.width, shown.height);
  if (newImage || sizeChanged) state.regions = [];
  state.masks = [];
  state.history = [];
  if (newImage) addDivider(`${state.file.name}`);
  updateControls();
  drawRegions(); drawMasks(); listRegions(); listMasks();
}

function drawImage(url, width, height) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => {
      for (const id of ["image-canvas", "mask-canvas"]) { $(id).width = width; $(id).height = height; }
      $("image-canvas").getContext("2d").drawImage(img, 0, 0);
      $("stack").classList.add("loaded");
      $("placeholder").hidden = true;
      if (!state.zoomSet) fitZoom();
      applyZoom();
      resolve();
    };
    img.onerror = () => reject(new Error("the rendered image could not be shown"));
    img.src = url;
  });
}

function updateControls() {
  const r = state.render;
  $("frame-control").hidden = r.num_frames <= 1;
  $("frame").max = r.num_frames - 1;
  $("frame").value = r.frame || 0;
  $("frame-value").textContent = `${(r.frame || 0) + 1} / ${r.num_frames}`;
  const volume = Object.keys(r.num_slices).length > 0;
  $("axis-control").hidden = !volume;
  $("slice-control").hidden = !volume;
  if (volume) {
    $("axis").value = r.axis;
    $("slice").max = r.num_slices[r.axis] - 1;
    $("slice").value = r.slice_index;
    $("slice-value").textContent = `${r.slice_index + 1} / ${r.num_slices[r.axis]}`;
  }
  const select = $("window");
  if (select.options.length === 1) for (const name of r.window_presets) select.add(new Option(name, name));
  const parts = [r.format.toUpperCase(), `${r.width}×${r.height}`, r.modality, r.description];
  if (r.window) parts.push(`window ${r.window.map((v) => Math.round(v)).join("/")}`);
  $("image-info").textContent = parts.filter(Boolean).join(" · ");
}

async function changeView(change) {
  if (!state.file) return;
  clearError("file-error");
  const before = { ...state.options };
  Object.assign(state.options, change);
  try {
    await renderImage(false);
  } catch (error) {
    state.options = before;
    showError("file-error", error);
  }
}

// ---- zoom ---------------------------------------------------------------------------------------

function fitZoom() {
  const viewport = $("viewport");
  const r = state.render;
  state.zoom = Math.max(0.1, Math.min((viewport.clientWidth - 8) / r.width, (viewport.clientHeight - 8) / r.height));
}

function applyZoom() {
  const r = state.render;
  if (!r) return;
  $("stack").style.width = `${r.width * state.zoom}px`;
  $("stack").style.height = `${r.height * state.zoom}px`;
  $("zoom-value").textContent = `${Math.round(state.zoom * 100)}%`;
  drawRegions();
}

function zoomBy(factor) { state.zoomSet = true; state.zoom = Math.min(32, Math.max(0.1, state.zoom * factor)); applyZoom(); }

// ---- regions ------------------------------------------------------------------------------------

function imagePoint(event) {
  const rect = $("region-canvas").getBoundingClientRect();
  const x = (event.clientX - rect.left) / rect.width * state.render.width;
  const y = (event.clientY - rect.top) / rect.height * state.render.height;
  return [Math.round(x * 10) / 10, Math.round(y * 10) / 10];
}

let stroke = null;  // the box or shape being dragged

function pointerDown(event) {
  if (!state.render || event.button !== 0) return;
  event.preventDefault();
  const p = imagePoint(event);
  if (state.tool === "point") { state.regions.push({ kind: "point", points: [p], labels: [1] }); regionsChanged(); return; }
  if (state.tool === "negative") {
    const last = [...state.regions].reverse().find((region) => region.kind === "point");
    if (!last) { showError("ask-error", "Place a + point first: a − point takes away from the last point region."); return; }
    last.points.push(p); last.labels.push(0); regionsChanged(); return;
  }
  stroke = { kind: state.tool, points: [p] };
  window.addEventListener("pointermove", pointerMove);
  window.addEventListener("pointerup", pointerUp, { once: true });
}

function pointerMove(event) {
  if (!stroke) return;
  const p = imagePoint(event);
  if (stroke.kind === "box") stroke.points[1] = p; else stroke.points.push(p);
  drawRegions();
}

function pointerUp(event) {
  window.removeEventListener("pointermove", pointerMove);
  if (!stroke) return;
  const p = imagePoint(event);
  const done = stroke;
  stroke = null;
  if (done.kind === "box") {
    const [a] = done.points;
    const box = [Math.min(a[0], p[0]), Math.min(a[1], p[1]), Math.max(a[0], p[0]), Math.max(a[1], p[1])];
    if (box[2] - box[0] >= 1 && box[3] - box[1] >= 1) state.regions.push({ kind: "box", box });
  } else {
    const last = done.points[done.points.length - 1];
    if (last[0] !== p[0] || last[1] !== p[1]) done.points.push(p);
    if (done.points.length >= 3) state.regions.push({ kind: "polygon", points: done.points });
  }
  regionsChanged();
}

function regionsChanged() { clearError("ask-error"); drawRegions(); listRegions(); }

function regionAnchor(region) {
  if (region.kind === "box") return [region.box[0], region.box[1]];
  return region.points[0];
}

function drawRegions() {
  const canvas = $("region-canvas");
  if (!state.render) return;
  // At screen resolution (not the image's), so marks and numbers stay crisp and the same size at any zoom.
  canvas.width = Math.round(state.render.width * state.zoom);
  canvas.height = Math.round(state.render.height * state.zoom);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(state.zoom, 0, 0, state.zoom, 0, 0);
  const unit = 1 / state.zoom;
  const shapes = [...state.regions.map((region, i) => [region, i + 1]), ...(stroke ? [[strokeShape(), null]] : [])];
  for (const [region, number] of shapes) {
    ctx.lineWidth = 2 * unit;
    ctx.strokeStyle = "#ffd400";
    ctx.fillStyle = "rgba(255, 212, 0, 0.15)";
    ctx.beginPath();
    if (region.kind === "box") {
      const [x0, y0, x1, y1] = region.box;
      ctx.rect(x0, y0, x1 - x0, y1 - y0);
      ctx.fill(); ctx.stroke();
    } else if (region.kind === "polygon") {
      region.points.forEach(([x, y], i) => (i ? ctx.lineTo(x, y) : ctx.moveTo(x, y)));
      if (number) ctx.closePath();
      ctx.fill(); ctx.stroke();
    } else {
      region.points.forEach(([x, y], i) => {
        ctx.beginPath();
        ctx.arc(x, y, 4 * unit, 0, 2 * Math.PI);
        ctx.fillStyle = region.labels[i] ? "#2ecc40" : "#ff4136";
        ctx.fill(); ctx.stroke();
      });
    }
    if (number) {
      const [x, y] = regionAnchor(region);
      ctx.font = `bold ${Math.round(14 * unit)}px system-ui, sans-serif`;
      ctx.lineWidth = 3 * unit; ctx.strokeStyle = "#000"; ctx.fillStyle = "#ffd400";
      ctx.strokeText(String(number), x + 5 * unit, y - 5 * unit);
      ctx.fillText(String(number), x + 5 * unit, y - 5 * unit);
    }
  }
}

function strokeShape() {
  const [a, b] = stroke.points;
  if (stroke.kind === "box") {
    const c = b || a;
    return { kind: "box", box: [Math.min(a[0], c[0]), Math.min(a[1], c[1]), Math.max(a[0], c[0]), Math.max(a[1], c[1])] };
  }
  return { kind: "polygon", points: stroke.points };
}

function describeRegion(region) {
  const r = (v) => Math.round(v);
  if (region.kind === "box") return `box (${region.box.map(r).join(", ")})`;
  if (region.kind === "polygon") return `shape, ${region.points.length} points`;
  const negatives = region.labels.filter((label) => !label).length;
  return `point (${region.points[0].map(r).join(", ")})` + (negatives ? `, ${negatives} excluded` : "");
}

function listRegions() {
  const list = $("regions");
  list.replaceChildren(...state.regions.map((region, i) => {
    const item = document.createElement("li");
    item.textContent = describeRegion(region) + " ";
    const remove = document.createElement("button");
    remove.textContent = "remove";
    remove.title = `remove region ${i + 1}`;
    remove.onclick = () => { state.regions.splice(i, 1); regionsChanged(); };
    item.append(remove);
    return item;
  }));
}

// ---- masks --------------------------------------------------------------------------------------

// COCO compressed RLE -> column-major run lengths -> a row-major 0/1 array.
function decodeRle({ size: [height, width], counts }) {
  const runs = [];
  let p = 0;
  while (p < counts.length) {
    let x = 0, k = 0, more = true;
    while (more) {
      const c = counts.charCodeAt(p) - 48;
      x |= (c & 0x1f) << (5 * k);
      more = (c & 0x20) !== 0;
      p += 1; k += 1;
      if (!more && (c & 0x10)) x |= -1 << (5 * k);
    }
    if (runs.length > 2) x += runs[runs.length - 2];
    runs.push(x);
  }
  const pixels = new Uint8Array(height * width);
  let index = 0;
  runs.forEach((run, i) => {
    if (i % 2) for (let j = index; j < index + run; j++) pixels[(j % height) * width + Math.floor(j / height)] = 1;
    index += run;
  });
  return pixels;
}

function hexToRgb(hex) { return [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16)); }

function drawMasks() {
  const canvas = $("mask-canvas");
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  canvas.style.opacity = $("show-masks").checked ? $("opacity").value / 100 : 0;
  if (!state.render) return;
  const { width, height } = state.render;
  const image = ctx.createImageData(width, height);
  state.masks.forEach((mask, k) => {
    if (!mask.visible || (state.highlighted !== null && state.highlighted !== k)) return;
    const [r, g, b] = hexToRgb(mask.color);
    for (let i = 0; i < mask.pixels.length; i++) {
      if (!mask.pixels[i]) continue;
      image.data[4 * i] = r; image.data[4 * i + 1] = g; image.data[4 * i + 2] = b; image.data[4 * i + 3] = 255;
    }
  });
  ctx.putImageData(image, 0, 0);
}

function highlight(k) {
  state.highlighted = k;
  if (k !== null) { $("show-masks").checked = true; state.masks[k].visible = true; }
  document.querySelectorAll(".seg-chip").forEach((chip) => {
    const active = Number(chip.dataset.mask) === k;
    chip.classList.toggle("active", active);
    chip.style.background = active ? chip.style.borderColor : "";
  });
  drawMasks(); listMasks();
}

function download(name, blob) {
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = name;
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 1000);
}

function maskPng(mask) {
  const { width, height } = state.render;
  const canvas = document.createElement("canvas");
  canvas.width = width; canvas.height = height;
  const ctx = canvas.getContext("2d");
  const image = ctx.createImageData(width, height);
  for (let i = 0; i < mask.pixels.length; i++) {
    const v = mask.pixels[i] ? 255 : 0;
    image.data[4 * i] = v; image.data[4 * i + 1] = v; image.data[4 * i + 2] = v; image.data[4 * i + 3] = 255;
  }
  ctx.putImageData(image, 0, 0);
  return new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
}

async function downloadVolumeMask(mask, k) {
  clearError("ask-error");
  try {
    const body = JSON.stringify({ image: imageInput(), mask: mask.mask });
    const response = await call(() => fetch("/v1/render/mask-nifti", { method: "POST", headers: headers(), body }));
    download(`mask-${k + 1}.nii.gz`, await response.blob());
  } catch (error) {
    showError("ask-error", error);
  }
}

function listMasks() {
  $("masks").replaceChildren(...state.masks.map((mask, k) => {
    const item = document.createElement("li");
    const toggle = document.createElement("input");
    toggle.type = "checkbox"; toggle.checked = mask.visible; toggle.title = "show this mask";
    toggle.onchange = () => { mask.visible = toggle.checked; drawMasks(); };
    const swatch = document.createElement("span");
    swatch.className = "swatch"; swatch.style.background = mask.color;
    const label = document.createElement("span");
    const area = mask.pixels.reduce((sum, v) => sum + v, 0);
    label.textContent = `mask ${k + 1}${mask.label ? ` — ${mask.label}` : ""} (${area} px, score ${mask.score})`;
    if (state.highlighted === k) label.style.fontWeight = "bold";
    const png = document.createElement("button");
    png.textContent = "PNG";
    png.onclick = async () => download(`mask-${k + 1}.png`, await maskPng(mask));
    const rle = document.createElement("button");
    rle.textContent = "RLE";
    rle.title = "COCO RLE JSON";
    rle.onclick = () => download(`mask-${k + 1}.json`, new Blob([JSON.stringify(mask.mask)], { type: "application/json" }));
    item.append(toggle, swatch, label, png, rle);
    if (state.render.format === "nifti") {
      const nifti = document.createElement("button");
      nifti.textContent = "NIfTI";
      nifti.title = "this slice's mask on the volume's grid";
      nifti.onclick = () => downloadVolumeMask(mask, k);
      item.append(nifti);
    }
    return item;
  }));
}

// ---- asking ---------------------------------------------------------------------------------------

function addMessage(role, text) {
  const message = document.createElement("div");
  message.className = `msg ${role}`;
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  message.append(body);
  $("conversation").append(message);
  $("conversation").scrollTop = $("conversation").scrollHeight;
  return message;
}

function addDivider(text) { addMessage("divider", text); }

// The answer with each <SEG> as a chip that highlights its mask.
function showAnswer(message, result, firstMask) {
  const body = message.querySelector(".text");
  body.replaceChildren();
  result.text.split("<SEG>").forEach((piece, i) => {
    if (i) {
      const k = firstMask + i - 1;
      const chip = document.createElement("button");
      chip.className = "seg-chip";
      chip.dataset.mask = k;
      chip.textContent = `mask ${k + 1}`;
      chip.style.borderColor = state.masks[k] ? state.masks[k].color : "#999";
      chip.onmouseenter = () => highlight(k);
      chip.onmouseleave = () => highlight(null);
      chip.onclick = () => highlight(state.highlighted === k ? null : k);
      body.append(chip);
    }
    if (piece) body.append(document.createTextNode(piece));
  });
  if (!result.text) body.textContent = "(empty answer)";
  const meta = document.createElement("div");
  meta.className = "meta";
  const timings = Object.entries(result.timings_ms).filter(([, ms]) => ms > 0).map(([stage, ms]) => `${stage} ${ms.toFixed(0)} ms`);
  const cache = Object.entries(result.cache).map(([name, use]) => `${name} ${use}`);
  meta.textContent = `${result.new_tokens} tokens · ${timings.join(", ")} · cache: ${cache.join(", ")}` +
    (result.seg_forced ? " · <SEG> forced" : "");
  message.append(meta);
}

async function ask(task) {
  clearError("ask-error");
  const text = $("question").value.trim();
  if (!state.file) { showError("ask-error", "Open an image first."); return; }
  if (!text) { showError("ask-error", task === "ground" ? "Name what to segment." : "Write a question."); return; }
  if (state.busy) return;
  state.busy = true;
  setBusy(true);
  const regions = state.regions.map((region) => structuredClone(region));
  const streaming = $("stream").checked;
  const body = {
    image: imageInput(),
    regions,
    decoding: { max_new_tokens: Number($("max-tokens").value) || 64 },
    stream: streaming,
  };
  if (task === "ground") body.text = text; else { body.question = text; if (state.history.length) body.history = state.history; }
  const asked = addMessage("user", (task === "ground" ? "Segment: " : "") + text + (regions.length ? `  [${regions.length} region${regions.length > 1 ? "s" : ""}]` : ""));
  const answer = addMessage("assistant streaming", "");
  const path = task === "ground" ? "/v1/ground" : "/v1/vqa";
  try {
    let result;
    if (streaming) {
      result = await postStream(path, body, (delta) => { answer.querySelector(".text").textContent += delta; });
    } else {
      result = await postJSON(path, body);
    }
    answer.classList.remove("streaming");
    const firstMask = state.masks.length;
    result.masks.forEach((segmentation, i) => state.masks.push({
      mask: segmentation.mask,
      pixels: decodeRle(segmentation.mask),
      color: PALETTE[(firstMask + i) % PALETTE.length],
      label: segmentation.label,
      score: segmentation.score,
      visible: true,
    }));
    showAnswer(answer, result, firstMask);
    if (task === "answer") state.history.push({ role: "user", content: text, regions }, { role: "assistant", content: result.text });
    $("question").value = "";
    drawMasks(); listMasks();
  } catch (error) {
    // Only this exchange is taken back: the conversation and its history stay as they were.
    asked.remove(); answer.remove();
    showError("ask-error", error);
  } finally {
    state.busy = false;
    setBusy(false);
  }
}

function setBusy(busy) { for (const id of ["ask", "segment"]) $(id).disabled = busy; }

// ---- the model panel ------------------------------------------------------------------------------

async function loadModelPanel() {
  try {
    const health = await getJSON("/v1/health");
    $("model-name").textContent = `model: ${health.model}`;
    const experts = await getJSON("/v1/experts");
    const list = document.createElement("dl");
    for (const { spec, deployments } of experts.experts) {
      const name = document.createElement("dt");
      name.textContent = spec.name;
      const about = document.createElement("dd");
      about.textContent = `${spec.capabilities.join(", ")} · on ${deployments.join(", ")}`;
      list.append(name, about);
    }
    $("model-panel").replaceChildren(list);
  } catch (error) {
    $("model-panel").textContent = explain(error);
  }
}

// ---- wiring ---------------------------------------------------------------------------------------

function init() {
  $("file").addEventListener("change", (event) => { if (event.target.files[0]) openFile(event.target.files[0]); event.target.value = ""; });
  $("window").addEventListener("change", () => changeView({ window: $("window").value || null }));
  $("frame").addEventListener("change", () => changeView({ frame: Number($("frame").value) }));
  $("slice").addEventListener("change", () => changeView({ slice_index: Number($("slice").value) }));
  $("axis").addEventListener("change", () => changeView({ axis: $("axis").value, slice_index: null }));
  document.querySelectorAll(".tool").forEach((button) => button.addEventListener("click", () => {
    state.tool = button.dataset.tool;
    document.querySelectorAll(".tool").forEach((other) => other.classList.toggle("active", other === button));
  }));
  $("region-canvas").addEventListener("pointerdown", pointerDown);
  $("viewport").addEventListener("wheel", (event) => {
    if (!event.ctrlKey || !state.render) return;
    event.preventDefault();
    zoomBy(event.deltaY < 0 ? 1.25 : 0.8);
  }, { passive: false });
  $("zoom-in").onclick = () => zoomBy(1.25);
  $("zoom-out").onclick = () => zoomBy(0.8);
  $("zoom-fit").onclick = () => { if (state.render) { state.zoomSet = false; fitZoom(); applyZoom(); } };
  $("ask").onclick = () => ask("answer");
  $("segment").onclick = () => ask("ground");
  $("question").addEventListener("keydown", (event) => { if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); ask("answer"); } });
  $("new-chat").onclick = () => { state.history = []; addDivider("new chat"); };
  $("opacity").addEventListener("input", drawMasks);
  $("show-masks").addEventListener("change", drawMasks);
  loadModelPanel();
}

init();
