"""The tools on SD3 files (the FLUX.1 tools' original-layout seam, ``tools/flux_layout.py``, with SD3's SAI map):
``convert`` kohya (SAI names) ↔ ComfyUI SAI-PEFT ↔ diffusers/PEFT bit for bit — the fused ``qkv`` split into
parts and fused back, the last block's 2·h context adaLN swapped on ``up`` only, a 6·h one never — CLIP-L/CLIP-G/T5
names; ``merge`` (concat) and ``resize`` written back in SAI names, equal to the inputs' changes."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import lorakit
from lorakit.files.io import load_file, save_file
from lorakit.lora_model import load_lora
from lorakit.tools.convert import ConvertOptions, convert
from lorakit.tools.merge import MergeOptions, merge
from lorakit.tools.resize import ResizeOptions, resize
from lorakit.tools.svd import RankRule
from tests.factories import adapter_tensors
from tests.sd3_factories import kohya_keys, sai_lora, tiny_sd3_components
from tests.tools_helpers import delta, rel

META = {"modelspec.architecture": "stable-diffusion-3-medium/lora"}


@pytest.fixture(scope="module")
def sd3() -> dict[str, torch.nn.Module]:
    return tiny_sd3_components()


def _te(g: torch.Generator) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, shape in (("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", (32, 32)),
                        ("lora_te2_text_model_encoder_layers_1_mlp_fc1", (37, 32)),
                        ("lora_te3_encoder_block_0_layer_0_SelfAttention_q", (32, 32))):
        out.update({f"{name}.{k}": v for k, v in adapter_tensors("lora", shape, 2, g).items()})
    return out


@pytest.fixture(scope="module")
def files(sd3: dict[str, torch.nn.Module], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("sd3tools")
    tr = sd3["transformer"]
    out = {"a": d / "a.safetensors", "b": d / "b.safetensors"}
    keys = kohya_keys(sai_lora(tr, "lora", seed=1))
    keys.update(_te(torch.Generator().manual_seed(2)))
    save_file(keys, out["a"], META)
    save_file(kohya_keys(sai_lora(tr, "lora", rank=2, seed=3)), out["b"], META)
    return out


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path)[0]


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("via", ["kohya", "comfy", "peft", "diffusers"])
def test_convert_round_trips_bit_for_bit(files: dict[str, Path], tmp_path: Path, via: str) -> None:
    mid, back = tmp_path / "mid.safetensors", tmp_path / "back.safetensors"
    report = convert(files["a"], mid, ConvertOptions(via))
    assert report.notes == [] and report.left_out == []
    convert(mid, back, ConvertOptions("kohya"))
    assert _same(_tensors(back), _tensors(files["a"]))
    keys = set(_tensors(mid))
    assert load_lora(mid).arch == "sd3-medium"
    if via == "comfy":
        assert "diffusion_model.joint_blocks.0.x_block.attn.qkv.lora_A.weight" in keys
        assert "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight" in keys
    if via in ("peft", "diffusers"):
        assert "transformer.transformer_blocks.0.attn.to_k.lora_A.weight" in keys
        assert "transformer.transformer_blocks.1.norm1_context.linear.lora_B.weight" in keys
        assert "text_encoder_3.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight" in keys  # T5: no text_model
        assert not any(k.startswith(("lora_", "diffusion_model.")) for k in keys)


def test_peft_file_applies_as_the_kohya_file(sd3: dict[str, torch.nn.Module], files: dict[str, Path],
                                              tmp_path: Path) -> None:
    """The diffusers-layout file changes every model module as the SAI file does (the swaps included)."""
    convert(files["a"], tmp_path / "p.safetensors", ConvertOptions("peft"))
    a, p = load_lora(files["a"]), load_lora(tmp_path / "p.safetensors")
    assert set(a.layers) == set(p.layers) and len(a.layers) > 30
    for path in a.layers:
        assert rel(delta(p, path, sd3), delta(a, path, sd3)) < 1e-6, path


def test_merge_and_resize_write_sai_names_and_keep_the_change(sd3: dict[str, torch.nn.Module],
                                                              files: dict[str, Path], tmp_path: Path) -> None:
    merged = tmp_path / "m.safetensors"
    merge([f"{files['a']}:0.5", str(files["b"])], merged, MergeOptions(method="concat"))
    keys = set(_tensors(merged))
    assert "lora_unet_joint_blocks_1_context_block_adaLN_modulation_1.lora_down.weight" in keys
    assert not any(k.startswith("lora_transformer_") for k in keys)
    m, a, b = load_lora(merged), load_lora(files["a"]), load_lora(files["b"])
    assert m.arch == "sd3-medium"
    for path in b.layers:
        assert rel(delta(m, path, sd3), delta(a, path, sd3, 0.5) + delta(b, path, sd3)) < 1e-5, path
    small = tmp_path / "r.safetensors"
    resize(merged, small, ResizeOptions(RankRule("rank", 6)))
    r = load_lora(small)
    assert "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight" in _tensors(small)
    for path in b.layers:  # rank 4 + 2 = 6: the lossless rank, so the change stays
        assert rel(delta(r, path, sd3), delta(m, path, sd3)) < 1e-4, path


def test_svd_merge_of_sd3_files(sd3: dict[str, torch.nn.Module], files: dict[str, Path], tmp_path: Path) -> None:
    """Per model module at the inputs' total rank (lossless), then written back in SAI names."""
    out = tmp_path / "svd.safetensors"
    merge([f"{files['a']}:0.5", str(files["b"])], out, MergeOptions(method="svd"))
    assert "lora_unet_joint_blocks_1_context_block_attn_qkv.lora_down.weight" in _tensors(out)
    m, a, b = load_lora(out), load_lora(files["a"]), load_lora(files["b"])
    for path in b.layers:
        assert rel(delta(m, path, sd3), delta(a, path, sd3, 0.5) + delta(b, path, sd3)) < 1e-4, path


def test_bake_and_extract_on_an_sd3_folder(tmp_path: Path) -> None:
    """bake: the folder's weights = apply_loras' bit for bit; extract (base vs baked) gives the change back in SAI
    names — the fused qkv and the last block's swapped context adaLN whole — within the reported error."""
    import math

    from lorakit.models.loading import load_model
    from lorakit.tools.bake import bake
    from lorakit.tools.extract import ExtractOptions, extract
    from tests.sd3_factories import tiny_sd3_pipeline

    model = tmp_path / "model"
    pipe = tiny_sd3_pipeline()
    pipe.save_pretrained(model)  # type: ignore[attr-defined]
    comps = {n: getattr(pipe, n) for n in ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3")}
    lora = tmp_path / "a.safetensors"  # for the pipeline's 16-channel transformer
    keys = kohya_keys(sai_lora(comps["transformer"], "lora", seed=5))
    keys.update(_te(torch.Generator().manual_seed(6)))
    save_file(keys, lora, META)
    with lorakit.apply_loras(comps, [(lora, 0.8)]):
        want = {f"{c}.{n}": p.detach().clone() for c, m in comps.items() for n, p in m.named_parameters()}
    report = bake(model, [f"{lora}:0.8"], tmp_path / "baked")
    assert report.left_out == [] and report.layers
    baked = load_model(str(tmp_path / "baked"), device="cpu", dtype="fp32")
    assert baked.arch == "sd3-medium"
    for c in comps:
        for n, p in getattr(baked.pipe, c).named_parameters():
            assert torch.equal(p.detach(), want[f"{c}.{n}"]), f"{c}.{n}"
    out = tmp_path / "x.safetensors"
    report = extract(model, tmp_path / "baked", out, ExtractOptions(RankRule("rank", 4), components=("transformer",)))
    sd = _tensors(out)
    assert sd["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight"].shape[0] == 3 * 32  # one fused LoRA
    assert "lora_unet_joint_blocks_1_context_block_adaLN_modulation_1.lora_down.weight" in sd
    assert not any(k.startswith("lora_transformer_") for k in sd)
    tr = comps["transformer"]
    before = {n: p.detach().double().clone() for n, p in tr.named_parameters()}
    target = {n: want[f"transformer.{n}"].double() - before[n] for n in before if before[n].dim() == 2}
    with lorakit.apply_loras({"transformer": tr}, [(out, 1.0)]):
        got = {n: p.detach().double() - before[n] for n, p in tr.named_parameters() if n in target}
    err = math.sqrt(sum(float((got[n] - target[n]).pow(2).sum()) for n in target))
    norm = math.sqrt(sum(float(target[n].pow(2).sum()) for n in target))
    assert err / norm < 1e-4, err / norm  # rank 4 = the LoRA's rank: the change comes back
