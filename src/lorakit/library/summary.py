"""What the LoRA library shows of a file, read from its safetensors header alone, fast and without torch.

A full ``json.loads`` of a kohya SD1.5 header (800 entries, ~110 KB) costs ~0.6 ms; a library of 10,000 files
cannot afford that. The fast path parses ``__metadata__`` with the JSON decoder and splits the tensor entries
as text (safetensors' own writer emits ``"key":{"dtype":…,"shape":[…],"data_offsets":[…]}`` with no spaces);
anything else falls back to the full parse. Types and base are read from key names and a few shapes
(``lorakit inspect`` gives the exact per-layer picture).
"""
from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .. import arch as archmod
from ..errors import UnreadableFile
from ..header import MAX_HEADER_BYTES

Entries = dict[str, str]  # key -> the rest of its header entry ('"dtype":"F16","shape":[4,768],…')

TAIL_TYPES = {
    "lora_up.weight": "lora", "lora_down.weight": "lora", "lora_A.weight": "lora", "lora_B.weight": "lora",
    "down.weight": "lora", "up.weight": "lora", "default.weight": "lora", "lora_mid.weight": "locon",
    "hada_w1_a": "loha", "hada_w1_b": "loha", "hada_t1": "loha", "lokr_w1": "lokr", "lokr_w1_a": "lokr",
    "lokr_w2": "lokr", "lokr_w2_a": "lokr", "lokr_t2": "lokr", "oft_blocks": "oft", "oft_diag": "oft",
    "a1.weight": "glora", "b1.weight": "glora", "on_input": "ia3", "diff": "full", "diff_b": "full",
    "w_norm": "norm", "dora_scale": "dora", "lora_magnitude_vector": "dora",
}
# A kohya/LyCORIS LoRA with these in its module names covers 3x3 convolutions: a LoCon.
CONV_MARKERS = ("_conv1.", "_conv2.", "conv_in.", "conv_out.", "samplers_0_conv.", "in_layers_2.", "out_layers_3.",
                "_op.", ".conv1.", ".conv2.")
SDXL_MARKERS = ("lora_te2_", "text_encoder_2.", "te2.", "add_embedding", "label_emb", "transformer_blocks_1_",
                "transformer_blocks.1.")
RANK_TAILS = ("lora_down.weight", "lora_A.weight", "down.weight", ":down")
WIDTH_TAILS = ("attn2_to_k.lora_down.weight", "attn2.to_k.lora_A.weight", "attn2.to_k.lora_down.weight",
               "attn2.processor.to_k_lora.down.weight", "attn2_to_k.hada_w1_b")
TE_WIDTH_TAILS = ("self_attn_q_proj.lora_down.weight", "self_attn.q_proj.lora_A.weight",
                  "self_attn.q_proj.lora_down.weight", "text_encoder:0:down")
FLOAT_CODES = {"F32": ("<f", 4), "F16": ("<e", 2), "F64": ("<d", 8)}


@dataclass
class Summary:
    base: str  # sd1 / sd2 / sdxl / unknown, or a foreign family's name ("Flux")
    types: list[str]
    rank: int | None
    alpha: float | None
    tensors: int
    components: list[str]  # unet, te, te2
    metadata: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_raw_header(path: Path) -> tuple[str, int]:
    """The header text and the byte offset of the tensor data."""
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UnreadableFile(path, "too short to be a safetensors file")
        (n,) = struct.unpack("<Q", head)
        size = path.stat().st_size
        if n > MAX_HEADER_BYTES or n + 8 > size:
            raise UnreadableFile(path, f"not a safetensors file or truncated: header claims {n} bytes, file has {size}")
        raw = f.read(n)
    try:
        return raw.decode("utf-8"), 8 + n
    except UnicodeDecodeError:
        raise UnreadableFile(path, "safetensors header is not UTF-8") from None


def split_header(path: Path, text: str) -> tuple[dict[str, str], Entries]:
    """``(metadata, {key: entry text})``: fast for safetensors' compact layout, exact JSON otherwise."""
    meta: dict[str, Any] = {}
    at = text.find('"__metadata__":')
    body = text
    if at >= 0:
        try:
            meta, end = json.JSONDecoder().raw_decode(text, at + 15)
        except json.JSONDecodeError:
            return _full_parse(path, text)
        body = text[:at] + text[end:].lstrip(",")
    if '":{"dtype":"' not in body or not isinstance(meta, dict):
        return _full_parse(path, text)
    parts = body.strip().lstrip("{").lstrip(",").lstrip('"').rstrip("}").split('},"')
    entries = {}
    for p in parts:
        key, _, rest = p.partition('":{')
        entries[key] = rest
    if len(entries) != body.count('"data_offsets"'):
        return _full_parse(path, text)  # a key with an escaped quote, or another writer's layout
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}, entries


def _full_parse(path: Path, text: str) -> tuple[dict[str, str], Entries]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise UnreadableFile(path, f"safetensors header is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise UnreadableFile(path, "safetensors header is not a JSON object")
    meta = obj.pop("__metadata__", None) or {}
    entries = {k: json.dumps(v, separators=(",", ":"))[1:-1] for k, v in obj.items() if isinstance(v, dict)}
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}, entries


def shape_of(entry: str) -> list[int]:
    i = entry.find('"shape":[')
    j = entry.find("]", i)
    inner = entry[i + 9:j] if i >= 0 else ""
    return [int(s) for s in inner.split(",") if s.strip()]


def summarise_safetensors(path: Path) -> Summary:
    text, data_start = read_raw_header(path)
    metadata, entries = split_header(path, text)
    keys = list(entries)
    blob = "\n".join(keys) + "\n"
    tails = {k[k.rfind(".", 0, len(k) - 7) + 1:] if k.endswith(".weight") else k[k.rfind(".") + 1:] for k in keys}
    types = _types(tails, blob, metadata)
    base = _base(keys, blob, entries, metadata)
    rank = _first_dim(entries, keys, RANK_TAILS, 0)
    alpha = _alpha(path, entries, keys, data_start, metadata)
    comps = [c for c, marks in (("unet", ("unet", "input_blocks", "down_blocks", "mid_block", "up_blocks")),
                                ("te", ("lora_te_", "lora_te1_", "text_encoder.", "text_encoder:", "te1.")),
                                ("te2", ("lora_te2_", "text_encoder_2.", "te2."))) if any(m in blob for m in marks)]
    return Summary(base, types, rank, alpha, len(keys), comps, metadata)


def _types(tails: set[str], blob: str, metadata: dict[str, str]) -> list[str]:
    found = {TAIL_TYPES[t] for t in tails if t in TAIL_TYPES}
    if any(":" in t and t.endswith((":up", ":down")) for t in tails):
        found.add("lora")  # cloneofsimo
    if "lora" in found and ("locon" in found or any(m in blob for m in CONV_MARKERS)):
        found.discard("lora")
        found.add("locon")
    return sorted(found)


def _base(keys: list[str], blob: str, entries: Entries, metadata: dict[str, str]) -> str:
    foreign = archmod.foreign_family(keys[:64], metadata)
    if foreign:
        return foreign
    if any(m in blob for m in SDXL_MARKERS):
        return archmod.SDXL
    width = _first_dim(entries, keys, WIDTH_TAILS, 1)
    if width in archmod.CROSS_DIM:
        return archmod.CROSS_DIM[width]
    te_width = _first_dim(entries, keys, TE_WIDTH_TAILS, 1)
    if te_width in archmod.TE_WIDTH:
        return archmod.TE_WIDTH[te_width]
    return archmod.from_metadata(metadata) or archmod.UNKNOWN


def _first_dim(entries: Entries, keys: list[str], tails: tuple[str, ...], dim: int) -> int | None:
    key = next((k for k in keys if k.endswith(tails)), None)
    shape = shape_of(entries[key]) if key else []
    return shape[dim] if len(shape) > dim else None


def _alpha(path: Path, entries: Entries, keys: list[str], data_start: int, metadata: dict[str, str]) -> float | None:
    """kohya's ``ss_network_alpha``, else the value of the first ``.alpha`` tensor (one small read)."""
    try:
        return float(metadata["ss_network_alpha"])
    except (KeyError, ValueError):
        pass
    key = next((k for k in keys if k.endswith(".alpha")), None)
    if key is None:
        return None
    entry = entries[key]
    dtype = entry[entry.find('"dtype":"') + 9:].partition('"')[0]
    start = int(entry[entry.find('"data_offsets":[') + 16:].partition(",")[0])
    with path.open("rb") as f:
        f.seek(data_start + start)
        raw = f.read(8)
    if dtype == "BF16" and len(raw) >= 2:
        return float(struct.unpack("<f", b"\0\0" + raw[:2])[0])
    code = FLOAT_CODES.get(dtype)
    return float(struct.unpack(code[0], raw[:code[1]])[0]) if code and len(raw) >= code[1] else None


def summarise_pickle(path: Path) -> Summary:
    """Pickled LoRAs (``.pt``/``.bin``/``.ckpt``) need torch (loaded safely); their keys are summarised the same way."""
    from ..io import load_pickle

    obj = load_pickle(path)
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else {}
    entries = {str(k): f'"dtype":"F32","shape":[{",".join(str(s) for s in v.shape)}],"data_offsets":[0,0]'
               for k, v in sd.items() if hasattr(v, "shape")}
    if not entries:
        raise UnreadableFile(path, "no tensors in the file")
    keys = list(entries)
    blob = "\n".join(keys) + "\n"
    tails = {k[k.rfind(".", 0, len(k) - 7) + 1:] if k.endswith(".weight") else k[k.rfind(".") + 1:] for k in keys}
    alpha_key = next((k for k in keys if k.endswith(".alpha")), None)
    alpha = float(sd[alpha_key]) if alpha_key else None
    comps = sorted({"te" if "te" in k.split("_")[1:2] or k.startswith("text_encoder") else "unet" for k in keys})
    return Summary(_base(keys, blob, entries, {}), _types(tails, blob, {}), _first_dim(entries, keys, RANK_TAILS, 0),
                   alpha, len(keys), comps, {})


def summarise(path: Path) -> Summary:
    return summarise_safetensors(path) if path.suffix.lower() == ".safetensors" else summarise_pickle(path)
