"""Base models as files, read one tensor at a time: a diffusers folder or a single file, each parameter found under
its canonical name (``unet.down_blocks.0.…to_q.weight``, ``text_encoder.encoder.layers.0.self_attn.q_proj.weight``)
without building the model — by the reader its family names (``Family.model_files``: ``sd_modelfile``,
``flux_modelfile``, ``sd3_modelfile``, ``dit_modelfile``).

Tensors are read with plain reads into fresh torch buffers (no mmap), so memory holds only what a tool keeps.
"""
from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ToolError
from ..files.header import Header, read_header
from ..files.inputs import read_json
from ..keymap.families import FAMILIES, SD, SUPPORTED, Family
from ..keymap.names import canonical_te_path
from ..quant.files import SCALE_KEYS
from ..quant.layers import FP8, fp8_values, gguf_values

TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
DENSE = torch.bfloat16  # the tools' compute dtype for quantized weights: a changed (or GGUF) layer is written in it


@dataclass(frozen=True)
class Ref:
    """Where a canonical parameter lives: ``key`` of ``file``; ``part`` (i, n) = the i-th of n row blocks (q/k/v
    of a fused ``in_proj``); ``rows``: these row ranges, in this order (a part of a FLUX.1 BFL fused layer: q/k/v/MLP
    of ``linear1``, the swapped halves of the final adaLN); ``transposed`` for OpenCLIP's ``text_projection``."""

    file: TensorFile
    key: str
    part: tuple[int, int] | None = None
    transposed: bool = False
    rows: tuple[tuple[int, int], ...] | None = None
    scale: str | None = None  # an fp8 weight's ComfyUI scale (``…scale_weight`` / ``…weight_scale``) in ``file``

    @property
    def dtype(self) -> torch.dtype:
        """The stored dtype (a GGUF-quantized weight: ``DENSE``, the dtype its values are read in)."""
        return self.file.dtype(self.key)

    @property
    def shape(self) -> tuple[int, ...]:
        shape = self.file.header.tensors[self.key].shape
        if self.part:
            shape = (shape[0] // self.part[1], *shape[1:])
        if self.rows:
            shape = (sum(b - a for a, b in self.rows), *shape[1:])
        return tuple(reversed(shape)) if self.transposed else shape

    def load(self) -> torch.Tensor:
        """The tensor as stored (an fp8 weight stays fp8: ``values`` gives its numbers)."""
        return self._select(self.file.read(self.key))

    def _select(self, t: torch.Tensor) -> torch.Tensor:
        if self.part:
            i, n = self.part
            rows = t.shape[0] // n
            t = t[i * rows:(i + 1) * rows].clone()
        if self.rows:
            t = torch.cat([t[a:b] for a, b in self.rows])
        return t.T.contiguous() if self.transposed else t

    @property
    def quantized(self) -> bool:
        """An fp8 or GGUF-quantized weight: its stored numbers are not its values."""
        return self.file.quantized(self.key)

    def values(self, c: torch.dtype) -> torch.Tensor:
        """The parameter's numbers in ``c``: an fp8 weight through lorakit's dequantization (``quant.layers.
        fp8_values``, its scale's rows selected as the weight's), a GGUF one through ``quant.layers.gguf_values`` in
        ``DENSE`` (the numbers a base loaded in bf16 computes with), never the stored bytes read as numbers."""
        t = self.load()
        if hasattr(t, "quant_type"):  # GGUF blocks (a row range of them: blocks run along rows)
            return gguf_values(t, DENSE).to(c)
        if not self.quantized:
            if t.is_floating_point():
                return t.to(c)
            if self.key.endswith(".weight") and t.dtype in (torch.uint8, torch.int8):
                raise ToolError(f"{self.file.path}: {self.key} is {t.dtype}: packed weights (bitsandbytes NF4, int8) "
                                "are not read by the tools")
            return t  # integer buffers (position ids) as they are
        return fp8_values(t, self.scale_values(), c)

    def scale_values(self) -> torch.Tensor | None:
        """The fp32 scale of an fp8 weight (per tensor, or its rows selected as the weight's); ``None`` unscaled."""
        if not self.scale:
            return None
        scale = self.file.read(self.scale).float().reshape(-1)
        return self._select(scale) if scale.numel() > 1 else scale


@dataclass
class TensorFile:
    """One safetensors file of a model; ``refs`` maps its keys to the canonical parameters they hold."""

    path: Path
    header: Header
    refs: dict[str, list[tuple[str, Ref]]] = field(default_factory=dict)

    def dtype(self, key: str) -> torch.dtype:
        return TORCH_DTYPES[self.header.tensors[key].dtype]

    def quantized(self, key: str) -> bool:
        return self.dtype(key) in FP8

    def holds(self, key: str) -> bool:
        """Whether a safetensors output can hold the tensor as stored (a GGUF file's blocks it cannot)."""
        return True

    def stored(self, key: str) -> str:
        """The stored type's name for reports: ``float8_e4m3fn``, ``Q8_0``…"""
        return str(self.dtype(key)).removeprefix("torch.")

    def read(self, key: str) -> torch.Tensor:
        info = self.header.tensors[key]
        buf = torch.empty(info.end - info.start, dtype=torch.uint8)
        with self.path.open("rb", buffering=0) as f:
            f.seek(self.header.data_start + info.start)
            if f.readinto(buf.numpy().data) != buf.numel():
                raise ToolError(f"{self.path}: tensor {key} is cut short (truncated file?)")
        return buf.view(TORCH_DTYPES[info.dtype]).reshape(info.shape)

    def add(self, key: str, canonical: str, ref: Ref, params: dict[str, Ref]) -> None:
        self.refs.setdefault(key, []).append((canonical, ref))
        params.setdefault(canonical, ref)


@dataclass
class ModelFile:
    """A base model on disk: its form (``folder`` or ``single``), architecture, tensor files and where each
    canonical parameter is (``params``; for folders with fp16 variants, the plain file is preferred)."""

    path: Path
    form: str
    arch: str
    files: list[TensorFile]
    params: dict[str, Ref]
    config: dict[str, Any]  # {"unet": {"cross_attention_dim": …}, "text_encoder": {"hidden_size": …}, …}

    def load(self, name: str) -> torch.Tensor:
        return self.params[name].load()

    def values(self, name: str, c: torch.dtype = torch.float32) -> torch.Tensor:
        """The parameter's numbers in ``c`` (an fp8 weight dequantized with its scale)."""
        return self.params[name].values(c)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.params[name].shape

    def modules(self) -> dict[str, tuple[int, ...]]:
        """Canonical module path → weight shape, for every module with a ``weight``."""
        return {n[:-len(".weight")]: r.shape for n, r in self.params.items() if n.endswith(".weight")}


def open_model(path: str | Path, configs: Mapping[str, Mapping[str, Any]] | None = None) -> ModelFile:
    """A diffusers folder (``model_index.json``) or a single ``.safetensors`` checkpoint of any family, read by the
    family's reader (``family_readers``), or a FLUX.1 ``.gguf`` file (``gguf_modelfile``); ``configs`` (UNet/text
    encoder constructor arguments) for single files of other than the full-size configs."""
    from .gguf_modelfile import gguf_model

    p = Path(path)
    if p.is_file() and p.suffix.lower() == ".gguf":
        return gguf_model(p, configs)  # FLUX.1 GGUF (BFL or diffusers names), read block rows at a time
    for family, reader in family_readers():
        found = reader.read(p, configs, family)
        if found is not None:
            return with_scales(found)
    raise ToolError(f"{p}: not a model folder or checkpoint of {SUPPORTED}")


def family_readers() -> list[tuple[Family, Any]]:
    """Each family's model-file reader: the module of ``lorakit.tools`` its ``Family.model_files`` names, with
    ``read(path, configs, family) -> ModelFile | None`` (``None``: not its family's). Asked in this order: a family
    whose models take another's LoRAs (``Family.fits``: Chroma, FLUX.1's) first — its files are that family's names
    plus its own, which the other's reader would take for its own —, then the rest, Stable Diffusion's last: it reads
    what no other family claims and says what is wrong with it."""
    order = sorted(FAMILIES.values(), key=lambda f: (f is SD, not f.fits))
    return [(f, importlib.import_module(f".{f.model_files}", __package__)) for f in order if f.model_files]


def with_scales(mf: ModelFile) -> ModelFile:
    """Each fp8 weight's Ref told its ComfyUI scale tensor (``<layer>.scale_weight`` / ``<layer>.weight_scale``
    beside ``<layer>.weight`` in the same file), in ``params`` and in the files' ``refs``."""
    for tf in mf.files:
        for key, refs in tf.refs.items():
            layer = key.removesuffix(".weight")
            scale = next((f"{layer}.{s}" for s in SCALE_KEYS if f"{layer}.{s}" in tf.header.tensors), None)
            if scale is None or not key.endswith(".weight"):
                continue
            tf.refs[key] = [(c, dataclasses.replace(ref, scale=scale)) for c, ref in refs]
            for canonical, ref in tf.refs[key]:
                if mf.params.get(canonical) is not None and mf.params[canonical].key == key:
                    mf.params[canonical] = ref
    return mf


def read_folder(p: Path, components: tuple[str, ...]) -> tuple[list[TensorFile], dict[str, Ref], dict[str, Any]]:
    """The weight files, canonical parameters and configs of a diffusers folder's ``components`` (text encoders'
    paths without ``text_model.``)."""
    files: list[TensorFile] = []
    params: dict[str, Ref] = {}
    config: dict[str, Any] = {}
    for component in components:
        folder = p / component
        if not folder.is_dir():
            continue
        config[component] = _json(folder / "config.json")
        pickles = sorted(folder.glob("*.bin"))
        weights = sorted(folder.glob("*.safetensors"), key=lambda f: (".fp16." in f.name or "." in f.stem, f.name))
        if not weights and pickles:
            raise ToolError(f"{folder}: weights in .bin only; the tools read safetensors folders (re-save the "
                            "model with safe_serialization=True)")
        for wf in weights:
            tf = TensorFile(wf, read_header(wf))
            for key in tf.header.tensors:
                name = canonical_te_path(key) if component.startswith("text_encoder") else key
                tf.add(key, f"{component}.{name}", Ref(tf, key), params)
            files.append(tf)
    return files, params, config


def _json(path: Path) -> dict[str, Any]:
    try:
        obj = read_json(path)
    except ValueError as e:
        raise ToolError(f"{path}: unreadable ({str(e)[:200]})") from None
    if not isinstance(obj, dict):
        raise ToolError(f"{path}: not a JSON object")
    return obj
