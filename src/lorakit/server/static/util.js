// Small helpers shared by the page's modules: element lookup and creation, the JSON API, error text, files.

export const $ = (id) => document.getElementById(id);

// performance.now() marks (milliseconds since navigation) for benchmarks/page_collection.py and curious users.
export const timings = (window.lorakitTimings = { scriptStart: performance.now() });

export async function api(path, options = {}) {
  // No header on a body-less GET: the page's <link rel="preload"> of the LoRA list is then reused as it is.
  const res = await fetch(path, options.body ? { headers: { "Content-Type": "application/json" }, ...options } : options);
  const body = await res.json().catch(() => null);
  if (!res.ok) throw new Error(errorText(body) || `${res.status} ${res.statusText}`);
  return body;
}

// A lorakit error has a string detail; a validation error FastAPI's list of {loc, msg}: one line each,
// "steps: Input should be less than or equal to 150" (loc without its leading "body").
export function errorText(body) {
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

export const plural = (n, one, many) => `${n.toLocaleString("en-US")} ${n === 1 ? one : many}`;

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else if (k === "text") node.textContent = v; else node.setAttribute(k, v);
  }
  node.append(...children);
  return node;
}

export function showError(err) {
  $("error").textContent = err.message || String(err);
  $("error").hidden = false;
}

// A line under the prompt saying what a drop or a file picker did; kind "error" shows it in red.
export function notice(text, kind = "") {
  const box = $("notice");
  box.textContent = text;
  box.className = kind === "error" ? "error" : "muted";
  box.hidden = !text;
}

// A File as base64 without the "data:…;base64," prefix (A1111's endpoints take both; plain is the safer one).
export function fileBase64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).slice(String(reader.result).indexOf(",") + 1));
    reader.onerror = () => reject(reader.error || new Error(`${file.name}: cannot be read`));
    reader.readAsDataURL(file);
  });
}

// A textarea's value changed by code: tell the listeners (the LoRA weight sliders) as a hand edit would.
export function setValue(box, value) {
  box.value = value;
  box.dispatchEvent(new Event("input", { bubbles: true }));
}
