"""Base models: the embedded demo model, and diffusers folders on disk (offline only), on the device and dtype
asked for (``models/device.py``: ``auto`` = CUDA, else MPS, else CPU; fp16 on CUDA/MPS, fp32 on the CPU).

The demo model (``demo``) is a tiny Stable Diffusion 1-architecture pipeline — UNet with cross-attention, a CLIP
text encoder with the real 49,408-token vocabulary, a VAE — trained by ``scripts/train_demo_model.py`` and shipped
in the package (``lorakit/data/demo``, fp16; ``lorakit.demo.weights``), so a fresh machine can generate without
downloading anything. It draws 64×64 pictures of coloured shapes: "a red circle", "a small blue star on the left",
"two yellow squares on a black background" (shapes: circle, square, triangle, diamond, star; colours: red, orange,
yellow, green, blue, purple, pink, white, black; backgrounds white, black, gray). Its hash is the SHA-256 of the
weights file. Point ``--model`` at a real model folder for real images.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import LorakitError, ModelError
from ..files.inputs import read_json
from ..keymap.arch import Arch
from ..quant.layers import is_quantized
from .device import (
    ORIGINALS,
    TILE_FROM,
    VRAM_MODES,
    check_choice,
    dtype_name,
    resolve_device,
    resolve_dtype,
)

log = logging.getLogger("lorakit")
DEMO = Arch.DEMO


@dataclass
class BaseModel:
    """A pipeline and what it is: name, A1111 hash, architecture, and where it runs. ``device`` is where its
    forward passes run (with ``vram="low"`` on CUDA the weights wait on the CPU between uses); ``dtype`` the
    dtype of its weights."""

    pipe: Any  # a diffusers StableDiffusionPipeline / StableDiffusionXLPipeline
    name: str
    hash: str  # A1111 "Model hash" (AutoV2-style, 10 hex digits)
    arch: Arch
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    vram: str = "normal"  # "low" | "normal" | "high"

    @property
    def sdxl(self) -> bool:
        return self.arch == Arch.SDXL

    @property
    def flux(self) -> bool:
        return self.arch == Arch.FLUX1

    @property
    def dit(self) -> Any:
        """The model module of its DiT family (``models/flux.py``, ``models/sd3.py``), ``None`` for SD/SDXL."""
        return dit_family(self.arch)

    @property
    def native_size(self) -> int:
        """The side in px of the pictures it was trained on: the default width and height (a DiT pipeline says
        its own: its default latent size × the VAE's scale; 1024 for one that does not — FLUX.1's and SD3's)."""
        sample = getattr(self.pipe, "default_sample_size", None) if self.dit is not None else None
        if sample is not None:
            return int(sample * self.pipe.vae_scale_factor)
        return 1024 if self.dit is not None else {Arch.DEMO: 64, Arch.SDXL: 1024}.get(self.arch, 512)

    @property
    def variant(self) -> str:
        """The finer base: ``flux-1-dev``, ``flux-1-schnell``… for FLUX.1, else the architecture (SD3: its size)."""
        dit = self.dit
        return str(self.arch) if dit is None else str(dit.variant(self.pipe))

    @property
    def vae_tiling(self) -> bool:
        """Whether the VAE decodes in tiles now."""
        return bool(getattr(self.pipe.vae, "use_tiling", False))

    def vae_tiling_for(self, width: int, height: int) -> bool:
        """Tiles for this image size: always with ``vram="low"``, never with ``"high"``, else from
        ``TILE_FROM`` (1536) px on either side."""
        if self.vram != "normal":
            return self.vram == "low"
        return max(width, height) >= TILE_FROM

    def set_vae_tiling(self, width: int, height: int) -> bool:
        """Turn the VAE's tiling on or off for a ``width``×``height`` image; returns whether it is on."""
        tiled = self.vae_tiling_for(width, height)
        if tiled != self.vae_tiling:
            self.pipe.vae.enable_tiling() if tiled else self.pipe.vae.disable_tiling()
        return tiled

    def describe(self) -> str:
        """``demo on cuda:0, fp16, vram normal`` — the one console line that says where the model runs."""
        offload = ", weights offloaded to the CPU between uses" if _offloaded(self.pipe) else ""
        return f"{self.name} on {self.device}, {dtype_name(self.dtype)}, vram {self.vram}{offload}"


def load_model(spec: str | None, *, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
               vram: str | None = None, lora_originals: str | None = None,
               components: str | Path | None = None) -> BaseModel:
    """``None``/``"demo"``: the embedded demo model; else a diffusers model folder (``model_index.json``) or an
    A1111 single file — on ``device`` in ``dtype`` (see ``models/device.py``), with the memory mode ``vram``
    (``low``: model CPU offload on CUDA + VAE tiling; ``normal``: all on the device, tiles from 1536 px;
    ``high``: never tiles) and where LoRA originals are kept (``auto``/``device``/``host``). An argument left
    ``None`` comes from ``$LORAKIT_DEVICE``/``$LORAKIT_DTYPE``/``$LORAKIT_VRAM``/``$LORAKIT_LORA_ORIGINALS``, else
    its default (``auto``, ``auto``, ``normal``, ``auto``). ``components``: a diffusers folder of the family
    (FLUX.1, SD3, Chroma, Qwen-Image) a single file takes its tokenizers (and, transformer-only, its text encoders
    and VAE) from (``$LORAKIT_COMPONENTS``)."""
    dev = resolve_device(device if device is not None else _env("device"))
    # FLUX.1's activations overflow fp16: ``auto`` is bf16 for the DiT families on a GPU (their modules' ``HALF``)
    dit = dit_of_path(Path(spec)) if spec not in (None, DEMO) else None
    half = dit.HALF if dit is not None else torch.float16
    dt = resolve_dtype(dtype if dtype is not None else _env("dtype"), dev, half)
    mode = check_choice(vram or _env("vram"), VRAM_MODES, "vram", "normal")
    originals = check_choice(lora_originals or _env("lora_originals"), ORIGINALS, "lora_originals", "auto")
    if spec in (None, DEMO):
        model = demo_model()
    else:
        extra = components if components is not None else _env("components")
        model = _from_path(Path(spec), dt, Path(extra) if extra else None)
    return place_model(model, dev, dt, mode, originals)


def _env(key: str) -> str | None:
    return os.environ.get(f"LORAKIT_{key.upper()}") or None


def _from_path(path: Path, dtype: torch.dtype, components: Path | None = None) -> BaseModel:
    if not path.exists():
        raise ModelError(f"{path}: no such model file or folder")
    if path.is_dir() and (path / "model_index.json").is_file():
        return _diffusers_folder(path, dtype)
    if path.is_file():
        return load_single_file(path, dtype=dtype, components=components)
    raise ModelError(f"{path}: not a diffusers model folder (no model_index.json)")


def place_model(model: BaseModel, device: torch.device, dtype: torch.dtype, vram: str = "normal",
                lora_originals: str = "auto") -> BaseModel:
    """Move ``model`` to ``device``/``dtype`` in memory mode ``vram`` (LoRAs applied to it are removed first:
    their originals belong to the old placement). Logs the one line that says where it runs."""
    from ..patch import patcher_for, restore

    restore(model.pipe)
    offload = vram == "low" and device.type == "cuda"
    if vram == "low" and not offload:
        log.info(f"vram low: model CPU offload needs CUDA, so it is ignored on {device} (VAE tiling stays on)")
    _move(model.pipe, torch.device("cpu") if offload else device, dtype)
    if offload:
        _offload(model.pipe, device)
    _use_sdpa(model.pipe)
    if vram == "low":
        model.pipe.vae.enable_tiling()
    patcher_for(model.pipe).fused.originals_mode = lora_originals
    model.device, model.dtype, model.vram = device, dtype, vram
    log.info(f"model {model.describe()}")
    return model


def _move(pipe: Any, device: torch.device, dtype: torch.dtype) -> None:
    """Every torch component to ``device``/``dtype``; submodules a model declares fp32-only
    (``_keep_in_fp32_modules``) stay fp32. Per module, not ``pipe.to``: that warns about fp16 on the CPU, which
    the user asked for, and about fp32 modules of models that have none."""
    for component in pipe.components.values():
        if not isinstance(component, torch.nn.Module):
            continue
        if any(is_quantized(m) for m in component.modules()):
            _move_quantized(component, device, dtype)
        else:
            torch.nn.Module.to(component, device=device, dtype=dtype)
        keep = set(getattr(component, "_keep_in_fp32_modules", None) or ())
        for name, sub in component.named_modules():
            if keep & set(name.split(".")):
                sub.float()


def _move_quantized(component: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """A component with quantized layers: everything to ``device``; the dense tensors to ``dtype``, the quantized
    weights (GGUF blocks, fp8) and their fp32 scales as they are, and those layers compute in ``dtype``."""
    torch.nn.Module.to(component, device=device)
    for module in component.modules():
        quantized = is_quantized(module)
        if quantized:
            setattr(module, "compute_dtype", dtype)
        for name, p in module._parameters.items():
            if p is not None and p.is_floating_point() and not (quantized and name == "weight") and p.dtype != dtype:
                p.data = p.data.to(dtype)
        for name, b in module._buffers.items():
            if b is not None and b.is_floating_point() and not quantized and b.dtype != dtype:
                module._buffers[name] = b.to(dtype)


def _offload(pipe: Any, device: torch.device) -> None:
    """diffusers' model CPU offload: each component moves to ``device`` for its forward and back after."""
    try:
        pipe.enable_model_cpu_offload(device=device)
    except (ImportError, ValueError, RuntimeError) as e:  # accelerate missing or too old
        raise ModelError(f"vram low needs diffusers' model CPU offload, which failed: {e}") from None


def _offloaded(pipe: Any) -> bool:
    return any(hasattr(m, "_hf_hook") for m in (getattr(pipe, "unet", None), getattr(pipe, "transformer", None),
                                                 getattr(pipe, "vae", None)) if m)


def _use_sdpa(pipe: Any) -> None:
    """Attention through PyTorch's SDPA (diffusers' ``AttnProcessor2_0``): replace the classic processor where a
    model came with it; custom processors are left alone."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    for name in ("unet", "vae"):
        module = getattr(pipe, name, None)
        procs = getattr(module, "attn_processors", None)
        if module is not None and procs and any(type(p) is AttnProcessor for p in procs.values()):
            module.set_attn_processor({k: AttnProcessor2_0() if type(p) is AttnProcessor else p
                                       for k, p in procs.items()})


def load_single_file(path: Path, configs: Mapping[str, Mapping[str, Any]] | None = None,
                     dtype: torch.dtype = torch.float32, components: Path | None = None) -> BaseModel:
    """An A1111-style ``.safetensors``/``.ckpt`` checkpoint (SD1, SD2, SDXL; ``configs`` default to the full-size
    ones of the architecture its tensors show), or a DiT family's single file (FLUX.1, SD3, Chroma, Qwen-Image; with
    ``components``: ``models/flux.py``, ``models/sd3.py``, ``models/folder_dits.py``), on the CPU in ``dtype``
    (``load_model`` places it)."""
    from ..files.hashes import cached_sha256
    from .single_file import (
        build_pipeline,
        checkpoint_arch,
        checkpoint_tensors,
        default_configs,
    )

    from ..quant.files import fp8_file, read_gguf
    from . import sd_gguf
    from .flux import load_single_file as flux_single_file

    if path.suffix.lower() == ".gguf":
        quantized = read_gguf(path)
        if _dit_file(quantized.tensors) is _flux():
            pipe = flux_single_file(path, {}, components, dtype, quantized)
            return BaseModel(pipe, path.stem, cached_sha256(path)[:10], Arch.FLUX1)
        if not sd_gguf.is_unet_file(quantized.tensors):
            raise ModelError(f"{path}: a GGUF file of {quantized.architecture or 'an unknown architecture'}; lorakit "
                             "loads FLUX.1 transformers and SD1/SD2/SDXL UNets from GGUF files")
        pipe, unet_arch = sd_gguf.load_gguf_unet(path, quantized, components, dtype)
        return BaseModel(pipe, path.stem, cached_sha256(path)[:10], unet_arch)
    sd = checkpoint_tensors(path)
    dit = _dit_file(sd)
    if dit is not None:
        pipe = dit.load_single_file(path, sd, components, dtype, fp8_file(dict(sd), path) if dit is _flux() else None)
        return BaseModel(pipe, path.stem, cached_sha256(path)[:10], Arch(dit.arch_of(pipe)))
    arch = checkpoint_arch(sd, path)
    pipe = build_pipeline(sd, path, arch, configs or default_configs(arch), dtype)
    return BaseModel(pipe, path.stem, cached_sha256(path)[:10], Arch(arch))


def dit_families() -> tuple[Any, ...]:
    """The model modules of the DiT families, each with ``ARCHES``, ``HALF``, ``is_index(model_index)``,
    ``is_file(tensors)``, ``load_folder``, ``load_single_file``, ``arch_of(pipe)`` and ``variant(pipe)``. SD3 is
    asked first: its SAI names (``joint_blocks``) are its own, while BFL and SAI share ``final_layer.*``; Chroma
    before FLUX.1: its checkpoints are BFL-named too, plus the approximator that only they have."""
    from . import flux, sd3
    from .folder_dits import CHROMA, QWEN_IMAGE

    return (sd3, CHROMA, QWEN_IMAGE, flux)


def dit_family(arch: str) -> Any:
    """The model module of the DiT family ``arch`` belongs to (``None``: Stable Diffusion)."""
    return next((m for m in dit_families() if arch in m.ARCHES), None)


def _flux() -> Any:
    from . import flux

    return flux


def _dit_file(sd: Mapping[str, Any]) -> Any:
    return next((m for m in dit_families() if m.is_file(sd)), None)


def dit_of_path(path: Path) -> Any:
    """The DiT family of the model at ``path`` (a folder's ``model_index.json``, a single file's key names), read
    cheaply: ``None`` for Stable Diffusion, and for a wrong or unreadable path (explained when it is loaded)."""
    from ..files.header import read_header

    try:
        if path.is_dir():
            index = read_json(path / "model_index.json")
            return next((m for m in dit_families() if m.is_index(index)), None) if isinstance(index, dict) else None
        if path.suffix.lower() == ".gguf":  # a FLUX.1 GGUF runs in bf16 on a GPU too
            from ..quant.files import gguf_names

            return _dit_file(dict.fromkeys(gguf_names(path)))
        return _dit_file(read_header(path).tensors) if path.suffix == ".safetensors" else None
    except (OSError, ValueError, LorakitError):
        return None


def is_flux_path(path: Path) -> bool:
    """Whether ``path`` holds a FLUX.1 model."""
    return dit_of_path(path) is _flux()


def _diffusers_folder(path: Path, dtype: torch.dtype) -> BaseModel:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    try:
        index = read_json(path / "model_index.json")
    except ValueError as e:
        raise ModelError(f"{path / 'model_index.json'}: unreadable ({str(e)[:200]})") from None
    if not isinstance(index, dict):
        raise ModelError(f"{path / 'model_index.json'}: not a JSON object")
    digest = hashlib.sha256(json.dumps(index, sort_keys=True).encode() + str(path.resolve()).encode()).hexdigest()
    from ..quant.nf4 import check_folder

    check_folder(path)  # a bitsandbytes (NF4) folder: bitsandbytes and CUDA, or a clear error
    dit = next((m for m in dit_families() if m.is_index(index)), None)
    if dit is not None:
        pipe = dit.load_folder(path, dtype)
        return BaseModel(pipe, path.name, digest[:10], Arch(dit.arch_of(pipe)))
    from .sd_gguf import sd_pipeline_class

    cls = sd_pipeline_class(index)
    try:
        extra = dict(safety_checker=None, requires_safety_checker=False) if cls is StableDiffusionPipeline else {}
        # ``dtype=`` (diffusers ≥ 0.36; older ones load fp32 and ``place_model`` casts)
        pipe = cls.from_pretrained(str(path), local_files_only=True, dtype=dtype, **extra)
    except Exception as e:  # diffusers raises many types for a broken folder
        raise ModelError(f"{path}: could not load the model ({type(e).__name__}: {str(e)[:200]})") from None
    from ..patch.targets import model_arch

    arch = Arch.SDXL if cls is StableDiffusionXLPipeline else model_arch({"unet": pipe.unet})
    return BaseModel(pipe, path.name, digest[:10], Arch(arch))


def demo_components(folder: Path | None = None) -> dict[str, torch.nn.Module]:
    """UNet, text encoder and VAE of the demo model: the shipped trained weights (or those in ``folder``)."""
    from ..demo.weights import DATA_DIR, load_components

    modules = load_components(folder or DATA_DIR)
    for name in ("unet", "text_encoder"):
        modules[name].lorakit_arch = Arch.DEMO  # what patch.targets.model_arch reports: shapes match no real base
    return modules


def demo_model(folder: Path | None = None) -> BaseModel:
    from diffusers import StableDiffusionPipeline

    from ..demo.weights import DATA_DIR, read_meta, weights_sha256
    from ..generate.samplers import scheduler_for
    from ..generate.tokenizer import clip_tokenizer

    c = demo_components(folder)
    prediction = str(read_meta(folder or DATA_DIR).get("prediction_type", "epsilon"))
    pipe = StableDiffusionPipeline(vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=clip_tokenizer(),
                                   unet=c["unet"], scheduler=scheduler_for("Euler a", prediction),
                                   safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    return BaseModel(pipe, DEMO, weights_sha256(folder or DATA_DIR)[:10], Arch.DEMO)
