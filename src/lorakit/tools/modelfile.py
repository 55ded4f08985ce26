"""Base models as files, read one tensor at a time: a diffusers folder (``unet/``, ``text_encoder*/``) or an
A1111 single file, each parameter found under its canonical name (``unet.down_blocks.0.…to_q.weight``,
``text_encoder.encoder.layers.0.self_attn.q_proj.weight``) without building the model.

Tensors are read with plain reads into fresh torch buffers (no mmap), so memory holds only what a tool keeps.
Single-file UNet names come from ``tools.checkpoint.unet_to_ldm`` (the exporter) for the UNet config in use;
OpenCLIP text encoders (SD2, SDXL's second) keep q/k/v fused in ``in_proj``: each projection is a row slice.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from ..errors import ToolError
from ..files.header import Header, read_header
from ..files.inputs import read_json
from ..keymap.arch import Arch
from ..keymap.names import canonical_te_path
from ..quant.files import SCALE_KEYS
from ..quant.layers import FP8, fp8_values, gguf_values

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
DENSE = torch.bfloat16  # the compute dtype the tools read quantized weights in: a changed (or GGUF) layer is written in it
UNET_PREFIX = "model.diffusion_model."
HF_TE = {"cond_stage_model.transformer.text_model.": "text_encoder", "cond_stage_model.transformer.": "text_encoder",
         "conditioner.embedders.0.transformer.text_model.": "text_encoder"}
OPENCLIP_TE: dict[str, tuple[str, str]] = {Arch.SD2: ("cond_stage_model.model.", "text_encoder"),
               Arch.SDXL: ("conditioner.embedders.1.model.", "text_encoder_2")}
_OPENCLIP_LAYER = {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
                   "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


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
    """A diffusers folder (``model_index.json``), a single ``.safetensors`` checkpoint or a FLUX.1 ``.gguf`` file;
    ``configs`` (UNet/text encoder constructor arguments) for single files of other than the full-size configs."""
    from .flux_modelfile import flux_model
    from .sd3_modelfile import sd3_model

    from .gguf_modelfile import gguf_model

    p = Path(path)
    if p.is_file() and p.suffix.lower() == ".gguf":
        return gguf_model(p, configs)  # FLUX.1 GGUF (BFL or diffusers names), read block rows at a time
    flux = flux_model(p, configs)  # FLUX.1: a diffusers folder, a BFL or ComfyUI single file
    if flux is not None:
        return with_scales(flux)
    sd3 = sd3_model(p)  # SD3 / SD3.5: a diffusers folder
    if sd3 is not None:
        return with_scales(sd3)
    if p.is_dir():
        if not (p / "model_index.json").is_file():
            raise ToolError(f"{p}: not a diffusers model folder (no model_index.json)")
        return with_scales(_open_folder(p))
    if not p.is_file():
        raise ToolError(f"{p}: no such model file or folder")
    if p.suffix.lower() != ".safetensors":
        raise ToolError(f"{p}: the tools read .safetensors checkpoints only (pickles load whole and may run code); "
                        "convert it first")
    return with_scales(_open_single(p, configs))


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


def _open_folder(p: Path) -> ModelFile:
    files, params, config = read_folder(p, COMPONENTS)
    if "unet" not in config:
        raise ToolError(f"{p}: the model folder has no unet/")
    index = _json(p / "model_index.json")
    arch = Arch.SDXL if "XL" in str(index.get("_class_name", "")) else _arch_from_config(config)
    return ModelFile(p, "folder", arch, files, params, config)


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


def _arch_from_config(config: dict[str, Any]) -> str:
    """What ``patch.targets.model_arch`` says of the loaded model (the same facts, from the config files)."""
    from ..patch.targets import model_arch

    return model_arch({k: SimpleNamespace(config=SimpleNamespace(**v)) for k, v in config.items()})  # type: ignore[misc]


def _json(path: Path) -> dict[str, Any]:
    try:
        obj = read_json(path)
    except ValueError as e:
        raise ToolError(f"{path}: unreadable ({str(e)[:200]})") from None
    if not isinstance(obj, dict):
        raise ToolError(f"{path}: not a JSON object")
    return obj


def _open_single(p: Path, configs: Mapping[str, Mapping[str, Any]] | None) -> ModelFile:
    from ..models.single_file import checkpoint_arch, default_configs

    tf = TensorFile(p, read_header(p))
    keys = list(tf.header.tensors)
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        raise ToolError(f"{p}: not a Stable Diffusion checkpoint (no {UNET_PREFIX}* keys)")
    arch = checkpoint_arch(dict.fromkeys(keys), p)  # type: ignore[arg-type]
    cfg = {k: dict(v) for k, v in (configs or default_configs(arch)).items()}
    params: dict[str, Ref] = {}
    _map_unet(tf, cfg["unet"], params)
    _map_hf_te(tf, params)
    if arch in OPENCLIP_TE:
        prefix, component = OPENCLIP_TE[arch]
        _map_openclip(tf, prefix, component, params)
    config = {"unet": cfg["unet"], "text_encoder": cfg.get("text_encoder", {})}
    if arch == Arch.SDXL:
        config["text_encoder_2"] = cfg.get("text_encoder_2", {})
    return ModelFile(p, "single", arch, [tf], params, config)


def _map_unet(tf: TensorFile, unet_config: Mapping[str, Any], params: dict[str, Ref]) -> None:
    from diffusers import UNet2DConditionModel

    from .checkpoint import unet_to_ldm

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
    for name, _ in unet.named_parameters():
        key = UNET_PREFIX + unet_to_ldm(name, unet.config)
        if key in tf.header.tensors:
            tf.add(key, f"unet.{name}", Ref(tf, key), params)


def _map_hf_te(tf: TensorFile, params: dict[str, Ref]) -> None:
    for key in tf.header.tensors:
        for prefix, component in HF_TE.items():
            if key.startswith(prefix):
                name = canonical_te_path(key[len(prefix):])
                tf.add(key, f"{component}.{name}", Ref(tf, key), params)
                break


def _map_openclip(tf: TensorFile, prefix: str, component: str, params: dict[str, Ref]) -> None:
    """OpenCLIP names → transformers CLIP names (the inverse of ``checkpoint.openclip_state``)."""
    top = {"ln_final.weight": "final_layer_norm.weight", "ln_final.bias": "final_layer_norm.bias"}
    for key in tf.header.tensors:
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix):]
        if rest in top:
            tf.add(key, f"{component}.{top[rest]}", Ref(tf, key), params)
        elif rest == "text_projection":
            tf.add(key, f"{component}.text_projection.weight", Ref(tf, key, transposed=True), params)
        elif rest.startswith("transformer.resblocks."):
            _map_resblock(tf, key, rest, component, params)


def _map_resblock(tf: TensorFile, key: str, rest: str, component: str, params: dict[str, Ref]) -> None:
    i, _, tail = rest[len("transformer.resblocks."):].partition(".")
    layer = f"{component}.encoder.layers.{i}"
    if tail.startswith("attn.in_proj_"):
        leaf = tail[len("attn.in_proj_"):]
        for n, proj in enumerate(("q_proj", "k_proj", "v_proj")):
            tf.add(key, f"{layer}.self_attn.{proj}.{leaf}", Ref(tf, key, part=(n, 3)), params)
        return
    module, _, leaf = tail.rpartition(".")
    if module in _OPENCLIP_LAYER:
        tf.add(key, f"{layer}.{_OPENCLIP_LAYER[module]}.{leaf}", Ref(tf, key), params)
