"""What the LoRA library shows of a file, read from its safetensors header alone, fast and without torch.

A full ``json.loads`` of a kohya SD1.5 header (800 entries, ~110 KB) costs ~0.6 ms and an SDXL header is ~400 KB;
a library of 10,000 files can afford neither the parse nor the reads. So a long header is read at its two ends
only (metadata and text encoders first, the UNet's last blocks last: safetensors sorts keys); ``__metadata__`` is
decoded with the JSON decoder and the entries are split as text (safetensors' own writer emits
``"key":{"dtype":…,"shape":[…],"data_offsets":[…]}`` with no spaces). Types and base are read from key names and
a few shapes (``lorakit inspect`` gives the exact per-layer picture).

What is summarised is validated: safetensors lays the tensors out in header order, back to back, and refuses a
file they do not cover exactly, so the last entry's end offset must be the file's end — a truncated file (or one
with bytes appended) is found from its size without reading any tensor. Anything the ends cannot vouch for — another
writer's layout, ends that do not tell the base model or the types, a last offset that is not the file's end — is
read whole with ``files.header.read_header`` (the project's validating reader: schema, and tensors that tile the
data exactly), and its base decided by every entry's shapes (``shapes.base_from_shapes``).

The family comes first (``keymap.detection.detect``, on the first and last entries' names and shapes). A FLUX.1 file
is base ``flux1`` with a variant (``detection.variant``: metadata, a widened ``img_in``, guidance layers); its ends
tell only when the metadata names the variant and no component can hide between them (``_flux_from_ends``), else
the whole header decides family, variant and components as the loader does. A family lorakit does not apply is
the base by name (``"Chroma"``).
"""
from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple

from ..errors import UnreadableFile
from ..files.header import check_header_length, read_header
from ..keymap import arch as archmod
from ..keymap import detection, families
from ..keymap.leaves import LEAF_TYPE
from .shapes import COMPONENTS, CONTEXT_WIDTH, TEXT_WIDTH, Shaped, base_from_shapes, dit_component, dit_components

HEAD, TAIL = 24_000, 12_000  # bytes read at each end of a long header
KEYS = 3_500  # characters of entries at each end whose key names are looked at (~30 keys)

# A key's last name part → its network type: the shared leaf vocabulary, plus what a two-part tail of a PEFT key
# with an adapter name shows (``lora_A.default.weight`` → ``default.weight``) and LoCon's Tucker core shown as such.
TAIL_TYPES = {**LEAF_TYPE, "default.weight": "lora", "lora_mid.weight": "locon"}
# A kohya/LyCORIS LoRA with these in its module names covers 3x3 convolutions: a LoCon.
CONV_MARKERS = ("_conv1.", "_conv2.", "conv_in.", "conv_out.", "samplers_0_conv.", "in_layers_2.", "out_layers_3.",
                "_op.", ".conv1.", ".conv2.")
SDXL_MARKERS = ("lora_te2_", "text_encoder_2.", "te2.", "add_embedding", "label_emb", "transformer_blocks_1_",
                "transformer_blocks.1.")
META_RE = re.compile(r'"__metadata__"\s*:\s*')
SHAPE = r'[^"]*":\{"dtype":"\w+","shape":\['
RANK_RE = re.compile(r'(?:lora_down|lora_A|lora\.down|_lora\.down|hada_w1_b|:down)(?:\.default)?(?:\.weight)?' + SHAPE + r"(\d+)")
WIDTH_RE = re.compile(r'attn2[._](?:processor\.)?to_k[._](?:lora_down|lora_A|lora\.down|hada_w1_b)' + SHAPE + r"\d+,(\d+)")
TE_WIDTH_RE = re.compile(r'(?:self_attn[._]q_proj[._](?:lora_down|lora_A)|text_encoder:0:down)' + SHAPE + r"\d+,(\d+)")
FLOAT_CODES = {"F32": ("<f", 4), "F16": ("<e", 2), "F64": ("<d", 8)}
LAST_OFFSETS = '"data_offsets":['
ENTRY_SHAPE = re.compile(r'"dtype":"\w+","shape":\[([\d,]*)\]')


@dataclass
class Summary:
    base: str  # sd1 / sd2 / sdxl / flux1 / unknown, or the name of a family lorakit does not apply ("Chroma")
    types: list[str]
    rank: int | None
    alpha: float | None
    tensors: int | None  # None when only the header's ends were read
    components: list[str]  # unet, te, te2 (Stable Diffusion); transformer, te (CLIP-L), t5 (FLUX.1 and other DiTs)
    metadata: dict[str, str] = field(default_factory=dict)
    variant: str | None = None  # FLUX.1's finer base: flux-1-dev, flux-1-schnell, flux-1-dev-control, … or flux-1

    def info(self) -> dict[str, Any]:
        """Everything but the metadata, as plain JSON-able values."""
        return {"base": self.base, "variant": self.variant, "types": self.types, "rank": self.rank,
                "alpha": self.alpha, "tensors": self.tensors, "components": self.components}


class EntryShape(NamedTuple):
    """An entry's shape read from header text (what ``detection.detect`` looks at)."""

    shape: tuple[int, ...]


class Ends(NamedTuple):
    """A long header's first ``HEAD`` bytes (``head``, without the length prefix) and last ``TAIL`` bytes."""

    head: str
    tail: str
    data_start: int  # 8 + header length: where the tensor data begins
    size: int  # of the file


def read_ends(path: Path) -> Ends | None:
    """The ends of a header longer than ``HEAD + TAIL`` bytes (two ``pread`` calls); ``None`` for a shorter one
    (it is parsed whole)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise UnreadableFile(path, f"cannot read ({e.strerror})") from None
    try:
        size = os.fstat(fd).st_size
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no read-ahead: only the header's ends are read
        first = os.pread(fd, 8 + HEAD, 0)
        if len(first) < 8:
            raise UnreadableFile(path, f"file is {size} bytes long: too short to be a safetensors file")
        (n,) = struct.unpack("<Q", first[:8])
        check_header_length(path, n, size)
        if n <= HEAD + TAIL:
            return None
        tail = os.pread(fd, TAIL, 8 + n - TAIL)
        return Ends(first[8:].decode("utf-8", "ignore"), tail.decode("utf-8", "ignore"), 8 + n, size)
    finally:
        os.close(fd)


def split_metadata(path: Path, text: str) -> tuple[dict[str, str], str]:
    """``(metadata, the header without it)``; only the metadata object is decoded."""
    found = META_RE.search(text)
    if found is None:
        return {}, text
    at = found.start()
    try:
        meta, end = json.JSONDecoder().raw_decode(text, found.end())
    except (ValueError, RecursionError) as e:  # bad JSON, an int past 4300 digits, the C decoder's depth guard
        raise UnreadableFile(path, f"safetensors header is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise UnreadableFile(path, "safetensors __metadata__ is not an object of strings")
    return meta, text[:at] + text[end:].lstrip().lstrip(",")


def sample_keys(body: str, tail: str) -> list[str]:
    """Key names of the first and last ~30 entries (``body``: the header's first bytes without the metadata,
    ``tail``: its last bytes); entries cut at a chunk's edge are left out."""
    return entry_keys(body[:KEYS], cut_start=False, cut_end=True) + entry_keys(tail[-KEYS:], cut_start=True,
                                                                                cut_end=False)


def entry_keys(chunk: str, cut_start: bool, cut_end: bool) -> list[str]:
    """The key names of the entries in a piece of header text; ``cut_start``/``cut_end``: the piece begins/ends
    inside an entry (that entry is left out)."""
    parts = chunk.lstrip('{,"').split('},"')
    keys = []
    for part in parts[int(cut_start):len(parts) - int(cut_end)]:
        key, sep, _ = part.partition('":{')
        if sep:
            keys.append(key)
    return keys


def entry_shapes(text: str, keys: list[str]) -> dict[str, EntryShape]:
    """The shapes of ``keys``' entries in compact header text (those found whole)."""
    out = {}
    for key in keys:
        at = text.find(f'"{key}":{{')
        m = ENTRY_SHAPE.match(text, at + len(key) + 4) if at >= 0 else None
        if m:
            out[key] = EntryShape(tuple(int(d) for d in m[1].split(",") if d))
    return out


def summarise_safetensors(path: Path) -> Summary:
    ends = read_ends(path)
    return (_summarise_ends(path, ends) if ends is not None else None) or summarise_header(path)


def _summarise_ends(path: Path, ends: Ends) -> Summary | None:
    """From the header's ends alone, or ``None`` when they cannot vouch for the file (see the module's docstring)."""
    try:
        metadata, body = split_metadata(path, ends.head)
    except UnreadableFile:
        return None  # metadata longer than HEAD
    if '":{"dtype":"' not in ends.head or '"__metadata__"' not in ends.head and '"__metadata__"' in ends.tail:
        return None  # another writer's layout
    if last_end(ends.tail) != ends.size - ends.data_start:
        return None  # truncated, appended to, or laid out in another order: the whole header says which
    text = body + "\n" + ends.tail
    keys = sample_keys(body, ends.tail)
    if detection.depth_decides(keys, entry_shapes(text, keys)):
        return None  # diffusers-layout DiT blocks only: the deepest block (in the header's middle) tells the family
    summary = summarise_keys(keys, text, None, metadata,
                             lambda key: _tensor_value(path, text, key, ends.data_start), by_metadata=False)
    if summary.base == archmod.UNKNOWN or not summary.types:
        return None
    if summary.base in archmod.SD3_BASES:
        return _sd3_from_ends(summary, body, ends.tail)
    return _flux_from_ends(summary, body, ends.tail) if summary.base == archmod.FLUX1 else summary


def _sd3_from_ends(summary: Summary, body: str, tail: str) -> Summary | None:
    """An SD3 file's ends tell when no component can hide in the middle (as for FLUX.1: the head's last entry and
    the tail's first are of the same one); its size is in every block layer's widths, so the ends show it."""
    head, rest = entry_keys(body, cut_start=False, cut_end=True), entry_keys(tail, cut_start=True, cut_end=False)
    if not head or not rest or dit_component(head[-1]) != dit_component(rest[0]):
        return None
    return summary


def _flux_from_ends(summary: Summary, body: str, tail: str) -> Summary | None:
    """A FLUX.1 file's ends tell when its metadata names the variant (guidance and ``img_in`` keys sort into the
    middle) and no component can hide in the middle: sorted keys keep each component together, so the head's last
    entry and the tail's first must be of the same one. Its components are then those of every entry seen."""
    head, rest = entry_keys(body, cut_start=False, cut_end=True), entry_keys(tail, cut_start=True, cut_end=False)
    if detection.variant_from_metadata(summary.metadata) is None or not head or not rest or \
            dit_component(head[-1]) != dit_component(rest[0]):
        return None
    summary.components = dit_components(head + rest)
    return summary


def last_end(tail: str) -> int | None:
    """The end offset of the header's last entry: safetensors lays tensors out back to back in header order and
    loads only a file they cover exactly, so it must be the data section's size."""
    at = tail.rfind(LAST_OFFSETS)
    numbers = tail[at + len(LAST_OFFSETS):].partition("]")[0].split(",")
    return int(numbers[1]) if at >= 0 and len(numbers) == 2 and numbers[1].strip().isdecimal() else None


def summarise_header(path: Path) -> Summary:
    """From the whole header, parsed and validated; the base from every entry's shapes."""
    header = read_header(path)  # validated: schema, and tensors that tile the data up to the file's end
    if not header.tensors:
        raise UnreadableFile(path, "no tensors in the file")
    entries = {k: {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [t.start, t.end]}
               for k, t in header.tensors.items()}
    body = json.dumps(entries, separators=(",", ":"))
    return _with_layers(path, list(entries), summarise_keys(
        list(entries), body, len(entries), header.metadata,
        lambda key: _tensor_value(path, body, key, header.data_start), shape_base=base_from_shapes(header.tensors),
        shapes=header.tensors))


def read_metadata_fast(path: Path) -> dict[str, str]:
    """A safetensors file's metadata from the header's first bytes (the whole header only when it must)."""
    ends = read_ends(path)
    if ends is not None:
        try:
            return split_metadata(path, ends.head)[0]
        except UnreadableFile:
            pass  # metadata longer than HEAD
    return read_header(path).metadata


def summarise_keys(keys: list[str], body: str, count: int | None, metadata: dict[str, str],
                   value: Callable[[str], float | None], shape_base: str | None = None,
                   by_metadata: bool = True, shapes: Mapping[str, Shaped] | None = None) -> Summary:
    """``keys``: a sample of key names, or all of them (then ``count`` and ``shapes``, every entry's shape, are
    given: the whole header was read); ``body``: every entry as compact header text (searched with C-speed string
    and regex scans, never a Python loop per key). ``shape_base``: what every entry's shapes show (the whole header
    was parsed); the metadata's claim counts only when shapes say nothing and ``by_metadata``."""
    tails = {k[k.rfind(".", 0, len(k) - 7) + 1:] if k.endswith(".weight") else k[k.rfind(".") + 1:] for k in keys}
    blob = "\n".join(keys)
    types = _types(tails, blob, metadata)
    rank, alpha = _rank(body, metadata), _alpha(body, metadata, value)
    family = _family(keys, body, metadata, shapes)
    if family is not families.SD:
        base = family if isinstance(family, str) else family.arch or (  # SD3: the size its block widths show
            family.sizes.of_header(body, metadata) if family.sizes is not None else archmod.UNKNOWN)
        variant = None if isinstance(family, str) else detection.variant(family, keys, metadata, shapes)
        return Summary(base, types, rank, alpha, count, dit_components(keys), metadata, variant)
    base = _base(blob, body, metadata, shape_base, by_metadata)
    comps = [c for c, marks in COMPONENTS if any(m in blob for m in marks)]
    if base == archmod.SDXL and "te2" not in comps and any(m in body for m in ("lora_te2_", "text_encoder_2.")):
        comps.append("te2")
    return Summary(base, types, rank, alpha, count, comps, metadata)


def _family(keys: list[str], body: str, metadata: dict[str, str],
            shapes: Mapping[str, Shaped] | None) -> families.Family | str:
    """The family from the first and last entries (every key of a FLUX/SD3 file says so): names, then their widths
    (SD3's and FLUX.2's DiT names are FLUX.1's) — read from the text only when the names are not Stable Diffusion's;
    a FLUX.1 file whose whole header was read is decided by every key and shape, as the loader decides it. A deep
    DiT's depth (Qwen-Image's 60 blocks) needs its deepest block, which a sample of sorted keys may miss
    (``…blocks.9`` sorts after ``…blocks.59``): it is added from the text."""
    sample = keys[:4] + keys[-4:] + detection.deepest_block_keys(body)
    if shapes is None:
        named = detection.detect(sample, metadata)
        if named is families.SD:
            return named
        found = detection.detect(sample, metadata, entry_shapes(body, sample))
        # SD3's SAI embedders and final layer are named as FLUX.1's: then every sampled key decides
        return detection.detect(keys, metadata, entry_shapes(body, keys)) if found is families.FLUX1 else found
    found = detection.detect(sample, metadata, shapes)
    return detection.detect(keys, metadata, shapes) if found is families.FLUX1 else found


def _types(tails: set[str], blob: str, metadata: dict[str, str]) -> list[str]:
    found = {TAIL_TYPES[t] for t in tails if t in TAIL_TYPES}
    if any(":" in t and t.endswith((":up", ":down")) for t in tails):
        found.add("lora")  # cloneofsimo
    args = metadata.get("ss_network_args", "")
    conv = "conv_dim" in args or any(m in blob for m in CONV_MARKERS)
    if "lora" in found and ("locon" in found or conv):
        found.discard("lora")
        found.add("locon")
    return sorted(found)


def _base(blob: str, body: str, metadata: dict[str, str], shape_base: str | None, by_metadata: bool) -> str:
    """A Stable Diffusion file's base: SDXL-only names, then widths, then (``by_metadata``) the metadata."""
    if any(m in blob for m in SDXL_MARKERS):
        return archmod.SDXL
    m = WIDTH_RE.search(body)
    if m and int(m[1]) in CONTEXT_WIDTH:
        return CONTEXT_WIDTH[int(m[1])]
    m = TE_WIDTH_RE.search(body)
    if m and int(m[1]) in TEXT_WIDTH:
        return TEXT_WIDTH[int(m[1])]
    if shape_base:
        return shape_base
    return (archmod.from_metadata(metadata) if by_metadata else None) or archmod.UNKNOWN


def _rank(body: str, metadata: dict[str, str]) -> int | None:
    m = RANK_RE.search(body)
    if m:
        return int(m[1])
    dim = metadata.get("ss_network_dim", "")
    return int(dim) if dim.isdigit() else None


def _alpha(body: str, metadata: dict[str, str], value: Callable[[str], float | None]) -> float | None:
    """kohya's ``ss_network_alpha``, else the value of the first ``.alpha`` tensor (one small read)."""
    try:
        return float(metadata["ss_network_alpha"])
    except (KeyError, ValueError):
        pass
    at = body.find('.alpha":{')
    if at < 0:
        return None
    start = body.rfind('"', 0, at) + 1
    return value(body[start:at + 6])


def _tensor_value(path: Path, body: str, key: str, data_start: int) -> float | None:
    at = body.find(f'"{key}":{{')
    entry = body[at:body.find("}", at)]
    dtype = entry[entry.find('"dtype":"') + 9:].partition('"')[0]
    offset = entry[entry.find('"data_offsets":[') + 16:].partition(",")[0]
    if not offset.isdecimal():
        return None  # an entry cut at a chunk's edge
    start = int(offset)
    with path.open("rb") as f:
        f.seek(data_start + start)
        raw = f.read(8)
    if dtype == "BF16" and len(raw) >= 2:
        return float(struct.unpack("<f", b"\0\0" + raw[:2])[0])
    code = FLOAT_CODES.get(dtype)
    return float(struct.unpack(code[0], raw[:code[1]])[0]) if code and len(raw) >= code[1] else None


def summarise_pickle(path: Path) -> Summary:
    """Pickled LoRAs (``.pt``/``.bin``/``.ckpt``) need torch (loaded safely); summarised like safetensors."""
    from ..files.io import load_pickle_tensors

    tensors = load_pickle_tensors(path)  # dense tensors with data only (no sparse/meta/broadcast views), detached
    body = json.dumps({k: {"dtype": "F32", "shape": list(v.shape), "data_offsets": [0, 0]}
                       for k, v in tensors.items()}, separators=(",", ":"))
    value = (lambda key: float(tensors[key].float().reshape(-1)[0]) if tensors[key].numel() else None)
    return _with_layers(path, list(tensors), summarise_keys(list(tensors), body, len(tensors), {}, value,
                                                            shape_base=base_from_shapes(tensors), shapes=tensors))


def _with_layers(path: Path, keys: list[str], summary: Summary) -> Summary:
    """A file none of whose keys is a LoRA leaf (an embedding, a checkpoint) cannot be applied: say so."""
    if not summary.types:
        raise UnreadableFile(path, f"no LoRA layers: no key is a LoRA/LyCORIS leaf (first keys: "
                                   f"{', '.join(keys[:3])})")
    return summary


def summarise(path: Path) -> Summary:
    return summarise_safetensors(path) if path.suffix.lower() == ".safetensors" else summarise_pickle(path)
