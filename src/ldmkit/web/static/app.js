// ldmkit serve: the page. It only calls the server's /api (same origin); no other URL.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { run: null, info: null, job: null, editJob: null, lastResult: null, trainTimer: null, lastPreview: null };

// ------------------------------------------------------------------ talking to the server
async function call(path, body) {
  const opts = {};
  if (body instanceof FormData) opts.method = "POST", opts.body = body;
  else if (body !== undefined) {
    opts.method = "POST";
    opts.headers = { "Content-Type": "application/json" };
    opts.body = JSON.stringify(body);
  }
  const r = await fetch(path, opts);
  const json = (r.headers.get("content-type") || "").includes("json") ? await r.json() : null;
  if (!r.ok) throw new Error((json && json.error) || `${r.status} ${r.statusText}`);
  return json;
}

function q(params) { return new URLSearchParams(params).toString(); }

function showError(message) {
  $("error").textContent = message || "";
  $("error").hidden = !message;
}

async function guarded(fn) {
  try { showError(""); await fn(); } catch (e) { showError(e.message); }
}

// ------------------------------------------------------------------ runs
async function loadRuns() {
  const data = await call("/api/runs"), select = $("run"), current = state.run;
  select.replaceChildren(...data.runs.map((r) => new Option(r.name + (r.training ? " (training)" : ""), r.name, false, r.name === current)));
  if (!data.runs.length) { showError(`no runs in ${data.root}; train one in the New run tab, or with ldmkit train --out ${data.root}/NAME`); return; }
  if (select.value !== current) await pickRun(select.value);
}

async function pickRun(name) {
  state.run = name;
  const info = state.info = await call("/api/run?" + q({ run: name }));
  $("run-state").textContent = info.training ? "training now" : info.trained ? "trained" : "not trained yet";
  const facts = [["data", `${info.data.name || info.data.spec} (${info.data.num_images ?? "?"} images)`],
    ["image size", `${info.image_size} px, ${info.data.channels ?? "?"} channels`],
    ["condition", info.conditioning === "class" ? info.class_names.join(", ") : info.conditioning === "text" ? "text prompts" : "none"],
    ["guidance", String(info.guidance)], ["timesteps", String(info.num_timesteps)],
    ...(info.video ? [["video", `${info.video.frames} frames at ${info.video.fps} fps`]] : [])];
  $("facts").replaceChildren(...facts.flatMap(([k, v]) => [el("dt", k), el("dd", v)]));
  const warnings = info.warnings || [];
  $("run-warnings").replaceChildren(...warnings.map((w) => Object.assign(document.createElement("li"), { textContent: w })));
  $("run-warnings").hidden = warnings.length === 0;
  showRunImage("samples", info.images.samples);
  showRunImage("clips", info.clips);  // a video run's final clips: an animated GIF plays in an <img>
  showRunImage("loss", info.images.loss);
  showAdapters(info.adapters || []);
  fillSampleForm(info);
  adapterChanged();
  fillEditForm(info);
  if (!$("tab-train").hidden) refreshTraining();
}

function el(tag, text) { const e = document.createElement(tag); e.textContent = text; return e; }

function showRunImage(which, present) {
  $(`${which}-fig`).hidden = !present;
  if (present) $(`${which}-img`).src = "/api/run/image?" + q({ run: state.run, which, t: Date.now() });
}

// ------------------------------------------------------------------ forms from the server
// The fields of a verb's options come from the server (ldmkit/options.py via web/forms.py):
// {name, label, value, and min / max / step / type, or options (empty: the label of "")}.
// Drawn again (another run, another method), a field keeps what the user typed unless the
// server's value for it changed (the run's guidance).
function drawFields(container, fields, prefix) {
  const before = {};
  for (const input of container.querySelectorAll("[data-kind]")) before[input.name] = input;
  container.replaceChildren(...fields.map((f) => {
    const label = el("label", f.label);
    let input, kind = "number";
    if (f.options) {
      input = document.createElement("select"); kind = "choice";
      input.replaceChildren(...f.options.map((o) => new Option(o || f.empty || "(none)", o, false, o === f.value)));
    } else if (f.type === "lines") {
      input = document.createElement("textarea"); kind = "lines";
      Object.assign(input, { rows: 2, value: Array.isArray(f.value) ? f.value.join("\n") : "" });
      label.className = "wide-field";
    } else {
      input = document.createElement("input");
      if (f.type === "file") { kind = "file"; Object.assign(input, { type: "file", accept: "image/png,image/jpeg,image/webp" }); }
      else if (f.type === "text") { kind = "text"; Object.assign(input, { type: "text", value: f.value ?? "" }); }
      else Object.assign(input, { type: f.type || "number", min: f.min ?? "", max: f.max ?? "", step: f.step ?? "any", value: f.value ?? "" });
    }
    input.name = f.name; input.id = prefix + f.name; input.dataset.kind = kind;
    input.dataset.initial = JSON.stringify(f.value ?? null);
    const old = before[f.name];
    if (old && kind !== "file" && old.dataset.kind === kind && old.dataset.initial === input.dataset.initial
        && (kind !== "choice" || f.options.includes(old.value))) input.value = old.value;
    label.append(input);
    return label;
  }));
}

// The values of the drawn fields, by name; an empty one is left out (the server's default).
function readFields(container) {
  const params = {};
  for (const input of container.querySelectorAll("input, select, textarea")) {
    const kind = input.dataset.kind, value = kind === "choice" ? input.value : input.value.trim();
    if (kind === "file" || value === "") continue;
    params[input.name] = kind === "number" ? Number(value)
      : kind === "lines" ? value.split("\n").map((s) => s.trim()).filter(Boolean) : value;
  }
  return params;
}

// ------------------------------------------------------------------ sample
function fillSampleForm(info) {
  drawFields($("sample-params"), info.sampling || [], "");
  $("generate").disabled = !info.trained;
}

// A run's adapters (RUN/adapters/NAME, issue 28): listed in the run panel; the sample form
// picks one that fits by name, with its scale (the new class joins the class names).
function showAdapters(adapters) {
  $("adapters").replaceChildren(...adapters.map((a) => el("li", a.fits
    ? `${a.name}: ${a.class_name ? "class " + a.class_name : "style"}, scale ${a.scale}, rank ${a.rank}, ${a.kb} KB`
    : `${a.name}: does not fit (${a.why})`)));
  $("adapters-box").hidden = adapters.length === 0;
  const fitting = adapters.filter((a) => a.fits), kept = $("adapter").value;
  $("adapter").replaceChildren(new Option("none", ""), ...fitting.map((a) =>
    new Option(a.class_name ? `${a.name} (class ${a.class_name})` : a.name, a.name)));
  if (fitting.some((a) => a.name === kept)) $("adapter").value = kept;  // a reload keeps the pick
  $("adapter-pick").hidden = fitting.length === 0;
  state.adapters = fitting;
}

// The chosen adapter's class joins the class choices (and leaves with it).
function adapterChanged() {
  const classes = $("sample-params").querySelector('select[name="classes"]');
  if (!classes) return;
  for (const o of [...classes.options]) if (o.dataset.adapter) o.remove();
  const chosen = (state.adapters || []).find((a) => a.name === $("adapter").value);
  if (chosen && chosen.class_name) {
    const option = new Option(chosen.class_name, chosen.class_name);
    option.dataset.adapter = chosen.name;
    classes.add(option);
  }
}

function sampleRequest() {
  const request = { run: state.run, ...readFields($("sample-params")) };
  if ($("adapter").value) {
    request.adapter = $("adapter").value;
    request.adapter_scale = Number($("adapter-scale").value);
  }
  return request;
}

async function generate(event) {
  event.preventDefault();
  await guarded(async () => {
    const { job } = await call("/api/sample", sampleRequest());
    $("result").hidden = true; $("download").hidden = true; $("preview").hidden = true; $("result-notes").hidden = true;
    await follow(job, { progress: $("progress"), text: $("progress-text"), cancel: $("cancel"), preview: $("preview"),
      done: (j) => {
        const url = "/api/job/result?" + q({ id: j.id });
        // a grid with row labels is shown as drawn (its labels are drawn at the size they are
        // shown; enlarged they would blur); one without is enlarged, pixel for pixel
        $("result").classList.toggle("as-drawn", Boolean(j.info.row_labels));
        $("result").src = url; $("result").hidden = false;
        $("result-text").textContent = j.info.description;
        const notes = j.info.notes || [];
        $("result-notes").replaceChildren(...notes.map((n) => el("li", n)));
        $("result-notes").hidden = notes.length === 0;
        $("download").href = url + "&download=1"; $("download").hidden = false;
        state.lastResult = { id: j.id, url };
        $("use-result").disabled = false;
      } });
  });
}

// Poll a job until it ends, showing its step, place in the queue and x0 preview.
async function follow(job, ui) {
  let lastStep = -1;
  ui.cancel.disabled = false;
  ui.cancel.onclick = () => guarded(() => call("/api/job/cancel", { id: job.id }));
  try {
    for (;;) {
      ui.progress.max = Math.max(job.total, 1); ui.progress.value = job.step;
      ui.text.textContent = job.state === "queued" ? `waiting (${job.position} ahead)`
        : job.total ? `${job.state}: step ${job.step} of ${job.total}` : job.state;
      if (!job.total && job.state === "running") ui.progress.removeAttribute("value");  // indeterminate
      if (ui.preview && job.has_preview && job.step !== lastStep) {
        ui.preview.src = "/api/job/preview?" + q({ id: job.id, step: job.step }); ui.preview.hidden = false;
        lastStep = job.step;
      }
      if (job.state === "done") { ui.progress.value = ui.progress.max; ui.done(job); return; }
      if (job.state === "failed") throw new Error(job.error);
      if (job.state === "cancelled") return;
      await new Promise((r) => setTimeout(r, 300));
      job = await call("/api/job?" + q({ id: job.id }));
    }
  } finally { ui.cancel.disabled = true; }
}

// ------------------------------------------------------------------ edit: source image and mask
const mask = { w: 32, h: 32, data: new Uint8Array(32 * 32), drawing: false, last: null };

function setSource(bitmap) {
  const w = bitmap.width, h = bitmap.height;
  for (const id of ["source", "mask"]) { $(id).width = w; $(id).height = h; }
  $("source").getContext("2d").drawImage(bitmap, 0, 0);
  Object.assign(mask, { w, h, data: new Uint8Array(w * h) });
  drawMask();
}

async function useLastResult() {
  const blob = await (await fetch("/api/job/image?" + q({ id: state.lastResult.id, i: 0 }))).blob();
  setSource(await createImageBitmap(blob));
}

function paint(x, y) {
  const r = Number($("brush-size").value) / 2, value = document.querySelector("input[name=tool]:checked").value === "brush" ? 1 : 0;
  for (let py = Math.floor(y - r); py <= Math.ceil(y + r); py++) {
    for (let px = Math.floor(x - r); px <= Math.ceil(x + r); px++) {
      if (px < 0 || py < 0 || px >= mask.w || py >= mask.h) continue;
      if ((px + 0.5 - x) ** 2 + (py + 0.5 - y) ** 2 <= r * r) mask.data[py * mask.w + px] = value;
    }
  }
}

function stroke(event) {
  const box = $("mask").getBoundingClientRect();
  const p = { x: (event.clientX - box.left) / box.width * mask.w, y: (event.clientY - box.top) / box.height * mask.h };
  const from = mask.last || p, steps = Math.max(1, Math.ceil(Math.hypot(p.x - from.x, p.y - from.y) * 2));
  for (let i = 1; i <= steps; i++) paint(from.x + (p.x - from.x) * i / steps, from.y + (p.y - from.y) * i / steps);
  mask.last = p;
  drawMask();
}

function drawMask() {
  const ctx = $("mask").getContext("2d"), img = ctx.createImageData(mask.w, mask.h);
  mask.data.forEach((m, i) => { if (m) img.data.set([255, 40, 40, 150], i * 4); });
  ctx.putImageData(img, 0, 0);
}

function maskBlob() {
  const c = document.createElement("canvas"); c.width = mask.w; c.height = mask.h;
  const ctx = c.getContext("2d"), img = ctx.createImageData(mask.w, mask.h);
  mask.data.forEach((m, i) => img.data.set([255 * m, 255 * m, 255 * m, 255], i * 4));
  ctx.putImageData(img, 0, 0);
  return new Promise((resolve) => c.toBlob(resolve, "image/png"));
}

// ------------------------------------------------------------------ edit: methods from the server
function fillEditForm(info) {
  const methods = info.editing || {};
  $("edit-tab").hidden = !Object.keys(methods).length;
  $("edit-method").replaceChildren(...Object.keys(methods).map((k) => new Option(methods[k].label, k)));
  showEditParams();
}

function showEditParams() {
  const spec = (state.info.editing || {})[$("edit-method").value];
  if (!spec) return;
  $("mask-tools").hidden = !spec.mask;
  $("mask").hidden = !spec.mask;
  drawFields($("edit-params"), spec.fields, "edit-");
}

function editParams() {
  return readFields($("edit-params"));
}

async function runEdit() {
  await guarded(async () => {
    const method = $("edit-method").value, spec = state.info.editing[method];
    const form = new FormData();
    form.append("run", state.run); form.append("method", method);
    const params = editParams();
    form.append("params", JSON.stringify(params));
    if (spec.image || params.between === "images") form.append("image", await new Promise((r) => $("source").toBlob(r, "image/png")), "image.png");
    if (spec.mask) form.append("mask", await maskBlob(), "mask.png");
    for (const input of $("edit-params").querySelectorAll("input[type=file]")) {
      if (input.files[0]) form.append(input.name, input.files[0]);
    }
    const { job } = await call("/api/edit", form);
    $("edit-result").hidden = true; $("edit-download").hidden = true; $("anim-fig").hidden = true;
    await follow(job, { progress: $("edit-progress"), text: $("edit-progress-text"), cancel: $("edit-cancel"),
      done: (j) => {
        const url = "/api/job/result?" + q({ id: j.id });
        $("edit-result").src = url; $("edit-result").hidden = false;
        $("edit-text").textContent = (j.info.notes || []).join(" ") || "result";
        $("edit-download").href = url + "&download=1"; $("edit-download").hidden = false;
        if (j.info.frames > 1) animate(url, j.info.frames);
      } });
  });
}

// An interpolation comes as one strip of frames; play it on a canvas, frame by frame.
async function animate(url, frames) {
  const strip = await createImageBitmap(await (await fetch(url)).blob());
  const w = strip.width / frames, c = $("anim"), ctx = c.getContext("2d");
  c.width = w; c.height = strip.height; $("anim-fig").hidden = false;
  let i = 0;
  clearInterval(state.animTimer);
  state.animTimer = setInterval(() => { ctx.drawImage(strip, i * w, 0, w, strip.height, 0, 0, w, strip.height); i = (i + 1) % frames; }, 150);
}

// ------------------------------------------------------------------ training
async function refreshTraining() {
  if (!state.run) return;
  const info = await call("/api/run?" + q({ run: state.run }));
  const started = (await call("/api/train")).training;  // a training this page started
  const ended = started && started.run === state.run && !info.training && started.state !== "running" && started.state !== "starting";
  $("train-state").textContent = info.training
    ? (info.stop_requested ? "stop requested: the training saves a checkpoint and stops" : "training now (refreshed every 2 s)")
    : ended && started.error ? `the training failed: ${started.error}`
    : "no training is running in this run";
  $("stop").disabled = !info.training || info.stop_requested;
  drawLoss((await call("/api/run/log?" + q({ run: state.run }))).stages);
  const preview = info.images.preview;
  $("train-preview").hidden = !preview;
  if (preview && preview !== state.lastPreview) {
    $("train-preview").src = "/api/run/image?" + q({ run: state.run, which: "preview", name: preview });
    $("train-preview-text").textContent = `newest preview: ${preview}`;
    state.lastPreview = preview;
  }
}

function drawLoss(stages) {
  const c = $("loss-chart"), ctx = c.getContext("2d"), pad = 40;
  ctx.clearRect(0, 0, c.width, c.height);
  const all = Object.values(stages).flat();
  if (!all.length) { ctx.fillText("no loss rows yet", pad, pad); return; }
  const ys = all.map((r) => Math.log10(Math.max(r[1], 1e-12)));
  const [y0, y1] = [Math.min(...ys), Math.max(...ys) + 1e-9];
  const colors = ["#2b6cb0", "#c05621", "#2f855a", "#6b46c1"];
  ctx.strokeStyle = "#999"; ctx.strokeRect(pad, 10, c.width - pad - 10, c.height - pad - 10);
  ctx.fillStyle = "#444";
  ctx.fillText(`${(10 ** y1).toPrecision(3)}`, 2, 18); ctx.fillText(`${(10 ** y0).toPrecision(3)}`, 2, c.height - pad);
  ctx.fillText("step (log-scale loss)", c.width / 2 - 50, c.height - 8);
  Object.entries(stages).forEach(([stage, rows], k) => {
    const xmax = Math.max(...rows.map((r) => r[0]), 1);
    ctx.strokeStyle = ctx.fillStyle = colors[k % colors.length];
    ctx.beginPath();
    rows.forEach(([step, loss], i) => {
      const x = pad + (step / xmax) * (c.width - pad - 10);
      const y = 10 + (1 - (Math.log10(Math.max(loss, 1e-12)) - y0) / (y1 - y0)) * (c.height - pad - 10);
      i ? ctx.lineTo(x, y) : ctx.moveTo(x, y);
    });
    ctx.stroke();
    ctx.fillText(stage, c.width - 120, 24 + 14 * k);
  });
}

async function stopTraining() {
  await guarded(async () => {
    await call("/api/run/stop", { run: state.run });
    await refreshTraining();
  });
}

// ------------------------------------------------------------------ new run
// The form's fields are `ldmkit train`'s options (options.TrainOptions, from the server); a
// training starts only after its plan was shown for the values in the form.
async function loadNewRunForm() {
  const form = await call("/api/train");
  drawFields($("new-params"), form.fields, "new-");
  $("new-where").textContent = (form.data_root
    ? `data: a folder under ${form.data_root}, or builtin:shapes`
    : "data: builtin:shapes, builtin:mnist or builtin:digits (start the server with --data-root DIR to train on your folders)")
    + (form.config ? `; trainings start from ${form.config}` : "");
  state.newForm = form;
}

function newRunRequest() {
  return { run: $("new-run").value.trim(), ...readFields($("new-params")) };
}

function planChanged() {
  $("new-start").disabled = true;
  state.planned = null;
}

async function showPlan() {
  await guarded(async () => {
    planChanged();
    const request = newRunRequest();
    $("new-plan-state").textContent = "reading the data and timing a step of each model...";
    $("new-plan-text").hidden = true;
    try {
      const plan = await call("/api/train/plan", request);
      $("new-plan-text").textContent = plan.lines.join("\n");
      $("new-plan-text").hidden = false;
      $("new-plan-state").textContent = `the plan of ${plan.run}; start it, or change the form`;
      state.planned = JSON.stringify(request);
      $("new-start").disabled = false;
    } catch (e) { $("new-plan-state").textContent = ""; throw e; }
  });
}

async function startTraining(event) {
  event.preventDefault();
  await guarded(async () => {
    const request = newRunRequest();
    if (state.planned !== JSON.stringify(request)) { planChanged(); throw new Error("the form changed since its plan: show the plan again"); }
    $("new-start").disabled = true;
    $("new-plan-state").textContent = "starting...";
    const { training } = await call("/api/train", request);
    $("new-plan-state").textContent = `training ${training.run}: follow it in the Training tab`;
    state.planned = null;
    await loadRuns();
    $("run").value = training.run;
    await pickRun(training.run);
    showTab("train");
  });
}

// ------------------------------------------------------------------ wiring
function showTab(name) {
  document.querySelectorAll("#tabs button").forEach((b) => b.classList.toggle("active", b.dataset.tab === name));
  document.querySelectorAll(".tab").forEach((t) => { t.hidden = t.id !== `tab-${name}`; });
  clearInterval(state.trainTimer);
  if (name === "new") guarded(loadNewRunForm);
  if (name === "train") {
    guarded(refreshTraining);
    state.trainTimer = setInterval(() => guarded(refreshTraining), 2000);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("run").addEventListener("change", (e) => guarded(() => pickRun(e.target.value)));
  // runs started since the page opened join the list (not while it is open)
  setInterval(() => { if (document.activeElement !== $("run")) guarded(loadRuns); }, 10000);
  $("sample-form").addEventListener("submit", generate);
  $("adapter").addEventListener("change", adapterChanged);
  document.querySelectorAll("#tabs button").forEach((b) => b.addEventListener("click", () => showTab(b.dataset.tab)));
  $("stop").addEventListener("click", stopTraining);
  $("new-plan").addEventListener("click", showPlan);
  $("new-form").addEventListener("submit", startTraining);
  $("new-form").addEventListener("input", planChanged);
  $("edit-method").addEventListener("change", showEditParams);
  $("edit-run").addEventListener("click", runEdit);
  $("use-result").addEventListener("click", () => guarded(useLastResult));
  $("upload").addEventListener("change", (e) => guarded(async () => { if (e.target.files[0]) setSource(await createImageBitmap(e.target.files[0])); }));
  $("invert").addEventListener("click", () => { mask.data = mask.data.map((m) => 1 - m); drawMask(); });
  $("clear").addEventListener("click", () => { mask.data.fill(0); drawMask(); });
  const canvas = $("mask");
  canvas.addEventListener("pointerdown", (e) => { mask.drawing = true; mask.last = null; canvas.setPointerCapture(e.pointerId); stroke(e); });
  canvas.addEventListener("pointermove", (e) => { if (mask.drawing) stroke(e); });
  canvas.addEventListener("pointerup", () => { mask.drawing = false; mask.last = null; });
  guarded(loadRuns);
});
