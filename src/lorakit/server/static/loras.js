// The LoRA browser. Fast with a real collection (10,000 files): the list is fetched once; the search and the base
// filter run here on precomputed lowercase haystacks (what the server's search matches: sub-path, alias, trigger
// words, description); cards are built only when shown — the first PAGE, then PAGE more each time the end of the
// list comes near the screen (or "show more" is pressed) — and kept, so a search shows them again without
// building them twice. Every LoRA is listed (other bases dimmed with the reason, unreadable files with the error);
// a card's base badge shows the finer base where the file tells it (FLUX.1: flux-1-dev, flux-1-schnell, …).
import { $, api, el, plural, setValue, timings } from "./util.js";

const PAGE = 60;
const NEAR = 600;  // px below the screen where the next page is built
const state = { all: [], shown: [], rendered: 0, cards: new Map() };

export async function loadLoras() {
  timings.lorasRequested = performance.now();
  const data = await api("/lorakit/v1/loras");
  timings.lorasReceived = performance.now();
  for (const lora of data.loras) {
    lora.hay = [lora.subpath, lora.alias, ...lora.trigger_words, lora.description || ""].join(" ").toLowerCase();
  }
  state.all = data.loras;
  state.cards.clear();
  filter();
  void $("loras").offsetHeight;  // laid out: the mark below is when the cards can be seen
  timings.cardsShown = performance.now();
  return data;
}

// Show the LoRAs that match the search text and the base filter, from the top.
export function filter() {
  const needle = $("search").value.trim().toLowerCase(), base = $("base-filter").value;
  state.shown = state.all.filter((l) => (!base || l.base === base || l.variant === base) &&
                                       (!needle || l.hay.includes(needle)));
  state.rendered = 0;
  $("loras").replaceChildren();
  more();
  const dimmed = state.shown.reduce((n, l) => n + (fitOf(l) === "no"), 0);
  $("lora-count").textContent = plural(state.shown.length, "LoRA", "LoRAs") +
    (dimmed ? ` · ${dimmed.toLocaleString("en-US")} dimmed: made for another base or unreadable` : "");
}

// Append the next PAGE cards; "show more" (observed, so scrolling near it is enough) while some are left.
function more() {
  const next = state.shown.slice(state.rendered, state.rendered + PAGE);
  state.rendered += next.length;
  $("loras").append(...next.map(cardOf));
  const left = state.shown.length - state.rendered;
  $("more").hidden = left <= 0;
  $("more").textContent = `show ${Math.min(left, PAGE)} more (${left.toLocaleString("en-US")} not shown)`;
}

// More pages while the end of the list stays near the screen (the observer only reports a change).
function fill() {
  more();
  requestAnimationFrame(() => {
    if (!$("more").hidden && $("more").getBoundingClientRect().top < window.innerHeight + NEAR) fill();
  });
}

function cardOf(lora) {
  let node = state.cards.get(lora);
  if (!node) state.cards.set(lora, node = card(lora));
  return node;
}

// "yes", "maybe" (a base nobody knows: may not fit) or "no" (another base, or a file that cannot be used).
const fitOf = (lora) => lora.error ? "no" : (lora.fit || (lora.compatible ? "yes" : "no"));

// The badge's colour class: "base-sd1", "base-flux1", "base-chroma", "base-stable-diffusion-3" …
const baseClass = (base) => `base-${String(base).toLowerCase().replace(/[^a-z0-9]+/g, "-")}`;

function card(lora) {
  const thumb = el("div", { class: "thumb" });
  if (lora.preview_url) thumb.style.backgroundImage = `url("${lora.preview_url}")`;
  else thumb.textContent = lora.name.slice(0, 2).toUpperCase();
  const folder = lora.subpath && lora.subpath.includes("/") ? lora.subpath.slice(0, lora.subpath.lastIndexOf("/")) : "";
  const body = el("div", { class: "body" },
    el("div", { class: "name", text: lora.name }),
    folder ? el("div", { class: "folder", text: `${folder}/` }) : "",
    el("span", { class: `badge base ${baseClass(lora.base)}`, text: lora.variant || lora.base }),
    el("span", { class: "badge", text: (lora.types || []).join(", ") || "?" }),
    lora.rank ? el("span", { class: "badge", text: `r${lora.rank}` }) : "");
  // As A1111's cards: the trigger (declared, or a tag every training caption had) first; the other tags apart.
  const declared = lora.trained_trigger_words || [];
  const tags = lora.trigger_words.filter((w) => !declared.some((d) => d.toLowerCase() === w.toLowerCase()));
  if (declared.length) body.append(el("div", { class: "triggers", text: `trigger: ${declared.slice(0, 4).join(", ")}` }));
  if (tags.length) body.append(el("div", { class: "tags", title: tags.join("\n"), text: `tags: ${tags.slice(0, 3).join(" · ")}` }));
  if (lora.reason) body.append(el("div", { class: "reason", text: lora.reason }));
  if (lora.error) body.append(el("div", { class: "reason error-text", text: lora.error }));
  const fit = fitOf(lora);
  const node = el("div", { class: "lora-card" + (fit === "no" ? " incompatible" : fit === "maybe" ? " maybe" : ""),
                           "data-name": lora.prompt_name, title: lora.reason || lora.description || lora.subpath,
                           tabindex: "0", role: "button" }, thumb, body);
  node.lora = lora;
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
    setValue(negative, negative.value.trim() ? `${negative.value.trim()}, ${lora.negative_text}` : lora.negative_text);
  }
  const start = box.selectionStart ?? box.value.length, end = box.selectionEnd ?? start;
  const before = box.value.slice(0, start), after = box.value.slice(end);
  const pad = before && !/\s$/.test(before) ? " " : "";
  setValue(box, before + pad + text + (after && !/^\s/.test(after) ? " " : "") + after);
  const cursor = (before + pad + text).length;
  box.focus();
  box.setSelectionRange(cursor, cursor);
}

export function initBrowser() {
  const box = $("loras");
  // A double click sends two clicks (detail 1, then 2): only the first inserts.
  box.addEventListener("click", (event) => {
    const node = event.target.closest(".lora-card");
    if (node && event.detail <= 1) pickLora(node.lora);
  });
  box.addEventListener("keydown", (event) => {
    const node = event.target.closest(".lora-card");
    if (node && (event.key === "Enter" || event.key === " ")) {
      event.preventDefault();
      pickLora(node.lora);
    }
  });
  $("more").addEventListener("click", more);
  new IntersectionObserver((seen) => { if (seen.some((e) => e.isIntersecting)) fill(); },
                           { rootMargin: `0px 0px ${NEAR}px 0px` }).observe($("more"));
  $("search").addEventListener("input", filter);
  $("base-filter").addEventListener("change", filter);
  $("refresh").addEventListener("click", async () => {
    await api("/lorakit/v1/refresh", { method: "POST" });
    await loadLoras();
  });
}
