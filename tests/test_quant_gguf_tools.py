"""``bake`` onto and ``extract`` from GGUF bases (tiny FLUX.1, BFL- and diffusers-keyed, quantized by the ``gguf``
package; K-quants as valid random blocks). A baked layer is ``round_bf16(fp32(dq(Wq)) + ΣΔW)`` bit for bit — the
independent recomputation and what ``apply_loras`` computes on the loaded quantized base — and every unchanged
quantized tensor its bf16 dequantization; ``--requant`` writes the base's types, its blocks those of the gguf
quantizer on that weight, and reports the loss it measures on what it wrote; K-quants are refused by name; bad files
are ``ToolError``s with nothing written."""
from __future__ import annotations

import math
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from lorakit import apply_loras
from lorakit.cli import main
from lorakit.errors import ToolError
from lorakit.files.io import load_file, save_file
from lorakit.lora_model import load_lora
from lorakit.models.loading import load_model
from lorakit.quant.layers import dq, is_quantized
from lorakit.quant.make import gguf_param, random_kquant
from lorakit.tools.bake import BakeOptions, bake
from lorakit.tools.extract import ExtractOptions, extract
from lorakit.tools.svd import RankRule
from tests.flux_factories import bfl_lora, bfl_state, bfl_table, kohya_keys, reference_deltas, tiny_flux_pipeline
from tests.test_flux_convert import _mixed
from tests.test_quant_files import write_gguf

C = torch.bfloat16
STRENGTH = 0.8
FULL_BIAS = "transformer.transformer_blocks.0.ff_context.net.2.bias"  # txt_mlp.2: a "full" layer, diff_b included


def _some(bfl: str) -> str | None:
    """Every network type on double block 0 and single block 0 (fused qkv/linear1, per-input DoRA on linear1)."""
    return _mixed(bfl) if bfl.startswith(("double_blocks.0.", "single_blocks.0.")) else None


class Base:
    """A GGUF base file, the LoRA, and what ``apply_loras`` computes on the loaded base (by module)."""

    def __init__(self, path: Path, lora: Path, flux_dir: Path, layers: dict[str, dict[str, torch.Tensor]]) -> None:
        self.path, self.lora = path, lora
        self.transformer = load_model(str(path), device="cpu", dtype="bf16", components=str(flux_dir)).pipe.transformer
        with apply_loras({"transformer": self.transformer}, [(lora, STRENGTH)]):
            self.want = {n: vars(m)["forward"].weight() for n, m in self.transformer.named_modules()
                         if "forward" in vars(m)}
        table = bfl_table(2, 3)  # the independent recomputation: ΔW on the fused dq weight, cut into parts' rows
        self.reference = {}
        for bfl, leaves in layers.items():
            for module, delta in reference_deltas(self.transformer, bfl, leaves, STRENGTH, table).items():
                self.reference[module] = (dq(self.transformer.get_submodule(module)).float() + delta).to(C)
        self.modules = dict(self.transformer.named_modules())


@pytest.fixture(scope="module")
def dense() -> torch.nn.Module:
    return tiny_flux_pipeline().transformer  # type: ignore[attr-defined, no-any-return]


@pytest.fixture(scope="module")
def bases(dense: torch.nn.Module, tiny_flux_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Base]:
    d = tmp_path_factory.mktemp("gguftools")
    layers = bfl_lora(dense, _some, seed=3)
    save_file(kohya_keys(layers), d / "some.safetensors")
    write_gguf(d / "bfl-Q8_0.gguf", bfl_state(dense), "Q8_0")
    write_gguf(d / "diffusers-Q5_0.gguf", dict(dense.state_dict()), "Q5_0")
    return {name: Base(d / f"{name}.gguf", d / "some.safetensors", tiny_flux_dir, layers)
            for name in ("bfl-Q8_0", "diffusers-Q5_0")}


@pytest.fixture(scope="module")
def requant(bases: dict[str, Base], tiny_flux_dir: Path, tmp_path_factory: pytest.TempPathFactory) \
        -> tuple[Path, dict[str, torch.nn.Module]]:
    """The Q8_0 base baked with ``--requant`` through the CLI, and its modules as lorakit loads them."""
    base = bases["bfl-Q8_0"]
    out = tmp_path_factory.mktemp("requant") / "baked-Q8_0.gguf"
    assert main(["bake", str(base.path), f"{base.lora}:{STRENGTH}", "-o", str(out), "--requant"]) == 0
    tr = load_model(str(out), device="cpu", dtype="bf16", components=str(tiny_flux_dir)).pipe.transformer
    return out, dict(tr.named_modules())


def _baked_modules(out: Path, base: Base, flux_dir: Path) -> dict[str, torch.Tensor]:
    """The output's weights by module: loaded by lorakit (BFL names), or read from the file (diffusers names)."""
    if base.path.name.startswith("bfl"):
        tr = load_model(str(out), device="cpu", dtype="bf16", components=str(flux_dir)).pipe.transformer
        return {n: m.weight.detach() for n, m in tr.named_modules() if isinstance(m, torch.nn.Linear)}
    return {k.removesuffix(".weight"): t for k, t in load_file(out)[0].items() if k.endswith(".weight")}


@pytest.mark.parametrize("name", ["bfl-Q8_0", "diffusers-Q5_0"])
def test_bake_onto_gguf_writes_the_applied_weights_in_bf16(bases: dict[str, Base], tiny_flux_dir: Path,
                                                           tmp_path: Path, name: str) -> None:
    base = bases[name]
    assert base.want.keys() == base.reference.keys() and len(base.want) == 20
    assert [n for n, w in base.want.items() if not torch.equal(w, base.reference[n])] == []
    out = tmp_path / "baked.safetensors"
    report = bake(base.path, [f"{base.lora}:{STRENGTH}"], out)
    assert len(report.layers) == len(base.want) and report.left_out == [] and report.per_component()["transformer"] == 0
    assert report.size_before == base.path.stat().st_size and any("dequantized in bf16" in n for n in report.notes)
    got = _baked_modules(out, base, tiny_flux_dir)
    assert [n for n, w in base.want.items() if got[n].dtype != C or not torch.equal(got[n], w)] == []
    quantized = [n for n, m in base.modules.items() if is_quantized(m) and n not in base.want]
    assert len(quantized) > 20 and [n for n in quantized if not torch.equal(got[n], dq(base.modules[n]))] == []
    stored = {e.name: e for e in gguf.GGUFReader(str(base.path)).tensors}  # F32 tensors (norms, biases) as stored
    written = load_file(out)[0]
    plain = [k for k, e in stored.items() if e.tensor_type == gguf.GGMLQuantizationType.F32 and ".0." not in k]
    assert plain and all(torch.equal(written[k], torch.from_numpy(np.array(stored[k].data))) for k in plain)


def test_bake_requant_writes_the_base_types_and_reports_the_loss_it_wrote(
        bases: dict[str, Base], requant: tuple[Path, dict[str, torch.nn.Module]]) -> None:
    base = bases["bfl-Q8_0"]
    out, new = requant
    source = {e.name: e for e in gguf.GGUFReader(str(base.path)).tensors}
    written = {e.name: e for e in gguf.GGUFReader(str(out)).tensors}
    assert {k: e.tensor_type for k, e in written.items()} == {k: e.tensor_type for k, e in source.items()}
    changed = {k for k in source if k.startswith(("double_blocks.0.", "single_blocks.0."))}
    kept = [k for k in source if k not in changed]
    assert kept and all(np.array_equal(np.array(written[k].data), np.array(source[k].data)) for k in kept)
    for n, w in base.want.items():  # the gguf quantizer's blocks of the applied weight, bit for bit
        assert torch.equal(new[n].weight.as_tensor(), gguf_param(w.float(), "Q8_0").as_tensor()), n
    report = bake(base.path, [f"{base.lora}:{STRENGTH}"], None, BakeOptions(requant=True, dry_run=True))
    lines = {r.path.removeprefix("transformer."): r for r in report.layers}
    assert lines.keys() == base.want.keys()
    for n, w in base.want.items():  # the loss reported = the loss measured on the written file
        before = dq(base.modules[n]).double()
        delta, effective = w.double() - before, dq(new[n]).double() - before
        measured = float((effective - delta).norm() / delta.norm())
        assert lines[n].rel == pytest.approx(measured, rel=1e-9, abs=1e-12), n
        share = float((effective * delta).sum() / (delta * delta).sum())
        assert f"{share:.1%} of ΔW kept" in lines[n].note
    assert max(r.rel for r in report.layers) > 0.01  # Q8_0 loses part of a small ΔW: the report shows it


def _wide_kquant(d: Path) -> tuple[Path, Path, dict[str, dict[str, torch.Tensor]]]:
    """A FLUX.1 of width 256 (rows hold whole 256-value K-quant blocks) in BFL names: Q4_K random valid blocks
    where the rows allow, F32 elsewhere; a LoRA on two plain (unfused) layers."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    tr = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=128,
                                num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                axes_dims_rope=[16, 56, 56], guidance_embeds=True).eval()
    writer = gguf.GGUFWriter(path=None, arch="flux")
    for i, (name, t) in enumerate(bfl_state(tr, 1, 1).items()):
        if t.dim() == 2 and t.shape[1] % 256 == 0:
            writer.add_tensor(name, random_kquant(t.shape[0], t.shape[1], "Q4_K", seed=i).numpy(),
                              raw_dtype=gguf.GGMLQuantizationType.Q4_K)
        else:
            writer.add_tensor(name, t.detach().float().numpy())
    path = d / "wide-Q4_K.gguf"
    writer.write_header_to_file(path=str(path))
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    layers = bfl_lora(tr, lambda b: "lora" if b in ("double_blocks.0.img_attn.proj", "single_blocks.0.linear2")
                      else None, seed=5, double=1, single=1)
    save_file(kohya_keys(layers), d / "wide-lora.safetensors")
    return path, d / "wide-lora.safetensors", layers


def test_k_quant_bases_bake_exactly_and_refuse_requant_by_name(tmp_path: Path) -> None:
    path, lora, layers = _wide_kquant(tmp_path)
    out = tmp_path / "wide.safetensors"
    bake(path, [f"{lora}:{STRENGTH}"], out)
    written, source = load_file(out)[0], {e.name: e for e in gguf.GGUFReader(str(path)).tensors}
    for bfl, leaves in layers.items():  # round_bf16(fp32(dq(Wq)) + m·(α/r)·up·down), written out here (one fp32
        # addmm: how lorakit's fused path adds a LoRA, rounding included)
        w = dq_blocks(_blocks(torch.from_numpy(np.array(source[f"{bfl}.weight"].data)), "Q4_K"))
        up, down = leaves["lora_up.weight"], leaves["lora_down.weight"]
        want = torch.addmm(w.float(), up, down, alpha=float(leaves["alpha"]) / down.shape[0] * STRENGTH).to(C)
        assert torch.equal(written[f"{bfl}.weight"], want), bfl
    for options, output, match in [(BakeOptions(requant=True), tmp_path / "w.gguf", "is Q4_K, which --requant cannot"),
                                   (BakeOptions(requant=True), tmp_path / "w2.safetensors", "name it NAME.gguf"),
                                   (BakeOptions(), tmp_path / "w3.gguf", "name it NAME.safetensors")]:
        with pytest.raises(ToolError, match=match):
            bake(path, [str(lora)], output, options)
        assert not output.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wide-Q4_K.gguf", "wide-lora.safetensors", "wide.safetensors"]


def dq_blocks(blocks: torch.Tensor) -> torch.Tensor:
    """diffusers' dequantization of raw GGUF blocks, in bf16 (what ``GGUFLinear`` computes with in bf16)."""
    from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

    return dequantize_gguf_tensor(blocks).to(C)


def test_extract_from_a_gguf_base_recovers_the_change(bases: dict[str, Base],
                                                      requant: tuple[Path, dict[str, torch.nn.Module]],
                                                      tmp_path: Path) -> None:
    base = bases["bfl-Q8_0"]
    bake(base.path, [f"{base.lora}:{STRENGTH}"], tmp_path / "dense.safetensors")
    tuned = {tmp_path / "dense.safetensors": base.want,  # ΔW: what apply_loras changes; requantized: dq(new) − dq(old)
             requant[0]: {n: dq(requant[1][n]) for n in base.want}}
    for path, want in tuned.items():
        out = tmp_path / f"x-{path.stem}.safetensors"
        report = extract(base.path, path, out, ExtractOptions(RankRule("rank", 32), components=("transformer",)))
        assert [p for p, _ in report.left_out] == [FULL_BIAS]  # the "full" layer's diff_b: no place in a LoRA
        lora = load_lora(out)
        assert set(lora.layers) == {f"transformer.{n}" for n in want}  # unchanged layers compare equal in bf16
        err2 = norm2 = 0.0
        for n, w in want.items():
            before = dq(base.modules[n]).float()
            got = lora.layers[f"transformer.{n}"].delta(before, 1.0)
            err2 += float((got.double() - (w.double() - before.double())).pow(2).sum())
            norm2 += float((w.double() - before.double()).pow(2).sum())
        assert math.sqrt(err2 / norm2) < 1e-5, path.name


def _patched(src: Path, dst: Path, edit: bytes, at: str, offset: int) -> Path:
    """``src`` with ``edit`` written over the tensor-info field ``offset`` bytes after tensor ``at``'s name."""
    raw = bytearray(src.read_bytes())
    where = raw.find(at.encode()) + len(at)
    raw[where + offset:where + offset + len(edit)] = edit
    dst.write_bytes(bytes(raw))
    return dst


def test_bad_gguf_files_are_tool_errors_and_nothing_is_written(bases: dict[str, Base], dense: torch.nn.Module,
                                                               tmp_path: Path) -> None:
    good = bases["bfl-Q8_0"].path
    name = "double_blocks.0.img_attn.proj.weight"  # 2-D Q8_0: n_dims u32, 2 × u64 dims, type u32
    (tmp_path / "cut.gguf").write_bytes(good.read_bytes()[:-4000])
    cases = {"cut.gguf": "not a readable GGUF file",
             "type99.gguf": "not a readable GGUF file.*99",
             "rows.gguf": "not a readable GGUF file.*not a multiple of Q8_0 block size",
             "mxfp4.gguf": f"{name} is MXFP4, which lorakit cannot dequantize"}
    _patched(good, tmp_path / "type99.gguf", struct.pack("<I", 99), name, 4 + 16)
    _patched(good, tmp_path / "rows.gguf", struct.pack("<Q", 48), name, 4)
    _patched(good, tmp_path / "mxfp4.gguf", struct.pack("<I", int(gguf.GGMLQuantizationType.MXFP4)), name, 4 + 16)
    other = bfl_state(dense)
    other["double_blocks.0.img_attn.qkv.weight"] = torch.zeros(4 * 32, 32)  # rows that are no q/k/v split
    write_gguf(tmp_path / "split.gguf", other, "Q8_0")
    cases["split.gguf"] = "double_blocks.0.img_attn.qkv.weight cannot be split"
    write_gguf(tmp_path / "sdxl.gguf", {"input_blocks.1.1.proj_in.weight": torch.zeros(32, 32)}, "Q8_0", arch="sdxl")
    cases["sdxl.gguf"] = "a GGUF file of sdxl; the tools read FLUX.1 GGUF files"
    for file, match in cases.items():
        with pytest.raises(ToolError, match=match):
            bake(tmp_path / file, [str(bases["bfl-Q8_0"].lora)], tmp_path / "out.safetensors")
        with pytest.raises(ToolError, match=match):
            extract(tmp_path / file, good, tmp_path / "x.safetensors", ExtractOptions(components=("transformer",)))
    huge = {f"transformer.transformer_blocks.1.attn.to_k.lora_{ab}.weight": torch.full(shape, 1e20)
            for ab, shape in (("A", (4, 32)), ("B", (32, 4)))}  # finite factors, ΔW beyond fp32
    save_file(huge, tmp_path / "huge.safetensors")
    for out, options in [(tmp_path / "inf.safetensors", BakeOptions()),
                         (tmp_path / "inf.gguf", BakeOptions(requant=True))]:
        with pytest.raises(ToolError, match="holds NaN or infinite values"):  # found mid-way: nothing half-written
            bake(good, [str(tmp_path / "huge.safetensors")], out, options)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*cases, "huge.safetensors"])


def test_a_fused_tensor_changed_in_part_keeps_its_other_rows(bases: dict[str, Base], tmp_path: Path) -> None:
    """A diffusers-named LoRA on ``to_k`` alone changes rows H:2H of BFL's ``img_attn.qkv``: bf16 bake — those rows
    ``round_bf16(fp32(dq) + ΔW)``, the others their dequantization; ``--requant`` — those rows re-quantized, the
    others' blocks copied."""
    base, h = bases["bfl-Q8_0"], 32
    g = torch.Generator().manual_seed(11)
    down, up = torch.randn(4, h, generator=g) * 0.1, torch.randn(h, 4, generator=g) * 0.1
    save_file({"transformer.transformer_blocks.1.attn.to_k.lora_A.weight": down,
               "transformer.transformer_blocks.1.attn.to_k.lora_B.weight": up}, tmp_path / "k.safetensors")
    key = "double_blocks.1.img_attn.qkv.weight"
    raw = torch.from_numpy(np.array(next(e for e in gguf.GGUFReader(str(base.path)).tensors if e.name == key).data))
    w = dq_blocks(_blocks(raw))
    want_k = torch.addmm(w[h:2 * h].float(), up, down, alpha=1.0 * STRENGTH).to(C)  # no alpha: scale 1
    bake(base.path, [f"{tmp_path / 'k.safetensors'}:{STRENGTH}"], tmp_path / "k-baked.safetensors")
    got = load_file(tmp_path / "k-baked.safetensors")[0][key]
    assert torch.equal(got[h:2 * h], want_k) and torch.equal(got[:h], w[:h]) and torch.equal(got[2 * h:], w[2 * h:])
    bake(base.path, [f"{tmp_path / 'k.safetensors'}:{STRENGTH}"], tmp_path / "k.gguf", BakeOptions(requant=True))
    new = torch.from_numpy(np.array(next(e for e in gguf.GGUFReader(str(tmp_path / "k.gguf")).tensors
                                        if e.name == key).data))
    assert torch.equal(new[:h], raw[:h]) and torch.equal(new[2 * h:], raw[2 * h:])
    assert torch.equal(new[h:2 * h], gguf_param(want_k.float(), "Q8_0").as_tensor())


def _blocks(raw: torch.Tensor, kind: str = "Q8_0") -> torch.Tensor:
    """Raw GGUF rows as diffusers' ``GGUFParameter``."""
    from diffusers.quantizers.gguf.utils import GGUFParameter

    return GGUFParameter(raw, quant_type=gguf.GGMLQuantizationType[kind])
