"""FLUX.1 base models as files for the tools, read one tensor at a time: a diffusers folder (``transformer/``,
``text_encoder/`` CLIP-L, ``text_encoder_2/`` T5) or a single file — BFL's transformer-only ``flux1-dev.safetensors``
or a ComfyUI all-in-one checkpoint (``model.diffusion_model.`` + ``text_encoders.clip_l``/``t5xxl``) — whose BFL
tensors are found under the diffusers names lorakit's LoRAs use: a fused layer's parts as row ranges of its tensor
(``Ref.rows``: q/k/v/MLP of ``linear1``, the swapped halves of the final adaLN), split by the hidden width the file
itself shows (``img_in``'s rows), never a hard-coded 3072. The VAE is not read (LoRAs do not change it)."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ToolError
from ..files.header import read_header
from ..keymap import flux as fluxmap
from ..keymap.arch import Arch
from ..keymap.names import canonical_te_path
from ..models.flux import TE_PREFIXES, is_flux_index, transformer_keys
from ..quant.files import IGNORED, SCALE_KEYS
from .modelfile import ModelFile, Ref, TensorFile, _json, read_folder

COMPONENTS = ("transformer", "text_encoder", "text_encoder_2")


def flux_model(p: Path, configs: Mapping[str, Mapping[str, Any]] | None = None) -> ModelFile | None:
    """The FLUX.1 model at ``p``; ``None`` when ``p`` is no FLUX.1 folder or single file (another reader's)."""
    if p.is_dir():
        index = p / "model_index.json"
        return _folder(p) if index.is_file() and is_flux_index(_json(index)) else None
    if p.is_file() and p.suffix.lower() == ".safetensors":
        header = read_header(p)
        if any(k.startswith("double_blocks.") for k in transformer_keys(header.tensors)):
            return single_file(TensorFile(p, header), configs or {})
    return None


def _folder(p: Path) -> ModelFile:
    files, params, config = read_folder(p, COMPONENTS)
    if "transformer" not in config:
        raise ToolError(f"{p}: the FLUX.1 model folder has no transformer/")
    return ModelFile(p, "folder", Arch.FLUX1, files, params, config)


def single_file(tf: TensorFile, configs: Mapping[str, Mapping[str, Any]]) -> ModelFile:
    """A BFL-named single file (safetensors, or GGUF: ``tools/gguf_modelfile.py``): fused tensors as row ranges."""
    p, header = tf.path, tf.header
    params: dict[str, Ref] = {}
    bfl = transformer_keys({k: k for k in header.tensors})  # BFL name → the file's key
    img_in = header.tensors.get(bfl.get("img_in.weight", ""))
    if img_in is None:
        raise ToolError(f"{p}: a FLUX.1 file without img_in.weight: its hidden width is unknown")
    hidden = int(img_in.shape[0])
    for name, key in bfl.items():
        module, _, param = name.rpartition(".")
        if param in SCALE_KEYS or param in IGNORED or name in IGNORED:
            continue  # ComfyUI fp8 scales (read beside their weight: ``modelfile.with_scales``) and markers
        target = fluxmap.to_model(module)
        if target is None or param not in ("weight", "bias", "scale"):
            raise ToolError(f"{p}: {key} is not a FLUX.1 transformer tensor")
        param = "weight" if param == "scale" else param  # RMSNorm's scale is diffusers' weight
        if isinstance(target, str):
            tf.add(key, f"transformer.{target}.{param}", Ref(tf, key), params)
            continue
        pieces = target.pieces(int(header.tensors[key].shape[0]), hidden)
        if isinstance(pieces, str):
            raise ToolError(f"{p}: {key} cannot be split onto {', '.join(target.targets)}: {pieces}")
        for part, rows in pieces:
            tf.add(key, f"transformer.{part}.{param}", Ref(tf, key, rows=rows), params)
    for key in header.tensors:
        for component, prefix in TE_PREFIXES.items():
            if key.startswith(prefix):
                tf.add(key, f"{component}.{canonical_te_path(key[len(prefix):])}", Ref(tf, key), params)
    config: dict[str, Any] = {c: dict(configs.get(c, {})) for c in COMPONENTS
                              if any(n.startswith(c + ".") for n in params)}
    return ModelFile(p, "single", Arch.FLUX1, [tf], params, config)
