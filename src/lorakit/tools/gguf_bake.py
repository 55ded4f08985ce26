"""``bake --requant`` onto a GGUF base: a GGUF file of the base's own types and key layout, each changed layer
requantized — ``q(round_bf16(fp32(dq(Wq)) + ΣΔW))`` by the ``gguf`` package's quantizer (the blocks
``apply_loras(…, mode="requant")`` puts in, bit for bit) — and every other tensor's bytes copied. Lossy, so each
layer's loss is measured on what the file holds and reported, as the runtime opt-in reports it: the share of ΔW
kept ⟨ΔW_eff, ΔW⟩/‖ΔW‖² and the relative error ‖ΔW_eff − ΔW‖/‖ΔW‖, ΔW_eff = dq(new) − dq(old) in bf16. K-quants and
IQ types have no quantizer in ``gguf``: a layer of such a type to change is refused by name before anything is
computed. The file is streamed tensor by tensor (one layer's blocks in memory) to a temporary name, read back
by ``GGUFReader``, then renamed."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from ..errors import ToolError
from ..files.output import write_atomic
from ..quant.layers import gguf_values
from ..quant.make import GGUF_QUANTIZABLE, gguf_param
from .flux_bake import scatter_rows
from .gguf_modelfile import GgufFile
from .modelfile import DENSE, ModelFile, Ref
from .report import LayerResult
from .svd import diff_dot

SKIPPED_FIELDS = ("general.architecture", "general.alignment")  # the writer sets both (its own alignment)


class Baked(Protocol):
    """What the baker gives: the base, the modules that change, each one's patched tensors and report line."""

    mf: ModelFile
    touched: set[str]
    results: dict[str, LayerResult]

    def module(self, path: str) -> dict[str, torch.Tensor]: ...


def check_requant(mf: ModelFile, touched: set[str]) -> None:
    """A changed layer whose type ``gguf`` cannot quantize (K-quants, IQ types) → ``ToolError`` naming it."""
    for path in sorted(touched):
        ref = mf.params.get(f"{path}.weight")
        if ref is None or not ref.quantized:
            continue
        kind = ref.file.stored(ref.key)
        if kind not in GGUF_QUANTIZABLE:
            raise ToolError(f"{mf.path}: {ref.key} ({path}) is {kind}, which --requant cannot write: the gguf package "
                            f"quantizes {', '.join(GGUF_QUANTIZABLE)} only (no K-quant or IQ quantizer). Bake without "
                            "--requant (changed layers written in bf16, exactly)")


def requantized(baked: Baked, path: str, ref: Ref | None = None, leaf: str = "weight") -> torch.Tensor:
    """Module ``path``'s patched ``leaf`` stored in its own type (GGUF blocks, uint8 rows; F32/F16 numbers), its
    weight's loss written into its report line."""
    ref = ref or baked.mf.params[f"{path}.{leaf}"]
    new = baked.module(path)[leaf]
    if ref.quantized:
        blocks = gguf_param(new.float(), ref.file.stored(ref.key))
        stored, after = blocks.as_tensor(), gguf_values(blocks, DENSE)  # type: ignore[attr-defined]
    else:
        stored = new.to(ref.file.dtype(ref.key))
        after = stored.to(DENSE)
    if leaf == "weight":
        _loss(baked.results[path], ref.values(DENSE), new, after, ref.file.stored(ref.key))
    return stored


def _file(baked: Baked) -> GgufFile:
    tf = baked.mf.files[0]
    if not isinstance(tf, GgufFile):  # bake checks it first; a guard for other callers
        raise ToolError(f"{baked.mf.path}: --requant writes a GGUF from a GGUF base only")
    return tf


def _loss(result: LayerResult, before: torch.Tensor, wanted: torch.Tensor, after: torch.Tensor, kind: str) -> None:
    """ΔW = wanted − before, ΔW_eff = after − before: ‖ΔW‖² and ‖ΔW_eff − ΔW‖² into the layer's line, the share
    kept in its note (fp64 sums, a block of rows at a time)."""
    norm2 = diff_dot(wanted, before, wanted, before)
    result.norm2 = norm2
    result.err2 = diff_dot(after, wanted, after, wanted)  # ΔW_eff − ΔW = after − wanted
    kept = diff_dot(after, before, wanted, before) / norm2 if norm2 else 1.0
    result.note = f"changed by ‖ΔW‖ {norm2 ** 0.5:.3g}; requantized {kind}: {kept:.1%} of ΔW kept, error " \
                  f"{result.rel:.3g}"


def write_requantized(out: Path, mf: ModelFile, baked: Baked, meta: Mapping[str, str]) -> None:
    """The GGUF of ``mf`` with the changed tensors requantized, tensor by tensor through a temporary file."""
    import gguf

    tf = _file(baked)
    writer = gguf.GGUFWriter(path=None, arch=tf.architecture or "flux")
    _copy_fields(writer, tf.fields)
    for key, value in meta.items():
        writer.add_string(key, value)
    for key, entry in tf.entries.items():
        shape = tuple(int(s) for s in entry.data.shape)
        writer.add_tensor_info(key, shape, entry.data.dtype, int(entry.n_bytes), raw_dtype=entry.tensor_type)
    def write(tmp: Path) -> None:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for key in tf.entries:
            writer.write_tensor_data(_tensor(baked, tf, key))
        writer.close()

    write_atomic(out, write, verify=lambda tmp: _verify(tmp, tf))


def _tensor(baked: Baked, tf: GgufFile, key: str) -> np.ndarray[Any, Any]:
    """One tensor's data as the file stores it: copied, or rebuilt row range by row range from its parts (changed
    parts requantized, the others' rows copied: blocks run along rows)."""
    refs, touched = tf.refs.get(key, []), baked.touched
    if not any(c.rsplit(".", 1)[0] in touched for c, _ in refs):
        return tf.raw(key)
    parts = []
    for canonical, ref in refs:
        module, _, leaf = canonical.rpartition(".")
        t = requantized(baked, module, ref, leaf) if module in touched and leaf in baked.module(module) else \
            (ref.load().as_tensor() if ref.quantized else ref.load())  # type: ignore[attr-defined]
        parts.append((ref.rows, t))
    if parts[0][0] is None:
        return parts[0][1].contiguous().numpy()
    return scatter_rows(parts).contiguous().numpy()  # type: ignore[arg-type]


def _copy_fields(writer: Any, fields: list[Any]) -> None:
    """The source's key/value fields (``general.*``, ``comfy.*``, …) into the writer, as they are."""
    import gguf

    for f in fields:
        if f.name in SKIPPED_FIELDS or not f.types:
            continue
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(f.name, f.contents(), f.types[0], sub_type=sub)


def _verify(tmp: Path, source: GgufFile) -> None:
    """The written file reads back with the source's tensors, types and shapes."""
    import gguf

    try:
        got = {e.name: (e.tensor_type, tuple(e.shape.tolist())) for e in gguf.GGUFReader(str(tmp)).tensors}
    except (ValueError, OSError) as e:
        raise ToolError(f"{tmp}: the GGUF just written does not read back ({e}); nothing was written") from None
    want = {k: (e.tensor_type, tuple(e.shape.tolist())) for k, e in source.entries.items()}
    if got != want:
        raise ToolError(f"{tmp}: the GGUF just written holds other tensors than its source; nothing was written")
