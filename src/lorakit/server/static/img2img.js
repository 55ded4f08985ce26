// img2img: the mode switch, the init image and the optional mask (each a file input and a drop zone of its own —
// a file dropped there is that image; dropped anywhere else it restores parameters, see restore.js), previews,
// and A1111's img2img fields for the request.
import { $, fileBase64, notice, setValue } from "./util.js";

const images = { init: null, mask: null };  // {b64, width, height} of each, or null

export const mode = () => ($("mode-img2img").checked ? "img2img" : "txt2img");

// A1111's img2img fields (`/sdapi/v1/img2img`), or {} in txt2img mode. Throws when img2img has no init image.
export function img2imgFields() {
  if (mode() !== "img2img") return {};
  if (!images.init) throw new Error("img2img needs an init image: choose one or drop it on the init image box");
  const fields = {
    init_images: [images.init.b64], denoising_strength: Number($("denoising").value),
    resize_mode: Number($("resize-mode").value),
  };
  if (images.mask) {
    Object.assign(fields, { mask: images.mask.b64, mask_blur: Number($("mask-blur").value),
                            inpainting_fill: Number($("inpainting-fill").value),
                            inpainting_mask_invert: $("mask-invert").checked ? 1 : 0 });
  }
  return fields;
}

async function setImage(kind, file) {
  if (!file) return;
  if (!file.type.startsWith("image/")) {
    notice(`${file.name} is not an image`, "error");
    return;
  }
  const b64 = await fileBase64(file);
  const preview = $(`${kind}-preview`);
  preview.src = `data:${file.type};base64,${b64}`;
  await preview.decode().catch(() => null);
  if (!preview.naturalWidth) {
    notice(`${file.name}: the browser cannot read this image`, "error");
    clearImage(kind);
    return;
  }
  images[kind] = { b64, width: preview.naturalWidth, height: preview.naturalHeight };
  preview.hidden = false;
  $(`${kind}-clear`).hidden = false;
  $(`${kind}-zone`).classList.add("has-image");
  $(`${kind}-size`).textContent = `${file.name} · ${preview.naturalWidth}×${preview.naturalHeight}`;
  if (kind === "init") $("use-size").hidden = false;
  notice("");
}

function clearImage(kind) {
  images[kind] = null;
  $(`${kind}-preview`).hidden = true;
  $(`${kind}-preview`).removeAttribute("src");
  $(`${kind}-clear`).hidden = true;
  $(`${kind}-zone`).classList.remove("has-image");
  $(`${kind}-size`).textContent = "";
  $(`${kind}-file`).value = "";
  if (kind === "init") $("use-size").hidden = true;
}

// Width and height from the init image: a multiple of 8 in 64…2048, as the API accepts.
function useInitSize() {
  const fit = (n) => Math.min(2048, Math.max(64, Math.round(n / 8) * 8));
  setValue($("width"), String(fit(images.init.width)));  // set by the user: no longer the model's size
  setValue($("height"), String(fit(images.init.height)));
}

function dropZone(kind) {
  const zone = $(`${kind}-zone`);
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    event.stopPropagation();
    zone.classList.add("over");
    document.body.classList.remove("dragging");  // the page-wide "restore parameters" hint is not for here
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    event.stopPropagation();  // not a parameters restore
    zone.classList.remove("over");
    document.body.classList.remove("dragging");
    setImage(kind, event.dataTransfer.files[0]);
  });
  $(`${kind}-file`).addEventListener("change", () => setImage(kind, $(`${kind}-file`).files[0]));
  $(`${kind}-clear`).addEventListener("click", () => clearImage(kind));
}

export function initImg2img() {
  const sync = () => { $("img2img").hidden = mode() !== "img2img"; };
  for (const id of ["mode-txt2img", "mode-img2img"]) $(id).addEventListener("change", sync);
  sync();
  dropZone("init");
  dropZone("mask");
  $("use-size").addEventListener("click", useInitSize);
  const [range, number] = [$("denoising-range"), $("denoising")];
  range.addEventListener("input", () => { number.value = range.value; });
  number.addEventListener("input", () => { if (number.value !== "") range.value = number.value; });
}
