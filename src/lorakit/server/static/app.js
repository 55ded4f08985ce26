// lorakit web page: a LoRA browser and txt2img over the A1111-compatible API. No build step, no dependencies.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { loras: [], gallery: [], generating: false };

async function api(path, options = {}) {
  const res = await fetch(path, { headers: { "Content-Type": "application/json" }, ...options });
  const body = await res.json().catch(() => null);
  if (!res.ok) throw new Error(errorText(body) || `${res.status} ${res.statusText}`);
  return body;
}

// A lorakit error has a string detail; a validation error FastAPI's list of {loc, msg}: one line each,
// "steps: Input should be less than or equal to 150" (loc without its leading "body").
function errorText(body) {
  if (!body) return "";
  if (typeof body.detail === "string") return body.detail;
  if (Array.isArray(body.detail)) {
    return body.detail.map((e) => {
      const where = (e.loc || []).filter((part, i) => !(i === 0 && part === "body")).join(".");
      return where ? `${where}: ${e.msg}` : String(e.msg);
    }).join("\n");
  }
  return body.detail === undefined ? "" : JSON.stringify(body.detail);
}

const plural = (n, one, many) => `${n} ${n === 1 ? one : many}`;

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else if (k === "text") node.textContent = v; else node.setAttribute(k, v);
  }
  node.append(...children);
  return node;
}

async function loadLoras() {
  const params = new URLSearchParams();
  if ($("base-filter").value) params.set("base", $("base-filter").value);
  if ($("search").value.trim()) params.set("search", $("search").value.trim());
  const data = await api(`/lorakit/v1/loras?${params}`);
  $("model").textContent = `model: ${data.model.title}`;
  state.loras = data.loras;
  renderLoras();
}

function renderLoras() {
  const box = $("loras");
  box.replaceChildren(...state.loras.map(card));
  const dimmed = state.loras.filter((l) => fitOf(l) === "no").length;
  $("lora-count").textContent = plural(state.loras.length, "LoRA", "LoRAs") +
    (dimmed ? ` · ${dimmed} dimmed: made for another base or unreadable` : "");
}

// "yes", "maybe" (a base nobody knows: may not fit) or "no" (another base, or a file that cannot be used).
const fitOf = (lora) => lora.error ? "no" : (lora.fit || (lora.compatible ? "yes" : "no"));

function card(lora) {
  const thumb = el("div", { class: "thumb" });
  if (lora.preview_url) thumb.style.backgroundImage = `url("${lora.preview_url}")`;
  else thumb.textContent = lora.name.slice(0, 2).toUpperCase();
  const folder = lora.subpath && lora.subpath.includes("/") ? lora.subpath.slice(0, lora.subpath.lastIndexOf("/")) : "";
  const body = el("div", { class: "body" },
    el("div", { class: "name", text: lora.name }),
    folder ? el("div", { class: "folder", text: `${folder}/` }) : "",
    el("span", { class: `badge base-${lora.base}`, text: lora.base }),
    el("span", { class: "badge", text: (lora.types || []).join(", ") || "?" }),
    lora.rank ? el("span", { class: "badge", text: `r${lora.rank}` }) : "");
  if (lora.trigger_words.length) body.append(el("div", { class: "triggers", text: lora.trigger_words.slice(0, 4).join(", ") }));
  if (lora.reason) body.append(el("div", { class: "reason", text: lora.reason }));
  if (lora.error) body.append(el("div", { class: "reason error-text", text: lora.error }));
  const fit = fitOf(lora);
  const node = el("div", { class: "lora-card" + (fit === "no" ? " incompatible" : fit === "maybe" ? " maybe" : ""),
                           "data-name": lora.prompt_name, title: lora.reason || lora.description || lora.subpath },
                  thumb, body);
  // A double click sends two clicks (detail 1, then 2): only the first inserts.
  node.addEventListener("click", (event) => { if (event.detail <= 1) pickLora(lora); });
  return node;
}

// Never insert silently what cannot work: an unreadable file is refused, another base asks first, an unknown
// base is inserted with a warning line.
function pickLora(lora) {
  warn("");
  const fit = fitOf(lora);
  if (lora.error) {
    warn(`${lora.subpath || lora.name} cannot be used: ${lora.error}`);
    return;
  }
  const reason = lora.reason || "it does not fit this model";
  if (fit === "no" && !window.confirm(`${lora.name}: ${reason}.\nInsert it anyway?`)) {
    warn(`${lora.name} not inserted: ${reason}`);
    return;
  }
  insertLora(lora);
  if (fit !== "yes") warn(`${lora.name}: ${lora.reason || "it may not fit this model"}`);
}

function warn(text) {
  $("warning").textContent = text;
  $("warning").hidden = !text;
}

function insertLora(lora) {
  const box = $("prompt");
  const weight = lora.preferred_weight || 1;
  let text = `<lora:${lora.prompt_name}:${weight}>`;
  // A1111's activation text is comma-separated phrases: each is checked (and added) on its own.
  const words = lora.activation_text ? lora.activation_text.split(",").map((w) => w.trim()).filter(Boolean)
    : lora.explicit_trigger_words;
  if ($("insert-triggers").checked && words.length) {
    const missing = words.filter((w) => !box.value.toLowerCase().includes(w.toLowerCase()));
    if (missing.length) text += ", " + missing.join(", ");
  }
  const negative = $("negative");
  if ($("insert-triggers").checked && lora.negative_text &&
      !negative.value.toLowerCase().includes(lora.negative_text.toLowerCase())) {
    negative.value = negative.value.trim() ? `${negative.value.trim()}, ${lora.negative_text}` : lora.negative_text;
  }
  const start = box.selectionStart ?? box.value.length, end = box.selectionEnd ?? start;
  const before = box.value.slice(0, start), after = box.value.slice(end);
  const pad = before && !/\s$/.test(before) ? " " : "";
  box.value = before + pad + text + (after && !/^\s/.test(after) ? " " : "") + after;
  const cursor = (before + pad + text).length;
  box.focus();
  box.setSelectionRange(cursor, cursor);
}

function numberOrNull(id) {
  const v = $(id).value.trim();
  return v === "" ? null : Number(v);
}

async function generate() {
  $("error").hidden = true;
  $("generate").disabled = true;
  state.generating = true;
  const payload = {
    prompt: $("prompt").value, negative_prompt: $("negative").value, seed: numberOrNull("seed") ?? -1,
    width: numberOrNull("width") ?? 512, height: numberOrNull("height") ?? 512, batch_size: numberOrNull("batch") ?? 1,
  };
  for (const [key, id] of [["steps", "steps"], ["cfg_scale", "cfg"]]) if (numberOrNull(id) !== null) payload[key] = numberOrNull(id);
  if ($("sampler").value) payload.sampler_name = $("sampler").value;
  const poll = setInterval(showProgress, 250);
  showProgress();
  try {
    const res = await api("/sdapi/v1/txt2img", { method: "POST", body: JSON.stringify(payload) });
    const info = JSON.parse(res.info);
    res.images.forEach((b64, i) => state.gallery.push({ src: `data:image/png;base64,${b64}`, text: info.infotexts[i] }));
    renderGallery();
    show(state.gallery.length - res.images.length);
  } catch (err) {
    $("error").textContent = err.message;
    $("error").hidden = false;
  } finally {
    state.generating = false;  // a poll still in flight must not show the bar again
    clearInterval(poll);
    hideProgress();
    $("generate").disabled = false;
  }
}

function hideProgress() {
  $("progress").hidden = true;
  $("progress-bar").style.width = "0%";
  $("progress-text").textContent = "";
}

async function showProgress() {
  try {
    const p = await api("/sdapi/v1/progress");
    if (!state.generating) return;
    $("progress").hidden = false;
    $("progress-bar").style.width = `${Math.round(p.progress * 100)}%`;
    const s = p.state;
    $("progress-text").textContent = s.sampling_steps ? `step ${s.sampling_step}/${s.sampling_steps}` :
      (s.job_count > 1 ? `queued (${s.job_count} jobs)` : "starting…");
  } catch (err) { /* progress is best effort */ }
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
  [...$("gallery").children].forEach((img, j) => img.classList.toggle("current", i === j));
}

async function init() {
  const samplers = await api("/sdapi/v1/samplers");
  $("sampler").append(...samplers.map((s) => el("option", { value: s.name, text: s.name })));
  const options = await api("/sdapi/v1/options");
  $("insert-triggers").checked = !!options.lorakit_auto_trigger_words;
  $("generate").addEventListener("click", generate);
  $("search").addEventListener("input", () => loadLoras().catch(showError));
  $("base-filter").addEventListener("change", () => loadLoras().catch(showError));
  $("refresh").addEventListener("click", async () => { await api("/lorakit/v1/refresh", { method: "POST" }); await loadLoras(); });
  await loadLoras();
}

function showError(err) { $("error").textContent = err.message; $("error").hidden = false; }

init().catch(showError);
