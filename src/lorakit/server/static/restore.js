// Restore a generation's parameters from an image: a file dropped anywhere on the page (but on the img2img image
// boxes) or chosen with the "Restore from PNG" picker is sent to A1111's `/sdapi/v1/png-info`, and what its
// infotext says fills prompt, negative prompt, steps, CFG, sampler, seed, size (and denoising strength). The
// LoRA tags come back inside the prompt, so their sliders appear.
import { $, api, fileBase64, notice, setValue } from "./util.js";

// png-info's parameter → the page's field.
const FIELDS = [["Steps", "steps", "steps"], ["CFG scale", "cfg", "CFG"], ["Seed", "seed", "seed"],
                ["Size-1", "width", "width"], ["Size-2", "height", "height"],
                ["Denoising strength", "denoising", "denoising strength"]];

const hasFiles = (event) => !!event.dataTransfer && [...event.dataTransfer.types].includes("Files");

export async function restoreFrom(file) {
  if (!file) return;
  if (!file.type.startsWith("image/") && !/\.(png|jpe?g|webp|avif)$/i.test(file.name)) {
    notice(`${file.name} is not an image: drop a PNG made by lorakit or A1111 to restore its parameters`, "error");
    return;
  }
  notice(`reading ${file.name}…`);
  try {
    const res = await api("/sdapi/v1/png-info", { method: "POST", body: JSON.stringify({ image: await fileBase64(file) }) });
    const p = res.parameters || {};
    if (!res.info || typeof p.Prompt !== "string") {
      notice(`${file.name} has no generation parameters (no "parameters" text in the image): nothing restored`, "error");
      return;
    }
    const restored = apply(p);
    notice(`restored from ${file.name}: ${restored.join(", ")}`);
  } catch (err) {
    notice(`${file.name}: ${err.message}`, "error");
  }
}

// Fill the fields png-info's parameters name; returns what was restored (a sampler this server lacks is said).
function apply(p) {
  setValue($("prompt"), p.Prompt);
  setValue($("negative"), typeof p["Negative prompt"] === "string" ? p["Negative prompt"] : "");
  const restored = ["prompt", "negative prompt"];
  for (const [key, id, label] of FIELDS) {
    const value = p[key];
    if (value === undefined || value === null || value === "" || !Number.isFinite(Number(value))) continue;
    $(id).value = String(Number(value));
    $(id).dispatchEvent(new Event("input", { bubbles: true }));
    restored.push(label);
  }
  if (p.Sampler) {
    const names = [...$("sampler").options].map((o) => o.value);
    const karras = p["Schedule type"] && p["Schedule type"] !== "Automatic" ? `${p.Sampler} ${p["Schedule type"]}` : null;
    const name = names.includes(karras) ? karras : names.includes(p.Sampler) ? p.Sampler : null;
    if (name) {
      $("sampler").value = name;
      restored.push("sampler");
    } else {
      $("sampler").value = "";
      restored.push(`sampler (${p.Sampler} is not offered here: auto)`);
    }
  }
  return restored;
}

export function initRestore() {
  document.addEventListener("dragover", (event) => {
    if (!hasFiles(event)) return;  // dragged text goes where it is dropped
    event.preventDefault();
    document.body.classList.add("dragging");
  });
  document.addEventListener("dragleave", (event) => {
    if (!event.relatedTarget) document.body.classList.remove("dragging");
  });
  document.addEventListener("drop", (event) => {
    document.body.classList.remove("dragging");
    if (!hasFiles(event)) return;
    event.preventDefault();  // never navigate away to the file
    restoreFrom(event.dataTransfer.files[0]);
  });
  const picker = $("restore-file");
  picker.addEventListener("change", () => {
    restoreFrom(picker.files[0]).finally(() => { picker.value = ""; });
  });
}
