// The playground: a page over the public HTTP API only. Images come through fetch() rather than <img src=URL> so
// that an optional bearer token travels in a header, never in a URL, and so that each call's latency can be read.
"use strict";

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "gan-playground-token"; // sessionStorage: gone when the tab closes
const DEBOUNCE_MS = 200; // sliders fire on every pixel of travel; one request per pause is enough
const FPS = 12;
const CANVAS_SIDE = 256; // the animation's frame is scaled up by a whole factor to about this size

const state = {
  models: [], model: null, errors: {}, strip: null, frame: 0, direction: 1, timer: 0, classNames: "", animation: null,
  directionList: null, // "model\nname\nname…" of the sliders built; the same list again keeps where they are
};
const views = {
  grid: { img: $("grid"), caption: $("grid-caption"), timing: $("grid-timing"), download: $("grid-download") },
  strip: { img: $("strip"), caption: $("strip-caption"), timing: $("strip-timing"), download: $("strip-download") },
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

async function request(path, params, signal) {
  const token = $("token").value.trim();
  const query = params ? `?${new URLSearchParams(params)}` : "";
  const started = performance.now();
  const response = await fetch(path + query, { signal, headers: token ? { Authorization: `Bearer ${token}` } : {} });
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
  const kept = Object.fromEntries(["label", "from-label", "to-label", "blend-label"].map((id) => [id, $(id).value]));
  const same = state.classNames === names.join("\n");
  state.classNames = names.join("\n");
  for (const id of ["label", "from-label", "to-label"]) {
    $(id).replaceChildren(...names.map((name, i) => new Option(name, i)));
  }
  $("blend-label").replaceChildren(new Option("none", ""), ...names.map((name, i) => new Option(name, i)));
  if (same) for (const [id, value] of Object.entries(kept)) $(id).value = value;
  else if (names.length > 1) $("to-label").value = "1";
  showValues(); // the blend slider is off while its partner is "none"
  buildDirections(model);
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
    // Both rounded alike, and the round trip is at least the server's number: it never shows the smaller figure.
    const serverText = Number.isNaN(server) ? "" : `server ${server.toFixed(1)} ms · `; // a proxy may drop the header
    view.timing.textContent = `${serverText}round trip ${roundTrip.toFixed(1)} ms`;
    view.download.disabled = false;
    view.img.dataset.seq = Number(view.img.dataset.seq) + 1; // lets a test wait for this very image
    view.img.dataset.state = "ready";
    setError(source, "");
    return probe;
  } catch (e) {
    if (url) URL.revokeObjectURL(url);
    if (controller.signal.aborted) return null;
    view.img.dataset.state = "error";
    setError(source, `${source === "grid" ? "Grid" : "Interpolation"}: ${e.message}`);
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

// Fields as they are typed or dragged; a <select> once it changes (scripted picks fire no "input").
const on = (id, fn) => $(id).addEventListener($(id).tagName === "SELECT" ? "change" : "input", fn);
for (const id of ["seed", "count", "columns", "label", "blend-label", "blend"]) on(id, gridLater);
for (const id of ["from", "to", "from-label", "to-label", "steps", "method"]) on(id, stripLater);
for (const id of ["psi", "blend", "blend-label"]) on(id, showValues);
on("psi", allLater);
on("version", renderAll);
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

$("token").value = sessionStorage.getItem(TOKEN_KEY) || "";
showValues();
loadModels();
