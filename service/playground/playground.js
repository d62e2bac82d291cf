// The playground: a page over the public HTTP API only. Images come through fetch() rather than <img src=URL> so
// that an optional bearer token travels in a header, never in a URL, and so that each call's latency can be read.
"use strict";

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "gan-playground-token"; // sessionStorage: gone when the tab closes
const DEBOUNCE_MS = 200; // sliders fire on every pixel of travel; one request per pause is enough
const FPS = 12;
const CANVAS_SIDE = 256; // the animation's frame is scaled up by a whole factor to about this size
const PAD_SIDE = 280; // the drawing canvas: the model's size scaled up by a whole factor to about this size
const STROKE = 2.4; // pen width in the model's pixels: about an MNIST digit's stroke
const INVERT_AFTER_MS = 400; // a pause after a stroke this long, and the drawing is inverted

const state = {
  models: [], model: null, errors: {}, strip: null, frame: 0, direction: 1, timer: 0, classNames: "", animation: null,
  directionList: null, // "model\nname\nname…" of the sliders built; the same list again keeps where they are
  // The inversion panel: what is drawn (the pad, or a file as sent), the last answer, and whether its strip follows.
  inversion: {
    key: "", file: null, sentText: "", sentUrl: "", drawn: false, answer: null, follow: false,
    controller: null, timer: 0,
  },
};
const views = {
  grid: {
    title: "Grid", img: $("grid"), caption: $("grid-caption"), timing: $("grid-timing"), download: $("grid-download"),
  },
  strip: {
    title: "Interpolation", img: $("strip"), caption: $("strip-caption"), timing: $("strip-timing"),
    download: $("strip-download"),
  },
  "inversion-strip": {
    title: "Interpolation from the inversion", img: $("inversion-strip"), caption: $("inversion-strip-caption"),
    timing: $("inversion-strip-timing"),
  },
};

// ---- errors: one line per source, so a failing grid is not hidden by a working strip -----------------------------

function setError(source, message) {
  if (message) state.errors[source] = message;
  else delete state.errors[source];
  const text = Object.values(state.errors).join(" · ");
  $("error").textContent = text;
  $("error").hidden = !text;
}

// ---- the API -------------------------------------------------------------------------------------------------------

// A GET, or with a body (a Blob: its type is the Content-Type) a POST.
async function request(path, params, signal, body) {
  const token = $("token").value.trim();
  const query = params ? `?${new URLSearchParams(params)}` : "";
  const started = performance.now();
  const init = { signal, headers: token ? { Authorization: `Bearer ${token}` } : {} };
  if (body) Object.assign(init, { method: "POST", body });
  const response = await fetch(path + query, init);
  if (!response.ok) {
    // The server answers {"error": "field: message"}; anything else (a proxy's page) gets the status line.
    const body = await response.json().catch(() => ({}));
    throw new Error(body.error || `${response.status} ${response.statusText}`);
  }
  const blob = await response.blob();
  const measured = performance.now() - started;
  const timing = /(?:^|,)\s*app;dur=([\d.]+)/.exec(response.headers.get("Server-Timing") || "");
  const server = timing ? Number(timing[1]) : NaN;
  // The server's time is part of the round trip, but the two are read off different clocks: the server's to 0.01
  // ms, the page's as coarsely as the browser allows (0.1 ms with jitter in Chromium, 1 ms in Firefox and Safari,
  // 100 ms with Firefox's resistFingerprinting), so a quick call could read shorter than the server's share of it.
  // Whatever the clock missed, the call took at least the server's time.
  return { blob, response, server, roundTrip: Number.isNaN(server) ? measured : Math.max(measured, server) };
}

async function loadModels() {
  try {
    const { blob } = await request("/v1/models");
    state.models = JSON.parse(await blob.text()).models;
    setError("models", state.models.length ? "" : "The server has no models.");
  } catch (e) {
    setError("models", `Models: ${e.message}`);
    return;
  }
  const previous = $("model").value;
  $("model").replaceChildren(...state.models.map((m) => new Option(m.name, m.name)));
  if (state.models.some((m) => m.name === previous)) $("model").value = previous;
  pickModel();
}

function pickModel() {
  const model = state.models.find((m) => m.name === $("model").value);
  state.model = model;
  if (!model) return;
  const versions = [new Option(`latest (${model.version})`, ""), ...model.versions.map((v) => new Option(v, v))];
  $("version").replaceChildren(...versions);
  // Class controls only for conditional models; the blend partner may be "none".
  const names = model.class_names;
  $("classes").hidden = names.length === 0;
  for (const el of document.querySelectorAll(".class-only")) el.hidden = names.length === 0;
  // Rebuilt for the model; a choice still offered survives (a new token reloads the list, not the user's picks).
  const picks = ["label", "from-label", "to-label", "blend-label", "inversion-to-label"];
  const kept = Object.fromEntries(picks.map((id) => [id, $(id).value]));
  const same = state.classNames === names.join("\n");
  state.classNames = names.join("\n");
  for (const id of ["label", "from-label", "to-label", "inversion-to-label"]) {
    $(id).replaceChildren(...names.map((name, i) => new Option(name, i)));
  }
  $("blend-label").replaceChildren(new Option("none", ""), ...names.map((name, i) => new Option(name, i)));
  if (same) for (const [id, value] of Object.entries(kept)) $(id).value = value;
  else if (names.length > 1) $("to-label").value = "1";
  showValues(); // the blend slider is off while its partner is "none"
  buildDirections(model);
  setUpInversion(model);
  if (model.kind !== "image") {
    setError("model", `${model.name} generates 2-D points; the playground draws image models only.`);
    return;
  }
  setError("model", "");
  renderAll();
}

// ---- query parameters from the controls -----------------------------------------------------------------------------

function seedOf(id, name) {
  const text = $(id).value.trim();
  if (!/^\d+$/.test(text)) throw new Error(`${name}: a whole number ≥ 0`);
  return BigInt(text); // seeds go up to 2**64 - 1, past what a JS number holds exactly
}

function common() {
  const params = {};
  const psi = Number($("psi").value);
  if (psi < 1) params.psi = psi.toFixed(2); // ψ = 1 leaves z as it is: no truncation, so it is left out
  if ($("version").value) params.version = $("version").value;
  return params;
}

// One class, or a blend: weights (1 - t) and t, which the server normalises.
function labelParams(name, a, b, t) {
  if (!state.model.class_names.length) return [{}, ""];
  const names = state.model.class_names;
  if (b === "" || a === b || t === 0) return [{ [`${name}label`]: a }, `class ${names[a]}`];
  const weights = names.map((_, i) => (i === Number(a) ? 1 - t : 0) + (i === Number(b) ? t : 0));
  const soft = weights.map((w) => Number(w.toFixed(3))).join(",");
  const percent = (w) => `${(w * 100).toFixed(0)}%`;
  return [{ [`${name}soft`]: soft }, `${names[a]} ${percent(1 - t)} + ${names[b]} ${percent(t)}`];
}

function psiText() {
  return Number($("psi").value) < 1 ? `ψ ${Number($("psi").value).toFixed(2)}` : "no truncation";
}

// ---- showing images ------------------------------------------------------------------------------------------------

// Both rounded alike, and the round trip is at least the server's number: it never shows the smaller figure.
function timingText(server, roundTrip) {
  const serverText = Number.isNaN(server) ? "" : `server ${server.toFixed(1)} ms · `; // a proxy may drop the header
  return `${serverText}round trip ${roundTrip.toFixed(1)} ms`;
}

// Fetches a PNG into view.img and returns it decoded (null if it failed or a newer call took over); a newer call
// cancels an older one, so answers never land out of order.
async function show(source, path, params, caption, filename) {
  const view = views[source];
  view.controller?.abort();
  const controller = (view.controller = new AbortController());
  view.img.dataset.state = "loading";
  let url = "";
  try {
    const { blob, response, server, roundTrip } = await request(path, params, controller.signal);
    url = URL.createObjectURL(blob);
    // Decode off screen first: a slow decode must not replace a newer picture already shown.
    const probe = new Image();
    probe.src = url;
    await probe.decode();
    if (controller.signal.aborted) throw new DOMException("superseded", "AbortError");
    view.img.src = url;
    await view.img.decode();
    if (view.url) URL.revokeObjectURL(view.url);
    view.url = url;
    view.filename = filename.replace("{version}", response.headers.get("X-Model-Version") || "");
    view.caption.textContent = caption;
    view.timing.textContent = timingText(server, roundTrip);
    if (view.download) view.download.disabled = false;
    view.img.dataset.seq = Number(view.img.dataset.seq) + 1; // lets a test wait for this very image
    view.img.dataset.state = "ready";
    setError(source, "");
    return probe;
  } catch (e) {
    if (url) URL.revokeObjectURL(url);
    if (controller.signal.aborted) return null;
    view.img.dataset.state = "error";
    setError(source, `${view.title}: ${e.message}`);
    return null;
  }
}

function renderGrid() {
  if (state.model?.kind !== "image") return;
  try {
    const seed = seedOf("seed", "Seed");
    const count = Number($("count").value);
    if (!Number.isInteger(count) || count < 1) throw new Error("Grid size: a whole number ≥ 1");
    const seeds = count === 1 ? `${seed}` : `${seed}-${seed + BigInt(count - 1)}`;
    const [label, labelText] = labelParams("", $("label").value, $("blend-label").value, Number($("blend").value));
    // Limits (seeds per call, columns ≥ 0) are the server's to judge; its message shows in the page.
    const params = { seeds, ...label, ...common(), columns: $("columns").value.trim() || "0" };
    // A direction moved: the same seeds through edit.png, one strength, so one image a seed. Its columns 0 would
    // mean one a strength (a single column): the seeds are laid out as images.png lays them out, ⌈√n⌉ across.
    const edit = activeDirection();
    if (edit) {
      Object.assign(params, { direction: edit.name, strengths: String(edit.strength) });
      if (Number(params.columns) === 0) params.columns = String(Math.ceil(Math.sqrt(count)));
    }
    const what = [`seeds ${seeds}`, labelText, edit && `${edit.name} ${signed(edit.strength)}`, psiText()];
    const classPart = label.label ? `-class${label.label}` : "";
    const editPart = edit ? `-${edit.name}${edit.strength}` : "";
    const name = `${state.model.name}-v{version}-seeds${seeds}${classPart}${editPart}.png`;
    const path = `/v1/models/${encodeURIComponent(state.model.name)}/${edit ? "edit" : "images"}.png`;
    show("grid", path, params, what.filter(Boolean).join(" · "), name);
  } catch (e) {
    setError("grid", e.message);
  }
}

async function renderStrip() {
  if (state.model?.kind !== "image") return;
  try {
    const [from, to] = [seedOf("from", "From seed"), seedOf("to", "To seed")];
    const [fromLabel, fromText] = labelParams("from_", $("from-label").value, "", 0);
    const [toLabel, toText] = labelParams("to_", $("to-label").value, "", 0);
    const steps = $("steps").value.trim() || "8";
    const params = { from, to, steps, method: $("method").value, ...fromLabel, ...toLabel, ...common() };
    const classes = fromText ? `${fromText} → ${toText.replace("class ", "")}` : "";
    const what = [`seed ${from} → ${to}`, classes, `${Number(steps) + 1} frames`, psiText()].filter(Boolean);
    const path = `/v1/models/${encodeURIComponent(state.model.name)}/interpolation.png`;
    const name = `${state.model.name}-v{version}-seed${from}-to-seed${to}.png`;
    const strip = await show("strip", path, params, what.join(" · "), name);
    if (strip) startAnimation(strip);
    state.animation = strip ? { path: path.replace(/\.png$/, ".gif"), params, name: name.replace(/\.png$/, ".gif") } : null;
    $("animation-download").disabled = !strip;
  } catch (e) {
    setError("strip", e.message);
  }
}

function renderAll() {
  renderGrid();
  renderStrip();
}

// ---- latent directions: a slider each, one moved at a time; the grid's seeds moved along it ----------------------

const directionInputs = () => [...$("direction-sliders").querySelectorAll("input")];
const signed = (x) => `${x > 0 ? "+" : x < 0 ? "−" : ""}${Math.abs(x).toFixed(2)}`;

// The one direction off 0, or null: then the grid is images.png's, as if there were no sliders.
function activeDirection() {
  const input = directionInputs().find((el) => Number(el.value) !== 0);
  return input ? { name: input.dataset.direction, strength: Number(input.value) } : null;
}

// Rebuilt, every slider at 0, for another model (or another list); the same model listed again (a new token reloads
// the list) keeps them where they are.
function buildDirections(model) {
  const list = model.kind === "image" ? model.directions || [] : [];
  $("directions").hidden = list.length === 0;
  const key = [model.name, ...list.map((d) => d.name)].join("\n");
  if (key === state.directionList) return;
  state.directionList = key;
  $("direction-sliders").replaceChildren(...list.map(directionSlider));
  showDirections();
}

function directionSlider(direction, i) {
  const id = `direction-${i}`; // a name is a model's to choose: ids by position, the name in a data attribute
  const field = document.createElement("div");
  field.className = "field range";
  field.title = direction.description; // the tooltip over its name, value and slider
  const label = document.createElement("label");
  label.htmlFor = id;
  label.textContent = direction.name;
  const value = document.createElement("output");
  value.id = `${id}-value`;
  value.setAttribute("for", id);
  const input = document.createElement("input");
  Object.assign(input, { id, type: "range", min: "-3", max: "3", step: "0.25", value: "0" });
  input.dataset.direction = direction.name;
  input.title = direction.description;
  input.addEventListener("input", () => moveDirection(input));
  field.append(label, value, input);
  return field;
}

// One direction at a time: the one moved sets the others back to 0.
function moveDirection(moved) {
  for (const input of directionInputs()) if (input !== moved) input.value = "0";
  showDirections();
  gridLater();
}

function resetDirections() {
  for (const input of directionInputs()) input.value = "0";
  showDirections();
  renderGrid();
}

function showDirections() {
  for (const input of directionInputs()) $(`${input.id}-value`).textContent = signed(Number(input.value));
  $("directions-reset").disabled = !activeDirection();
}

// ---- the animation: frames cropped from the strip (2 px padding around and between them) -------------------------

// Frames come from the decoded strip the call returned, not the <img>, whose next picture may be on its way.
function startAnimation(img) {
  const [, h, w] = state.model.image_shape;
  const frames = Math.round((img.naturalWidth - 2) / (w + 2));
  state.strip = { img, frames, w, h };
  const scale = Math.max(1, Math.floor(CANVAS_SIDE / Math.max(w, h)));
  $("frame").width = w * scale;
  $("frame").height = h * scale;
  $("frame-slider").max = frames - 1;
  state.frame = Math.min(state.frame, frames - 1);
  drawFrame(state.frame);
  const still = window.matchMedia("(prefers-reduced-motion: reduce)").matches;
  if (!state.timer && !still) play(true);
}

function drawFrame(i) {
  if (!state.strip) return;
  const { img, w, h } = state.strip;
  const canvas = $("frame");
  const ctx = canvas.getContext("2d");
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(img, 2 + i * (w + 2), 2, w, h, 0, 0, canvas.width, canvas.height);
  state.frame = i;
  $("frame-slider").value = i;
  $("frame-value").textContent = `${i + 1} / ${state.strip.frames}`;
}

function play(on) {
  clearInterval(state.timer);
  state.timer = 0;
  if (on && state.strip) {
    // Back and forth, so the loop never jumps from the last frame to the first.
    state.timer = setInterval(() => {
      const last = state.strip.frames - 1;
      if (last === 0) return;
      if (state.frame + state.direction > last || state.frame + state.direction < 0) state.direction *= -1;
      drawFrame(state.frame + state.direction);
    }, 1000 / FPS);
  }
  $("play").textContent = state.timer ? "Pause" : "Play";
  $("play").setAttribute("aria-pressed", String(Boolean(state.timer)));
}

// ---- inversion: a drawing, or an image file, back to the z (and class) that draws it -------------------------------

const pad = $("pad");
const padContext = pad.getContext("2d", { willReadFrequently: true }); // read back at every inversion
let pen = null; // where the stroke being drawn is, in the pad's pixels; null between strokes

// Shown for a model served with an encoder. Another model (or another size) starts on a blank pad, its size a whole
// multiple of the model's, so that each image pixel is a square block of the pad's.
function setUpInversion(model) {
  const shown = model.kind === "image" && Boolean(model.invertible);
  $("inversion").hidden = !shown;
  if (!shown) {
    state.inversion.key = "";
    clearInversion();
    return;
  }
  const key = `${model.name}\n${model.image_shape}`;
  if (key === state.inversion.key) return; // the same model listed again (a new token) keeps the drawing
  state.inversion.key = key;
  const [, h, w] = model.image_shape;
  const scale = Math.max(1, Math.floor(PAD_SIDE / Math.max(w, h)));
  pad.width = w * scale;
  pad.height = h * scale;
  clearInversion();
}

function clearInversion() {
  const inv = state.inversion;
  inv.controller?.abort();
  views["inversion-strip"].controller?.abort();
  clearTimeout(inv.timer);
  pen = null;
  Object.assign(inv, { file: null, drawn: false, answer: null, follow: false });
  padContext.fillStyle = "#000";
  padContext.fillRect(0, 0, pad.width, pad.height);
  for (const id of ["inversion-input", "reconstruction", "inversion-strip"]) $(id).dataset.state = "empty";
  for (const id of ["reconstruction", "inversion-strip"]) {
    $(`${id}-caption`).textContent = "";
    $(`${id}-timing`).textContent = "";
  }
  $("inversion-input-caption").textContent = "Sent";
  $("inversion-file").value = "";
  $("invert").disabled = true;
  $("inversion-interpolate").disabled = true;
  setError("inversion", "");
  setError("inversion-strip", "");
}

// A pointer's place on the pad, in the pad's own pixels (it is shown at whatever size the layout gives it).
function padPoint(e) {
  const box = pad.getBoundingClientRect();
  return [((e.clientX - box.left) * pad.width) / box.width, ((e.clientY - box.top) * pad.height) / box.height];
}

function penWidth() {
  return (STROKE * pad.width) / state.model.image_shape[2];
}

function dot([x, y]) {
  padContext.fillStyle = "#fff";
  padContext.beginPath();
  padContext.arc(x, y, penWidth() / 2, 0, 2 * Math.PI);
  padContext.fill();
}

function line(from, to) {
  Object.assign(padContext, { strokeStyle: "#fff", lineWidth: penWidth(), lineCap: "round", lineJoin: "round" });
  padContext.beginPath();
  padContext.moveTo(...from);
  padContext.lineTo(...to);
  padContext.stroke();
}

// Pointer events: a mouse, a finger (the pad's touch-action is none, so it draws rather than scrolls) or a pen.
function penDown(e) {
  if (e.button !== 0 || state.model?.kind !== "image") return; // a finger or a pen reports button 0 too
  e.preventDefault();
  try {
    pad.setPointerCapture(e.pointerId); // the stroke goes on (and ends) even off the pad
  } catch {
    // a pointer already gone: the stroke still draws while it is over the pad
  }
  clearTimeout(state.inversion.timer); // one more stroke: invert once the drawing rests
  pen = padPoint(e);
  dot(pen);
}

function penMove(e) {
  if (!pen) return;
  const moves = e.getCoalescedEvents?.() ?? [];
  for (const move of moves.length ? moves : [e]) {
    const next = padPoint(move);
    line(pen, next);
    pen = next;
  }
}

function penUp() {
  if (!pen) return;
  pen = null;
  Object.assign(state.inversion, { file: null, drawn: true }); // the pad now, even over a file it shows
  $("invert").disabled = false;
  invertLater();
}

function invertLater() {
  clearTimeout(state.inversion.timer);
  if (state.inversion.drawn) state.inversion.timer = setTimeout(invert, INVERT_AFTER_MS);
}

const pngOf = (canvas) =>
  new Promise((resolve, reject) =>
    canvas.toBlob((blob) => (blob ? resolve(blob) : reject(new Error("the browser made no PNG"))), "image/png"),
  );

// The pad at the model's size: each image pixel the mean of its block of the pad's (an exact box filter, so a
// picture the pad shows scaled up, a file's, comes back pixel for pixel), as a PNG.
function padImage() {
  const [, h, w] = state.model.image_shape;
  const scale = pad.width / w;
  const big = padContext.getImageData(0, 0, pad.width, pad.height).data;
  const small = new ImageData(w, h);
  const area = scale * scale;
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      const sum = [0, 0, 0];
      for (let dy = 0; dy < scale; dy++) {
        let i = ((y * scale + dy) * pad.width + x * scale) * 4;
        for (let dx = 0; dx < scale; dx++, i += 4) {
          sum[0] += big[i];
          sum[1] += big[i + 1];
          sum[2] += big[i + 2];
        }
      }
      const o = (y * w + x) * 4;
      for (let k = 0; k < 3; k++) small.data[o + k] = Math.round(sum[k] / area);
      small.data[o + 3] = 255;
    }
  }
  const canvas = document.createElement("canvas");
  canvas.width = w;
  canvas.height = h;
  canvas.getContext("2d").putImageData(small, 0, 0);
  return pngOf(canvas);
}

// An image file, chosen or dropped: sent as it is when it has the model's size; otherwise scaled to fit (its shape
// kept, centred on black) into a PNG of that size. The pad shows what is sent, and strokes over it draw on it.
async function loadFile(file) {
  if (!file || !state.model?.invertible) return;
  const [, h, w] = state.model.image_shape;
  const url = URL.createObjectURL(file);
  try {
    const picture = new Image();
    picture.src = url;
    await picture.decode().catch(() => {
      throw new Error(`${file.name}: not an image this browser reads`);
    });
    const [fw, fh] = [picture.naturalWidth, picture.naturalHeight];
    if (!fw || !fh) throw new Error(`${file.name}: an image without a size`);
    const small = document.createElement("canvas");
    small.width = w;
    small.height = h;
    const context = small.getContext("2d");
    context.fillStyle = "#000";
    context.fillRect(0, 0, w, h);
    const same = fw === w && fh === h;
    const fit = Math.min(w / fw, h / fh);
    context.imageSmoothingQuality = "high";
    context.drawImage(picture, (w - fw * fit) / 2, (h - fh * fit) / 2, fw * fit, fh * fit);
    const sent = same ? file : await pngOf(small);
    padContext.imageSmoothingEnabled = false;
    padContext.drawImage(small, 0, 0, pad.width, pad.height);
    const sentText = same ? "The file" : `The file at ${w}×${h}`;
    Object.assign(state.inversion, { file: sent, drawn: true, sentText });
    $("invert").disabled = false;
    setError("inversion", "");
    invert();
  } catch (e) {
    setError("inversion", `Inversion: ${e.message}`);
  } finally {
    URL.revokeObjectURL(url);
  }
}

function showSent(blob, text) {
  const img = $("inversion-input");
  if (state.inversion.sentUrl) URL.revokeObjectURL(state.inversion.sentUrl);
  img.src = state.inversion.sentUrl = URL.createObjectURL(blob);
  img.dataset.state = "ready";
  $("inversion-input-caption").textContent = text;
}

function inversionText(model, answer) {
  const parts = [];
  if (answer.label !== undefined && model.class_names.length) {
    const p = answer.probabilities?.[answer.label];
    parts.push(`class ${model.class_names[answer.label]}${p === undefined ? "" : ` (${(p * 100).toFixed(0)}%)`}`);
  }
  parts.push(`distance ${answer.distance.toFixed(4)} (encoder ${answer.encoder_distance.toFixed(4)})`);
  parts.push(`${answer.passes} passes`);
  return parts.join(" · ");
}

// POSTs what is drawn (or the file) to invert; shows what was sent, the reconstruction, the class and distances. A
// newer call cancels an older one, as show() does.
async function invert() {
  const inv = state.inversion;
  clearTimeout(inv.timer);
  const model = state.model;
  if (!model?.invertible || !inv.drawn) return;
  inv.controller?.abort();
  const controller = (inv.controller = new AbortController());
  const img = $("reconstruction");
  img.dataset.state = "loading";
  try {
    const refine = $("refine").value.trim();
    if (!/^\d+$/.test(refine)) throw new Error("Refine passes: a whole number ≥ 0");
    const [text, sent] = inv.file
      ? [inv.sentText, inv.file]
      : [`The drawing at ${model.image_shape[2]}×${model.image_shape[1]}`, await padImage()];
    if (controller.signal.aborted) return;
    showSent(sent, text);
    const params = { refine };
    if ($("version").value) params.version = $("version").value;
    const path = `/v1/models/${encodeURIComponent(model.name)}/invert`;
    const { blob, server, roundTrip } = await request(path, params, controller.signal, sent);
    const answer = JSON.parse(await blob.text());
    const probe = new Image();
    probe.src = `data:image/png;base64,${answer.reconstruction}`;
    await probe.decode();
    if (controller.signal.aborted) throw new DOMException("superseded", "AbortError");
    img.src = probe.src;
    await img.decode();
    inv.answer = answer;
    $("reconstruction-caption").textContent = inversionText(model, answer);
    $("reconstruction-timing").textContent = timingText(server, roundTrip);
    $("inversion-interpolate").disabled = false;
    img.dataset.seq = Number(img.dataset.seq) + 1; // lets a test wait for this very image
    img.dataset.state = "ready";
    setError("inversion", "");
    if (inv.follow) renderInversionStrip(); // the strip shown starts at the z now inverted
  } catch (e) {
    if (controller.signal.aborted) return;
    img.dataset.state = "error";
    setError("inversion", `Inversion: ${e.message}`);
  }
}

// From the inverted z (and its class) to a seed (and class), through interpolation.png's from_z; steps and method
// are the Interpolation panel's. No ψ: truncation would pull the inverted z towards the mean too, and the first
// frame would no longer be the reconstruction.
function renderInversionStrip() {
  const answer = state.inversion.answer;
  if (!answer || state.model?.name !== answer.model) return;
  state.inversion.follow = true;
  try {
    const to = seedOf("inversion-to", "To seed");
    const steps = $("steps").value.trim() || "8";
    const params = { from_z: answer.z.join(","), to, steps, method: $("method").value, version: answer.version };
    let classes = "";
    const names = state.model.class_names;
    if (answer.label !== undefined && names.length) {
      const toLabel = $("inversion-to-label").value;
      Object.assign(params, { from_label: answer.label, to_label: toLabel });
      classes = `class ${names[answer.label]} → ${names[toLabel]}`;
    }
    const what = [`inverted → seed ${to}`, classes, `${Number(steps) + 1} frames`, "no truncation"];
    const path = `/v1/models/${encodeURIComponent(answer.model)}/interpolation.png`;
    show("inversion-strip", path, params, what.filter(Boolean).join(" · "), "");
  } catch (e) {
    setError("inversion-strip", e.message);
  }
}

// ---- wiring ---------------------------------------------------------------------------------------------------------

function debounce(fn) {
  let timer = 0;
  return () => {
    clearTimeout(timer);
    timer = setTimeout(fn, DEBOUNCE_MS);
  };
}

// The server animates the strip's frames itself (interpolation.gif): the same pixels, played there and back.
async function downloadAnimation() {
  const asked = state.animation;
  if (!asked) return;
  try {
    const { blob, response } = await request(asked.path, { ...asked.params, fps: 12, ping_pong: 1 });
    const link = document.createElement("a");
    link.href = URL.createObjectURL(blob);
    link.download = asked.name.replace("{version}", response.headers.get("X-Model-Version") || "");
    link.click();
    setTimeout(() => URL.revokeObjectURL(link.href), 10000);
    setError("animation", "");
  } catch (e) {
    setError("animation", `Animation: ${e.message}`);
  }
}

function download(view) {
  const link = document.createElement("a");
  link.href = view.url;
  link.download = view.filename;
  link.click();
}

function showValues() {
  const psi = Number($("psi").value);
  $("psi-value").textContent = psi < 1 ? psi.toFixed(2) : "1.00 (none)";
  // Shrinking z towards the mean draws the most typical image, which for some classes of some models is faint:
  // the shipped MNIST model's 1s and 9s lose most of their ink at ψ 0.2 (README, "Playground").
  $("psi-note").hidden = psi >= 0.4;
  $("blend-value").textContent = Number($("blend").value).toFixed(2);
  $("blend").disabled = $("blend-label").value === "";
}

const gridLater = debounce(renderGrid);
const stripLater = debounce(renderStrip);
const allLater = debounce(renderAll);
const inversionStripLater = debounce(() => state.inversion.follow && renderInversionStrip());

// Fields as they are typed or dragged; a <select> once it changes (scripted picks fire no "input").
const on = (id, fn) => $(id).addEventListener($(id).tagName === "SELECT" ? "change" : "input", fn);
for (const id of ["seed", "count", "columns", "label", "blend-label", "blend"]) on(id, gridLater);
for (const id of ["from", "to", "from-label", "to-label", "steps", "method"]) on(id, stripLater);
for (const id of ["psi", "blend", "blend-label"]) on(id, showValues);
on("psi", allLater);
on("version", () => {
  renderAll();
  invert(); // the version picked inverts it again (nothing, if nothing is drawn)
});
on("model", pickModel);
$("directions-reset").addEventListener("click", resetDirections);
$("random").addEventListener("click", () => {
  $("seed").value = Math.floor(Math.random() * 2 ** 31);
  renderGrid();
});
$("token").addEventListener("change", () => {
  sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
  loadModels();
});
$("play").addEventListener("click", () => play(!state.timer));
$("frame-slider").addEventListener("input", () => {
  play(false);
  drawFrame(Number($("frame-slider").value));
});
$("grid-download").addEventListener("click", () => download(views.grid));
$("strip-download").addEventListener("click", () => download(views.strip));
$("animation-download").addEventListener("click", downloadAnimation);
pad.addEventListener("pointerdown", penDown);
pad.addEventListener("pointermove", penMove);
pad.addEventListener("pointerup", penUp);
pad.addEventListener("pointercancel", penUp);
$("inversion-clear").addEventListener("click", clearInversion);
$("invert").addEventListener("click", invert);
on("refine", invertLater);
$("inversion-file").addEventListener("change", () => loadFile($("inversion-file").files[0]));
// A file dropped anywhere on the panel; the browser would otherwise open it in place of the page.
$("inversion").addEventListener("dragover", (e) => e.preventDefault());
$("inversion").addEventListener("drop", (e) => {
  e.preventDefault();
  loadFile(e.dataTransfer.files[0]);
});
$("inversion-interpolate").addEventListener("click", renderInversionStrip);
for (const id of ["inversion-to", "inversion-to-label", "steps", "method"]) on(id, inversionStripLater);

$("token").value = sessionStorage.getItem(TOKEN_KEY) || "";
showValues();
loadModels();
