"""FLUX.1 GGUF files — city96's BFL-named ones and diffusers-named ones, the files lorakit loads — as base models
for the tools, read one tensor at a time from the file's memory map: a quantized tensor as a diffusers
``GGUFParameter`` of its raw block rows (a fused BFL layer's parts are row ranges of it: blocks run along rows, so
the split is exact), F32/F16 tensors as tensors. A quantized tensor's values are ``quant.layers.gguf_values`` in
``DENSE`` (bf16): the numbers a base loaded in bf16 computes with.

Every bad file — truncated, an unknown type id, rows that are no whole number of blocks (``GGUFReader`` checks these
when it opens the file), a type lorakit cannot dequantize, a quantized tensor that is not 2-D, tensors of another
architecture — is a ``ToolError`` naming the file (and the tensor) before any tensor is read or anything written."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ToolError
from ..files.header import Header, TensorInfo
from ..keymap import flux as fluxmap
from ..keymap.arch import Arch
from ..keymap.families import FLUX1
from ..models.flux import is_file as is_flux_file
from ..models.flux import transformer_keys
from ..quant.files import architecture, struct_error
from .dit_modelfile import single
from .flux_modelfile import COMPONENTS
from .modelfile import DENSE, ModelFile, Ref, TensorFile

PLAIN = {"F32": torch.float32, "F16": torch.float16}  # read as tensors (as the loader does); the rest are blocks


@dataclass
class GgufFile(TensorFile):
    """A GGUF file: ``header.tensors`` gives each tensor's type name (``Q8_0``, ``F32``…) and logical shape (torch
    order); ``entries`` its memory-mapped data."""

    entries: dict[str, Any] = field(default_factory=dict)  # name → gguf ``ReaderTensor``
    architecture: str | None = None  # general.architecture
    fields: list[Any] = field(default_factory=list)  # the key/value fields (``ReaderField``), for a requantized copy

    def kind(self, key: str) -> str:
        return self.header.tensors[key].dtype

    def dtype(self, key: str) -> torch.dtype:
        return PLAIN.get(self.kind(key), DENSE)

    def quantized(self, key: str) -> bool:
        return self.kind(key) not in PLAIN

    def holds(self, key: str) -> bool:
        return not self.quantized(key)

    def stored(self, key: str) -> str:
        return self.kind(key)

    def raw(self, key: str) -> np.ndarray[Any, Any]:
        """The tensor's bytes (quantized: rows of blocks, uint8 (out, bytes per row)) or numbers, copied."""
        return np.array(self.entries[key].data)

    def read(self, key: str) -> torch.Tensor:
        from diffusers.quantizers.gguf.utils import GGUFParameter

        data = torch.from_numpy(self.raw(key))
        if not self.quantized(key):
            return data.reshape(self.header.tensors[key].shape)
        return GGUFParameter(data, quant_type=self.entries[key].tensor_type)


def open_gguf(p: Path) -> GgufFile:
    """The file's tensor table (nothing read); a ``ToolError`` for an unreadable file or an unsupported type."""
    import gguf
    from diffusers.quantizers.gguf.utils import SUPPORTED_GGUF_QUANT_TYPES

    try:
        reader = gguf.GGUFReader(str(p))
        entries = {e.name: e for e in reader.tensors}
    except (ValueError, IndexError, KeyError, OSError, struct_error()) as e:
        raise ToolError(f"{p}: not a readable GGUF file ({type(e).__name__}: {str(e)[:160]})") from None
    known = (*PLAIN, *(t.name for t in SUPPORTED_GGUF_QUANT_TYPES))
    tensors: dict[str, TensorInfo] = {}
    for name, entry in entries.items():
        kind = str(entry.tensor_type.name)
        if kind not in known:
            raise ToolError(f"{p}: tensor {name} is {kind}, which lorakit cannot dequantize (supported: "
                            f"{', '.join(known)})")
        shape = tuple(int(s) for s in reversed(entry.shape.tolist()))
        if kind not in PLAIN and len(shape) != 2:
            raise ToolError(f"{p}: tensor {name} is a {len(shape)}-D {kind} tensor; lorakit reads quantized "
                            "Linear weights (2-D) only")
        start = int(entry.data_offset)
        tensors[name] = TensorInfo(kind, shape, start, start + int(entry.n_bytes))
    fields = [f for name, f in reader.fields.items() if not name.startswith("GGUF.")]
    return GgufFile(p, Header({}, tensors, 0), entries=entries, architecture=architecture(reader), fields=fields)


def gguf_model(p: Path, configs: Mapping[str, Mapping[str, Any]] | None = None) -> ModelFile:
    """A FLUX.1 GGUF file as a ``ModelFile``: BFL names mapped as a BFL single file's, diffusers names as they are."""
    tf = open_gguf(p)
    names = transformer_keys({k: k for k in tf.header.tensors})  # name without prefix → the file's key
    if not is_flux_file(tf.header.tensors):
        raise ToolError(f"{p}: a GGUF file of {tf.architecture or 'an unknown architecture'}; the tools read FLUX.1 "
                        "GGUF files, as lorakit loads them (SD/SDXL GGUF UNets are not supported)")
    stray = sorted(set(tf.header.tensors) - set(names.values()))
    if stray:
        raise ToolError(f"{p}: {stray[0]} is not a FLUX.1 transformer tensor ({len(stray)} such)")
    if any(fluxmap.is_bfl_path(n) for n in names):
        return single(p, tf.header, configs or {}, FLUX1, fluxmap.SINGLE_FILE, COMPONENTS, tf=tf)
    params: dict[str, Ref] = {}
    for name, key in names.items():
        tf.add(key, f"transformer.{name}", Ref(tf, key), params)
    config = {"transformer": dict((configs or {}).get("transformer", {}))}
    return ModelFile(p, "single", Arch.FLUX1, [tf], params, config)
