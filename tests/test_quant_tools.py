"""``bake`` onto and ``extract`` from quantized bases: tiny FLUX.1 fp8 files (unscaled, ComfyUI's legacy and new
scaled layouts; BFL keys) and a tiny SDXL fp8 checkpoint. A baked layer is the bf16 weight ``apply_loras`` computes on
that base per forward (``round_bf16(fp32(dq(Wq)) + ΣΔW)``), its scale tensors gone; every other tensor keeps its
bytes, and lorakit loads the mixed file. ``extract`` reads fp8 weights through their dequantization (scales
included). GGUF bases: tests/test_quant_gguf_tools.py."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lorakit import apply_loras
from lorakit.errors import ToolError
from lorakit.files.io import load_file, save_file
from lorakit.lora_model import load_lora
from lorakit.models.loading import load_model, load_single_file, place_model
from lorakit.quant.layers import is_quantized, weight_values
from lorakit.tools.bake import bake
from lorakit.tools.extract import ExtractOptions, extract
from lorakit.tools.svd import RankRule
from tests.flux_factories import bfl_lora, kohya_keys, tiny_flux_pipeline
from tests.test_flux_convert import _mixed
from tests.test_quant_files import _fp8_file

C = torch.bfloat16


def _some(bfl: str) -> str | None:
    """Every type on double block 0 (fused qkv and per-input DoRA on single block 0's linear1 too); the rest kept."""
    return _mixed(bfl) if bfl.startswith(("double_blocks.0.", "single_blocks.0.")) else None


@pytest.fixture(scope="module")
def fp8_base(tiny_flux_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    d = tmp_path_factory.mktemp("quanttools")
    pipe = tiny_flux_pipeline()
    pipe.to(C)  # type: ignore[attr-defined]
    for layout in ("plain", "legacy", "new"):
        save_file(_fp8_file(pipe, layout), d / f"fp8-{layout}.safetensors")
    save_file(kohya_keys(bfl_lora(pipe.transformer, _some, seed=3)), d / "some.safetensors")  # type: ignore[attr-defined]
    return d, d / "some.safetensors", tiny_flux_dir


def _merged(model_path: Path, lora: Path, flux_dir: Path, strength: float) -> dict[str, torch.Tensor]:
    """The weights ``apply_loras`` computes per forward on the quantized base (compute bf16), by module."""
    model = load_model(str(model_path), device="cpu", dtype="bf16", components=str(flux_dir))
    tr = model.pipe.transformer
    with apply_loras({"transformer": tr}, [(lora, strength)]):
        return {n: vars(m)["forward"].weight() for n, m in tr.named_modules() if "forward" in vars(m)}


@pytest.mark.parametrize("layout", ["plain", "legacy", "new"])
def test_bake_onto_fp8_writes_bf16_layers_equal_to_apply(fp8_base: tuple[Path, Path, Path], tmp_path: Path,
                                                          layout: str) -> None:
    d, lora, flux_dir = fp8_base
    src = d / f"fp8-{layout}.safetensors"
    want = _merged(src, lora, flux_dir, 0.8)
    assert {n.split(".")[0] for n in want} == {"transformer_blocks", "single_transformer_blocks"}
    out = tmp_path / "baked.safetensors"
    report = bake(src, [f"{lora}:0.8"], out)
    assert report.left_out == [] and report.notes and report.size_before == src.stat().st_size
    before, after = load_file(src)[0], load_file(out)[0]
    changed = {k for k in before if k.startswith(("model.diffusion_model.double_blocks.0.",
                                                  "model.diffusion_model.single_blocks.0."))}
    assert all(after[k].dtype == C for k in changed if k.endswith(".weight") and before[k].dtype != C)
    assert not any(k in after for k in changed if k.endswith(("scale_weight", "weight_scale", "comfy_quant")))
    kept = [k for k in before if k not in changed]
    assert [k for k in kept if not (after[k].dtype == before[k].dtype and
                                    torch.equal(after[k].reshape(-1).view(torch.uint8),
                                                before[k].reshape(-1).view(torch.uint8)))] == []
    baked = load_model(str(out), device="cpu", dtype="bf16", components=str(flux_dir)).pipe.transformer
    modules = dict(baked.named_modules())
    assert all(not is_quantized(modules[n]) and torch.equal(weight_values(modules[n]), w) for n, w in want.items())
    assert sum(is_quantized(m) for m in modules.values()) > len(want)  # the rest stays fp8


def test_extract_from_a_scaled_fp8_base_reads_its_values(fp8_base: tuple[Path, Path, Path], tmp_path: Path) -> None:
    d, lora, flux_dir = fp8_base
    base = d / "fp8-legacy.safetensors"
    bake(base, [f"{lora}:1"], tmp_path / "tuned.safetensors")
    out = tmp_path / "x.safetensors"
    report = extract(base, tmp_path / "tuned.safetensors", out,
                     ExtractOptions(RankRule("rank", 32), components=("transformer",), dtype=torch.float32))
    names = {k.split(".")[0] for k in load_file(out)[0]}
    assert names and all(n.startswith(("lora_unet_double_blocks_0_", "lora_unet_single_blocks_0_")) for n in names)
    model = load_model(str(base), device="cpu", dtype="fp32", components=str(flux_dir))
    tr = model.pipe.transformer
    tuned = dict(load_model(str(tmp_path / "tuned.safetensors"), device="cpu", dtype="fp32",
                            components=str(flux_dir)).pipe.transformer.named_modules())
    with apply_loras({"transformer": tr}, [(load_lora(out), 1.0)]):
        got = {n: vars(m)["forward"].weight().double() for n, m in tr.named_modules() if "forward" in vars(m)}
    restored = {n: weight_values(tr.get_submodule(n)).double() for n in got}
    want = {n: weight_values(tuned[n]).double() - restored[n] for n in got}
    err = math.sqrt(sum(float((got[n] - restored[n] - want[n]).pow(2).sum()) for n in got))
    norm = math.sqrt(sum(float(w.pow(2).sum()) for w in want.values()))
    assert err / norm < 1e-5 and report.per_component()["transformer"] < 1e-5


def test_bake_onto_an_sdxl_fp8_checkpoint(tmp_path: Path) -> None:
    from lorakit.tools.checkpoint import to_checkpoint
    from tests.factories import make_kohya_lora, tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline()
    sd = {k: v.to(torch.float8_e4m3fn) if k.startswith("model.diffusion_model.") and v.dim() in (2, 4) else v
          for k, v in to_checkpoint(pipe, "sdxl").items()}
    src, out = tmp_path / "xl-fp8.safetensors", tmp_path / "xl-baked.safetensors"
    save_file(sd, src)
    some = make_kohya_lora({"unet": pipe.unet}, lambda p: None if ".up_blocks." in p else "locon-tucker")
    save_file(some, tmp_path / "locon.safetensors")
    configs = {"unet": dict(pipe.unet.config), "vae": dict(pipe.vae.config), "text_encoder":
               pipe.text_encoder.config.to_dict(), "text_encoder_2": pipe.text_encoder_2.config.to_dict()}

    def unet(path: Path) -> torch.nn.Module:
        return place_model(load_single_file(path, configs, dtype=C), torch.device("cpu"), C).pipe.unet

    base = unet(src)
    with apply_loras({"unet": base}, [(tmp_path / "locon.safetensors", 0.7)]):
        want = {n: vars(m)["forward"].weight() for n, m in base.named_modules() if "forward" in vars(m)}
    assert want
    bake(src, [f"{tmp_path / 'locon.safetensors'}:0.7"], out, _options(configs))
    baked = dict(unet(out).named_modules())
    assert all(not is_quantized(baked[n]) and torch.equal(weight_values(baked[n]), w) for n, w in want.items())
    assert any(is_quantized(m) for m in baked.values())


def _options(configs: dict[str, dict[str, object]]) -> object:
    from lorakit.tools.bake import BakeOptions

    return BakeOptions(configs=configs)


def test_packed_bases_are_refused_by_name_and_requant_takes_gguf_only(fp8_base: tuple[Path, Path, Path],
                                                                      tmp_path: Path) -> None:
    from lorakit.tools.bake import BakeOptions

    d, lora, _ = fp8_base
    with pytest.raises(ToolError, match="--requant writes a GGUF of the base's own quantization types"):
        bake(d / "fp8-plain.safetensors", [str(lora)], tmp_path / "out.gguf", BakeOptions(requant=True))
    sd = load_file(d / "fp8-plain.safetensors")[0]
    key = "model.diffusion_model.double_blocks.0.img_attn.proj.weight"
    sd[key] = torch.zeros(sd[key].shape, dtype=torch.uint8)  # packed integers, not values
    save_file(sd, tmp_path / "nf4ish.safetensors")
    with pytest.raises(ToolError, match=f"{key} is torch.uint8: packed weights"):
        extract(d / "fp8-plain.safetensors", tmp_path / "nf4ish.safetensors", tmp_path / "y.safetensors",
                ExtractOptions(components=("transformer",)))
