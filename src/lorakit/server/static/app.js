// lorakit web page: a LoRA browser, txt2img and img2img over the A1111-compatible API. No build step, no
// dependencies: ES modules — util (helpers), loras (the browser), tags (weight sliders), img2img, restore
// (parameters from a dropped PNG) — and this one, which generates, shows progress and keeps the gallery.
import { img2imgFields, initImg2img, mode } from "./img2img.js";
import { initBrowser, loadLoras } from "./loras.js";
import { initRestore } from "./restore.js";
import { attachSliders } from "./tags.js";
import { $, api, el, showError } from "./util.js";

const state = { gallery: [], run: null };
const SIZE_FIELDS = ["width", "height"];
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const POLL_MS = 250;

function numberOrNull(id) {
  const v = $(id).value.trim();
  return v === "" ? null : Number(v);
}

function payload() {
  const body = {
    prompt: $("prompt").value, negative_prompt: $("negative").value, seed: numberOrNull("seed") ?? -1,
    width: numberOrNull("width"), height: numberOrNull("height"), batch_size: numberOrNull("batch") ?? 1,
  };
  for (const [key, id] of [["steps", "steps"], ["cfg_scale", "cfg"]]) if (numberOrNull(id) !== null) body[key] = numberOrNull(id);
  if ($("sampler").value) body.sampler_name = $("sampler").value;
  return { ...body, ...img2imgFields() };
}

// Width and height follow the running model's native size (64 px for the demo model, 512 SD1, 1024 SDXL) until
// the user sets them (typing, a restored PNG, an init image's size); a model switched meanwhile is followed.
function followModel(model) {
  $("model").textContent = `model: ${model.title}`;
  for (const id of SIZE_FIELDS) if (!$(id).dataset.set) $(id).value = String(model.native_size);
}

async function generate() {
  $("error").hidden = true;
  let body;
  try {
    followModel(await api("/lorakit/v1/model"));
    body = payload();
  } catch (err) {
    showError(err);
    return;
  }
  const run = state.run = { active: true };
  busy(true);
  pollProgress(run);
  try {
    const res = await api(`/sdapi/v1/${mode()}`, { method: "POST", body: JSON.stringify(body) });
    const info = JSON.parse(res.info);
    const notes = (info.notes || []).join("\n");  // e.g. "interrupted after step 5 of 40"
    res.images.forEach((b64, i) => state.gallery.push({ src: `data:image/png;base64,${b64}`, text: info.infotexts[i],
                                                        notes }));
    renderGallery();
    if (res.images.length) show(state.gallery.length - res.images.length);
  } catch (err) {
    showError(err);
  } finally {
    run.active = false;  // a poll still in flight must not show the bar again
    busy(false);
  }
}

function busy(on) {
  $("generate").disabled = on;
  $("progress").hidden = !on;
  $("interrupt").hidden = !on;
  $("interrupt").disabled = false;
  $("interrupt").textContent = "Interrupt";
  $("progress-bar").style.width = "0%";
  $("progress-text").textContent = on ? "starting…" : "";
}

// A1111's /progress four times a second while this page's request runs: "step k / n" and the bar.
async function pollProgress(run) {
  while (run.active) {
    try {
      const p = await api("/sdapi/v1/progress");
      if (run.active) showProgress(p);
    } catch (err) { /* progress is best effort */ }
    await sleep(POLL_MS);
  }
}

function showProgress(p) {
  const s = p.state;
  $("progress-bar").style.width = `${Math.round(Math.min(1, Math.max(0, p.progress)) * 100)}%`;
  const eta = p.eta_relative > 0.5 ? ` · about ${Math.round(p.eta_relative)} s left` : "";
  $("progress-text").textContent = s.sampling_steps ? `step ${s.sampling_step} / ${s.sampling_steps}${eta}` :
    (s.job_count > 1 ? `queued (${s.job_count} jobs)` : "starting…");
}

// A1111's /interrupt stops the running job between steps; its request then returns what it has.
async function interrupt() {
  $("interrupt").disabled = true;
  $("interrupt").textContent = "interrupting…";
  try {
    await api("/sdapi/v1/interrupt", { method: "POST" });
  } catch (err) {
    showError(new Error(`interrupt: ${err.message}`));
    $("interrupt").disabled = false;
    $("interrupt").textContent = "Interrupt";
  }
}

function renderGallery() {
  $("gallery").replaceChildren(...state.gallery.map((g, i) => {
    const img = el("img", { src: g.src, alt: `image ${i + 1}` });
    img.addEventListener("click", () => show(i));
    return img;
  }));
}

function show(i) {
  const g = state.gallery[i];
  $("result").hidden = false;
  $("result-image").src = g.src;
  $("infotext").textContent = g.text;
  $("notes").textContent = g.notes;
  $("notes").hidden = !g.notes;
  [...$("gallery").children].forEach((img, j) => img.classList.toggle("current", i === j));
}

async function init() {
  initBrowser();
  initImg2img();
  initRestore();
  attachSliders($("prompt"), $("prompt-tags"));
  attachSliders($("negative"), $("negative-tags"));
  $("generate").addEventListener("click", generate);
  $("interrupt").addEventListener("click", interrupt);
  for (const id of SIZE_FIELDS) $(id).addEventListener("input", () => { $(id).dataset.set = "1"; });
  const loras = loadLoras().then((data) => followModel(data.model));  // preloaded by index.html; others meanwhile
  try {
    const [samplers, options] = await Promise.all([api("/sdapi/v1/samplers"), api("/sdapi/v1/options")]);
    $("sampler").append(...samplers.map((s) => el("option", { value: s.name, text: s.name })));
    $("insert-triggers").checked = !!options.lorakit_auto_trigger_words;
  } finally {
    await loras;
  }
}

init().catch(showError);
