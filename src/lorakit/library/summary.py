"""What the LoRA library shows of a file, read from its safetensors header alone, fast and without torch.

A full ``json.loads`` of a kohya SD1.5 header (800 entries, ~110 KB) costs ~0.6 ms and an SDXL header is ~400 KB;
a library of 10,000 files can afford neither the parse nor the reads. So a long header is read at its two ends
only (metadata and text encoders first, the UNet's last blocks last: safetensors sorts keys); ``__metadata__`` is
decoded with the JSON decoder and the entries are split as text (safetensors' own writer emits
``"key":{"dtype":…,"shape":[…],"data_offsets":[…]}`` with no spaces). Another layout, or ends that do not tell
the base model, fall back to reading and parsing the whole header. Types and base are read from key names and a few shapes
(``lorakit inspect`` gives the exact per-layer picture).
"""
from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import UnreadableFile
from ..files.header import check_header_length
from ..keymap import arch as archmod

HEAD, TAIL = 24_000, 12_000  # bytes read at each end of a long header
KEYS = 3_500  # characters of entries at each end whose key names are looked at (~30 keys)

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
META_RE = re.compile(r'"__metadata__"\s*:\s*')
SHAPE = r'[^"]*":\{"dtype":"\w+","shape":\['
RANK_RE = re.compile(r'(?:lora_down|lora_A|lora\.down|_lora\.down|hada_w1_b)(?:\.default)?(?:\.weight)?' + SHAPE + r"(\d+)")
WIDTH_RE = re.compile(r'attn2[._](?:processor\.)?to_k[._](?:lora_down|lora_A|lora\.down|hada_w1_b)' + SHAPE + r"\d+,(\d+)")
TE_WIDTH_RE = re.compile(r'(?:self_attn[._]q_proj[._](?:lora_down|lora_A)|text_encoder:0:down)' + SHAPE + r"\d+,(\d+)")
COMPONENTS = (("unet", ("unet", "input_blocks", "down_blocks", "mid_block", "up_blocks", "output_blocks")),
              ("te", ("lora_te_", "lora_te1_", "text_encoder.", "text_encoder:", "te1.")),
              ("te2", ("lora_te2_", "text_encoder_2.", "te2.")))
FLOAT_CODES = {"F32": ("<f", 4), "F16": ("<e", 2), "F64": ("<d", 8)}


@dataclass
class Summary:
    base: str  # sd1 / sd2 / sdxl / unknown, or a foreign family's name ("Flux")
    types: list[str]
    rank: int | None
    alpha: float | None
    tensors: int | None  # None when only the header's ends were read
    components: list[str]  # unet, te, te2
    metadata: dict[str, str] = field(default_factory=dict)

    def info(self) -> dict[str, Any]:
        """Everything but the metadata, as plain JSON-able values."""
        return {"base": self.base, "types": self.types, "rank": self.rank, "alpha": self.alpha,
                "tensors": self.tensors, "components": self.components}


def read_raw_header(path: Path, partial: bool = True) -> tuple[str, str | None, int]:
    """``(head, tail, data offset)``. A header longer than ``HEAD + TAIL`` bytes is read as its first ``HEAD`` and
    last ``TAIL`` bytes (``tail`` is ``None`` when ``head`` is the whole header): two ``pread`` calls."""
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
            raise UnreadableFile(path, "too short to be a safetensors file")
        (n,) = struct.unpack("<Q", first[:8])
        check_header_length(path, n, size)
        if partial and n > HEAD + TAIL:
            tail = os.pread(fd, TAIL, 8 + n - TAIL)
            return first[8:].decode("utf-8", "ignore"), tail.decode("utf-8", "ignore"), 8 + n
        return _utf8(path, first[8:8 + n] if n <= HEAD else os.pread(fd, n, 8)), None, 8 + n
    finally:
        os.close(fd)


def _utf8(path: Path, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UnreadableFile(path, "safetensors header is not UTF-8") from None


def split_metadata(path: Path, text: str) -> tuple[dict[str, str], str]:
    """``(metadata, the header without it)``; only the metadata object is decoded."""
    found = META_RE.search(text)
    if found is None:
        return {}, text
    at = found.start()
    try:
        meta, end = json.JSONDecoder().raw_decode(text, found.end())
    except json.JSONDecodeError as e:
        raise UnreadableFile(path, f"safetensors header is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise UnreadableFile(path, "safetensors __metadata__ is not an object")
    metadata = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
    return metadata, text[:at] + text[end:].lstrip().lstrip(",")


def compact_body(path: Path, body: str) -> str:
    """The tensor entries in safetensors' compact layout (re-serialised when another writer spaced them)."""
    if '":{"dtype":"' in body[:4096]:
        return body
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as e:
        raise UnreadableFile(path, f"safetensors header is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise UnreadableFile(path, "safetensors header is not a JSON object")
    return json.dumps(obj, separators=(",", ":"))


def sample_keys(body: str, tail: str | None) -> list[str]:
    """Key names of the first and last ~60 entries (``tail``: the header's last bytes, when it was read in two
    parts); entries cut at a chunk's edge are left out."""
    if tail is None and len(body) <= 2 * KEYS:
        chunks = [(body, False, False)]
    else:
        chunks = [(body[:KEYS], False, True), ((body if tail is None else tail)[-KEYS:], True, False)]
    keys = []
    for chunk, cut_start, cut_end in chunks:
        parts = chunk.lstrip('{,"').split('},"')
        for part in parts[int(cut_start):len(parts) - int(cut_end)]:
            key, sep, _ = part.partition('":{')
            if sep:
                keys.append(key)
    return keys


def summarise_safetensors(path: Path, partial: bool = True) -> Summary:
    head, tail, data_start = read_raw_header(path, partial)
    try:
        metadata, body = split_metadata(path, head)
    except UnreadableFile:
        if tail is None:
            raise
        return summarise_safetensors(path, partial=False)  # metadata longer than HEAD
    if tail is not None and ('":{"dtype":"' not in head or '"__metadata__"' not in head and '"__metadata__"' in tail):
        return summarise_safetensors(path, partial=False)  # another writer's layout: read it all
    body = compact_body(path, body) if tail is None else body
    text = body if tail is None else body + "\n" + tail
    count = body.count('"data_offsets"') if tail is None else None
    summary = summarise_keys(sample_keys(body, tail), text, count, metadata,
                             lambda key: _tensor_value(path, text, key, data_start))
    if summary.base == archmod.UNKNOWN and tail is not None:
        return summarise_safetensors(path, partial=False)  # the shapes that tell are in the middle
    return summary


def read_metadata_fast(path: Path) -> dict[str, str]:
    """A safetensors file's metadata from the header's first bytes (the whole header only when it must)."""
    head, tail, _ = read_raw_header(path)
    try:
        return split_metadata(path, head)[0]
    except UnreadableFile:
        if tail is None:
            raise
        return split_metadata(path, read_raw_header(path, partial=False)[0])[0]


def summarise_keys(keys: list[str], body: str, count: int | None, metadata: dict[str, str],
                   value: Callable[[str], float | None]) -> Summary:
    """``keys``: a sample of key names; ``body``: every entry as compact header text (searched with C-speed
    string and regex scans, never a Python loop per key)."""
    tails = {k[k.rfind(".", 0, len(k) - 7) + 1:] if k.endswith(".weight") else k[k.rfind(".") + 1:] for k in keys}
    blob = "\n".join(keys)
    types = _types(tails, blob, metadata)
    base = _base(keys, blob, body, metadata)
    comps = [c for c, marks in COMPONENTS if any(m in blob for m in marks)]
    if base == archmod.SDXL and "te2" not in comps and any(m in body for m in ("lora_te2_", "text_encoder_2.")):
        comps.append("te2")
    return Summary(base, types, _rank(body, metadata), _alpha(body, metadata, value), count, comps, metadata)


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


def _base(keys: list[str], blob: str, body: str, metadata: dict[str, str]) -> str:
    foreign = archmod.foreign_family(keys[:4] + keys[-4:], metadata)  # every key of a Flux/SD3 file says so
    if foreign:
        return foreign
    if any(m in blob for m in SDXL_MARKERS):
        return archmod.SDXL
    m = WIDTH_RE.search(body)
    if m and int(m[1]) in archmod.CROSS_DIM:
        return archmod.CROSS_DIM[int(m[1])]
    m = TE_WIDTH_RE.search(body)
    if m and int(m[1]) in archmod.TE_WIDTH:
        return archmod.TE_WIDTH[int(m[1])]
    return archmod.from_metadata(metadata) or archmod.UNKNOWN


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
    start = int(entry[entry.find('"data_offsets":[') + 16:].partition(",")[0])
    with path.open("rb") as f:
        f.seek(data_start + start)
        raw = f.read(8)
    if dtype == "BF16" and len(raw) >= 2:
        return float(struct.unpack("<f", b"\0\0" + raw[:2])[0])
    code = FLOAT_CODES.get(dtype)
    return float(struct.unpack(code[0], raw[:code[1]])[0]) if code and len(raw) >= code[1] else None


def summarise_pickle(path: Path) -> Summary:
    """Pickled LoRAs (``.pt``/``.bin``/``.ckpt``) need torch (loaded safely); summarised like safetensors."""
    from ..files.io import load_pickle

    obj = load_pickle(path)
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else {}
    tensors = {str(k): v for k, v in sd.items() if hasattr(v, "shape")}
    if not tensors:
        raise UnreadableFile(path, "no tensors in the file")
    body = json.dumps({k: {"dtype": "F32", "shape": list(v.shape), "data_offsets": [0, 0]}
                       for k, v in tensors.items()}, separators=(",", ":"))
    return summarise_keys(list(tensors), body, len(tensors), {},
                          lambda key: float(tensors[key].float().reshape(-1)[0]) if key in tensors else None)


def summarise(path: Path) -> Summary:
    return summarise_safetensors(path) if path.suffix.lower() == ".safetensors" else summarise_pickle(path)
