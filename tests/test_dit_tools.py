"""The tools on Qwen-Image and Chroma files, judged by what the written file does on the tiny model: convert
(kohya ↔ PEFT) exact, merge (concat) = the sum of its inputs, resize to the full rank exact; names as the family's
trainers write them, metadata naming the base."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import lorakit
from lorakit.errors import ToolError
from lorakit.files.io import load_file, save_file
from lorakit.lora_model import load_lora
from lorakit.tools.convert import ConvertOptions, convert
from lorakit.tools.merge import merge
from lorakit.tools.resize import ResizeOptions, resize
from lorakit.tools.svd import RankRule
from tests.chroma_factories import chroma_lora, tiny_chroma_transformer
from tests.flux_factories import kohya_keys
from tests.qwen_factories import kohya_name, qwen_lora, tiny_qwen_transformer


def _deltas(comps: dict[str, torch.nn.Module], specs: list[tuple[Path, float]]) -> dict[str, torch.Tensor]:
    """ΔW per transformer parameter that ``apply_loras`` makes (fp64), changed ones only."""
    tr = comps["transformer"]
    before = {n: p.detach().double().clone() for n, p in tr.named_parameters()}
    with lorakit.apply_loras(comps, [(load_lora(p), w) for p, w in specs]):
        after = {n: p.detach().double().clone() for n, p in tr.named_parameters()}
    return {n: after[n] - before[n] for n in before if not torch.equal(after[n], before[n])}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float = 1e-5) -> None:
    """The same changes, up to the rounding of W + ΔW in the model's fp32 weights."""
    assert a and sorted(a) == sorted(b)
    for n in a:
        assert float((a[n] - b[n]).norm()) <= tol * float(b[n].norm()), n


@pytest.fixture(scope="module")
def qwen(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, torch.nn.Module], Path]:
    d = tmp_path_factory.mktemp("qwen_tools")
    comps = {"transformer": tiny_qwen_transformer()}
    for name, seed in (("a", 1), ("b", 2)):
        layers = qwen_lora(comps["transformer"], "lora", seed=seed)
        save_file({f"{kohya_name(m)}.{k}": v for m, ls in layers.items() for k, v in ls.items()},
                  d / f"{name}.safetensors", {})
    return comps, d


def test_qwen_convert_kohya_peft_kohya_is_exact(qwen: tuple[dict[str, torch.nn.Module], Path], tmp_path: Path) -> None:
    comps, d = qwen
    convert(d / "a.safetensors", tmp_path / "p.safetensors", ConvertOptions(to="peft"))
    convert(tmp_path / "p.safetensors", tmp_path / "k.safetensors", ConvertOptions(to="kohya"))
    peft, kohya = load_file(tmp_path / "p.safetensors")[0], load_file(tmp_path / "k.safetensors")
    assert "transformer.transformer_blocks.1.img_mlp.net.2.lora_A.weight" in peft
    assert "lora_unet_transformer_blocks_1_img_mlp_net_2.lora_down.weight" in kohya[0]  # musubi-tuner's names
    assert load_lora(tmp_path / "k.safetensors").arch == "qwen-image"
    want = _deltas(comps, [(d / "a.safetensors", 0.8)])
    _same(_deltas(comps, [(tmp_path / "p.safetensors", 0.8)]), want)
    _same(_deltas(comps, [(tmp_path / "k.safetensors", 0.8)]), want)
    with pytest.raises(ToolError, match="--to comfy writes FLUX.1 LoRAs"):
        convert(d / "a.safetensors", tmp_path / "c.safetensors", ConvertOptions(to="comfy"))


def test_qwen_merge_is_the_sum_and_resize_to_full_rank_is_exact(qwen: tuple[dict[str, torch.nn.Module], Path],
                                                                tmp_path: Path) -> None:
    comps, d = qwen
    report = merge([f"{d / 'a.safetensors'}:0.7", f"{d / 'b.safetensors'}:-0.4"], tmp_path / "m.safetensors")
    assert report.tool == "merge (concat)"
    _same(_deltas(comps, [(tmp_path / "m.safetensors", 1.0)]),
          _deltas(comps, [(d / "a.safetensors", 0.7), (d / "b.safetensors", -0.4)]))
    resize(tmp_path / "m.safetensors", tmp_path / "r.safetensors", ResizeOptions(RankRule("rank", 8)))
    _same(_deltas(comps, [(tmp_path / "r.safetensors", 1.0)]), _deltas(comps, [(tmp_path / "m.safetensors", 1.0)]))
    assert load_file(tmp_path / "r.safetensors")[1]["modelspec.architecture"] == "Qwen-Image/lora"


def test_chroma_files_convert_and_merge_exactly(tmp_path: Path) -> None:
    comps = {"transformer": tiny_chroma_transformer()}
    save_file(kohya_keys(chroma_lora(comps["transformer"], "lora", seed=1)), tmp_path / "a.safetensors", {})
    for to in ("peft", "kohya", "comfy"):  # kohya and comfy: FLUX.1's BFL names, the approximator's in_layer
        convert(tmp_path / "a.safetensors", tmp_path / f"{to}.safetensors", ConvertOptions(to=to))
    kohya = load_file(tmp_path / "kohya.safetensors")[0]
    assert "lora_unet_distilled_guidance_layer_layers_1_out_layer.lora_down.weight" in kohya
    assert "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight" in load_file(tmp_path / "comfy.safetensors")[0]
    merge([str(tmp_path / "a.safetensors"), f"{tmp_path / 'peft.safetensors'}:0.5"], tmp_path / "m.safetensors")
    want = _deltas(comps, [(tmp_path / "a.safetensors", 1.0)])
    for out in ("peft", "kohya", "comfy"):
        assert load_lora(tmp_path / f"{out}.safetensors").arch == "chroma"
        _same(_deltas(comps, [(tmp_path / f"{out}.safetensors", 1.0)]), want)
    assert load_lora(tmp_path / "m.safetensors").arch == "chroma"
    _same(_deltas(comps, [(tmp_path / "m.safetensors", 1.0)]), {n: 1.5 * t for n, t in want.items()})


def test_library_lists_each_file_under_its_base(qwen: tuple[dict[str, torch.nn.Module], Path], tmp_path: Path) -> None:
    """From headers alone: musubi names, a diffusers-named file whose blocks go past FLUX.1's 19 (its deepest block
    sorted before a sample of keys would reach it), a Chroma file of FLUX.1 names and ``distilled_guidance_layer``."""
    from lorakit.library import Library

    _, d = qwen
    deep = {f"transformer.transformer_blocks.{i}.attn.to_q.lora_{ab}.weight":
            torch.zeros((2, 48) if ab == "A" else (48, 2))
            for i in range(60) for ab in "AB"}
    save_file(deep, tmp_path / "deep.safetensors", {})
    save_file(load_file(d / "a.safetensors")[0], tmp_path / "musubi.safetensors", {})
    save_file(kohya_keys(chroma_lora(tiny_chroma_transformer(), "lokr")), tmp_path / "own.safetensors", {})
    lib = Library([tmp_path], index=tmp_path / "i.sqlite3")
    assert {e.name: e.base for e in lib.search()} == {"deep": "qwen-image", "musubi": "qwen-image", "own": "chroma"}
    assert [e.name for e in lib.search(base="chroma")] == ["own"]
