// A weight slider per LoRA tag: under a prompt, one control (name, range -2…2, number) for each <lora:NAME:W>
// tag the text holds. Moving one rewrites only that tag's weight — its first positional value; the tag's other
// parts (te=, unet=, lbw=, a second positional, …) stay as written — and a hand edit of the prompt moves the
// sliders. Tags are found as lorakit's prompt parser finds them: "<lora:" or "<lyco:" up to the next ">",
// the name before the first ":" (see docs/prompt-syntax.md).
import { el } from "./util.js";

const TAG = /<(lora|lyco):([^>]*)>/gi;
const NUMBER = /^\s*[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?\s*$/;

// Each tag of `text`: {name, value (its weight; 1 when the tag has none, NaN when it is not a number),
// slot: [start, end) of the weight's text or null, insertAt: where a weight goes when there is none,
// named: the keys written as key=value}.
export function findTags(text) {
  const tags = [];
  for (const m of text.matchAll(TAG)) {
    const parts = m[2].split(":");
    const name = parts[0].trim();
    if (!name) continue;
    const insertAt = m.index + m[1].length + 2 + parts[0].length;  // the end of the name
    const tag = { name, value: 1, slot: null, insertAt, named: new Set() };
    let at = insertAt + 1;  // the start of parts[1]
    for (const part of parts.slice(1)) {
      if (part.includes("=")) tag.named.add(part.slice(0, part.indexOf("=")).trim());
      else if (!tag.slot) {
        tag.slot = [at, at + part.length];
        tag.value = NUMBER.test(part) ? Number(part) : NaN;
      }
      at += part.length + 1;
    }
    tags.push(tag);
  }
  return tags;
}

// 0.8, 1, -0.05: two decimals at most, no trailing zeros, never "-0".
export const formatWeight = (w) => String(Math.round(w * 100) / 100 || 0);

// Keep the sliders in `row` in step with the tags of the textarea `box`.
export function attachSliders(box, row) {
  const sync = () => {
    const tags = findTags(box.value);
    const kids = row.children;
    if (kids.length !== tags.length || tags.some((t, i) => kids[i].dataset.name !== t.name)) {
      row.replaceChildren(...tags.map((t, i) => control(t, i)));
    }
    tags.forEach((t, i) => showTag(kids[i], t));
    row.hidden = !tags.length;
  };
  box.addEventListener("input", sync);
  row.addEventListener("input", (event) => {
    const input = event.target, item = input.closest(".tag-control");
    if (!item) return;
    const raw = input.value.trim();
    if (raw === "" || !Number.isFinite(Number(raw))) return;  // a number being typed ("-", "0.")
    const text = input.type === "range" ? formatWeight(Number(raw)) : String(Number(raw));
    writeWeight(box, Number(item.dataset.index), text);
    const tag = findTags(box.value)[Number(item.dataset.index)];
    if (tag) showTag(item, tag, input);
  });
  sync();
  return sync;
}

// Replace tag i's weight text (or insert one after its name) in place; setRangeText's "preserve" keeps the
// cursor and selection where they were relative to the text around them.
function writeWeight(box, i, text) {
  const tag = findTags(box.value)[i];
  if (!tag) return;
  if (tag.slot) box.setRangeText(text, tag.slot[0], tag.slot[1], "preserve");
  else box.setRangeText(`:${text}`, tag.insertAt, tag.insertAt, "preserve");
}

function control(tag, i) {
  const label = `weight of ${tag.name}`;
  return el("div", { class: "tag-control", "data-name": tag.name, "data-index": String(i) },
    el("span", { class: "tag-name", text: tag.name, title: tag.name }),
    el("input", { class: "tag-range", type: "range", min: "-2", max: "2", step: "0.05", "aria-label": label }),
    el("input", { class: "tag-weight", type: "number", min: "-10", max: "10", step: "0.05", "aria-label": label }));
}

// Show `tag`'s weight in its control; `except`: the input the user is moving (left as it is).
function showTag(item, tag, except = null) {
  const [range, number] = item.querySelectorAll("input");
  const known = Number.isFinite(tag.value);
  if (range !== except) range.value = known ? String(tag.value) : "1";
  if (number !== except && (!known || Number(number.value) !== tag.value || number.value === "")) {
    number.value = known ? String(tag.value) : "";
  }
  const overridden = tag.named.has("te") && tag.named.has("unet");
  item.classList.toggle("overridden", overridden);
  item.title = overridden ? `${tag.name}: te= and unet= in the tag set its weights; this value is not used`
    : known ? `${tag.name}: ${tag.value}` : `${tag.name}: the weight is not a number`;
}
