"""Quantized FLUX.1 files, offline: GGUF (BFL-keyed as city96 ships them, and diffusers-keyed) written with the
``gguf`` package, fp8 safetensors (unscaled, ComfyUI's legacy ``scaled_fp8`` and new ``comfy_quant`` layouts); the
rest of the pipeline from a tiny FLUX.1 folder (``--components``). Bad files are ModelErrors, nothing half-loaded;
generation with LoRAs on them."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lorakit.errors import ModelError
from lorakit.files.io import save_file
from lorakit.generate.pipeline import Generator, Request
from lorakit.library import Library
from lorakit.models.loading import load_model, load_single_file, place_model
from lorakit import apply_loras
from lorakit.lora_model import lora_from_state_dict
from lorakit.quant.layers import Fp8Linear, dq, is_quantized
from tests.flux_factories import bfl_lora, bfl_state, fp8_state, kohya_keys, tiny_flux_pipeline


@pytest.fixture(scope="module")
def flux_dir(tiny_flux_dir: Path) -> Path:
    return tiny_flux_dir


@pytest.fixture(scope="module")
def dense(flux_dir: Path) -> object:
    return load_model(str(flux_dir), device="cpu", dtype="bf16")


def write_gguf(path: Path, tensors: dict[str, torch.Tensor], qtype: str, arch: str = "flux") -> None:
    """city96's layout: 2-D weights whose rows hold whole blocks in ``qtype``, the rest F32."""
    import gguf

    kind = gguf.GGMLQuantizationType[qtype]
    block = gguf.GGML_QUANT_SIZES[kind][0]
    writer = gguf.GGUFWriter(path=None, arch=arch)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for name, t in tensors.items():
        arr = t.detach().float().numpy()
        if arr.ndim == 2 and arr.shape[1] % block == 0:
            writer.add_tensor(name, gguf.quants.quantize(arr, kind), raw_dtype=kind)
        else:
            writer.add_tensor(name, arr)
    writer.write_header_to_file(path=str(path))
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("keys", ["bfl", "diffusers"])
def test_gguf_bfl_and_diffusers_keyed_load_the_same_blocks(dense: object, flux_dir: Path, tmp_path: Path,
                                                           keys: str) -> None:
    pipe = dense.pipe  # type: ignore[attr-defined]
    tensors = bfl_state(pipe.transformer) if keys == "bfl" else dict(pipe.transformer.state_dict())
    path = tmp_path / f"flux-{keys}-Q8_0.gguf"
    write_gguf(path, tensors, "Q8_0")
    model = load_model(str(path), device="cpu", dtype="bf16", components=str(flux_dir))
    tr = model.pipe.transformer
    quantized = {n: m for n, m in tr.named_modules() if is_quantized(m)}
    assert len(quantized) > 40 and model.arch == "flux1"
    reference = dict(pipe.transformer.named_modules())
    for name, module in quantized.items():  # dequantized blocks = the dense weights within Q8_0's error
        want = reference[name].weight.detach().float()
        assert (dq(module).float() - want).abs().max() <= 0.02 * want.abs().max() + 1e-3, name
    if keys == "bfl":  # the row split on raw blocks is exact: the same bytes as the diffusers-keyed file's
        other = tmp_path / "flux-diffusers-Q8_0.gguf"
        write_gguf(other, dict(pipe.transformer.state_dict()), "Q8_0")
        twin = dict(load_model(str(other), device="cpu", dtype="bf16", components=str(flux_dir))
                    .pipe.transformer.named_parameters())
        for name, p in tr.named_parameters():
            a = p.as_tensor() if hasattr(p, "as_tensor") else p
            b = twin[name].as_tensor() if hasattr(twin[name], "as_tensor") else twin[name]
            assert torch.equal(a, b), name


def test_generation_with_loras_on_a_gguf_base(dense: object, flux_dir: Path, tmp_path: Path) -> None:
    pipe = dense.pipe  # type: ignore[attr-defined]
    path = tmp_path / "flux-Q4_0.gguf"
    write_gguf(path, bfl_state(pipe.transformer), "Q4_0")
    model = load_model(str(path), device="cpu", dtype="bf16", components=str(flux_dir))
    loras = tmp_path / "loras"
    loras.mkdir()
    layers = bfl_lora(pipe.transformer, "lora", seed=3)
    save_file(kohya_keys({b: {k: v * 20 if k == "lora_up.weight" else v for k, v in ls.items()}
                          for b, ls in layers.items()}), loras / "style.safetensors")
    gen = Generator(model, Library([loras], index=tmp_path / "i.sqlite3"))
    req = dict(steps=2, width=64, height=64, seed=1)
    stored = {n: p.as_tensor().clone() for n, p in model.pipe.transformer.named_parameters() if hasattr(p, "as_tensor")}
    plain = np.asarray(gen(Request("a cat", **req)).images[0], dtype=np.int16)  # type: ignore[arg-type]
    styled = np.asarray(gen(Request("a cat <lora:style:1>", **req)).images[0], dtype=np.int16)  # type: ignore[arg-type]
    assert np.abs(styled - plain).max() > 8
    batched = gen.run_batch([Request("a cat <lora:style:1>", **req), Request("a cat", **req)])  # type: ignore[arg-type]
    assert np.abs(np.asarray(batched[1].images[0], dtype=np.int16) - plain).max() <= 2  # type: ignore[union-attr]
    gen.close()
    assert all(torch.equal(p.as_tensor(), stored[n]) for n, p in model.pipe.transformer.named_parameters()
               if hasattr(p, "as_tensor"))
    assert np.array_equal(np.asarray(gen(Request("a cat", **req)).images[0], dtype=np.int16), plain)  # type: ignore[arg-type]


def _fp8_file(pipe: object, layout: str) -> dict[str, torch.Tensor]:
    """The tiny transformer's BFL weights as a ComfyUI fp8 file (``flux_factories.fp8_state``)."""
    return fp8_state(bfl_state(pipe.transformer), layout)  # type: ignore[attr-defined]


@pytest.mark.parametrize("layout", ["plain", "legacy", "new"])
def test_fp8_files_keep_fp8_storage_and_their_scales(dense: object, flux_dir: Path, tmp_path: Path,
                                                     layout: str) -> None:
    pipe = dense.pipe  # type: ignore[attr-defined]
    sd = _fp8_file(pipe, layout)
    path = tmp_path / f"flux-fp8-{layout}.safetensors"
    save_file(sd, path)
    model = load_model(str(path), device="cpu", dtype="bf16", components=str(flux_dir))
    fp8 = {n: m for n, m in model.pipe.transformer.named_modules() if isinstance(m, Fp8Linear)}
    assert fp8 and all(m.weight.dtype == torch.float8_e4m3fn for m in fp8.values())
    assert all((m.scale is not None) == (layout != "plain") for m in fp8.values())
    q = fp8["transformer_blocks.0.attn.to_k"]
    bfl = sd["model.diffusion_model.double_blocks.0.img_attn.qkv.weight"]
    rows = bfl[32:64].float() * (sd.get("model.diffusion_model.double_blocks.0.img_attn.qkv.scale_weight",
                                        sd.get("model.diffusion_model.double_blocks.0.img_attn.qkv.weight_scale",
                                               torch.tensor(1.0))).float())
    assert torch.equal(dq(q), rows.to(torch.bfloat16))  # the k rows of BFL's fused qkv, scaled by its scale


def test_bad_quantized_files_are_model_errors(dense: object, flux_dir: Path, tmp_path: Path) -> None:
    pipe = dense.pipe  # type: ignore[attr-defined]
    good = tmp_path / "good.gguf"
    write_gguf(good, bfl_state(pipe.transformer), "Q8_0")
    data = good.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 4000])
    with pytest.raises(ModelError, match="cut.gguf"):
        load_model(str(tmp_path / "cut.gguf"), device="cpu", components=str(flux_dir))
    odd = tmp_path / "tq.gguf"
    write_gguf(odd, bfl_state(pipe.transformer), "TQ1_0")
    with pytest.raises(ModelError, match="TQ1_0, which lorakit cannot dequantize"):
        load_model(str(odd), device="cpu", components=str(flux_dir))
    wrong = dict(bfl_state(pipe.transformer))
    wrong["double_blocks.0.img_attn.proj.weight"] = torch.zeros(32, 64)
    bad = tmp_path / "shape.gguf"
    write_gguf(bad, wrong, "Q8_0")
    with pytest.raises(ModelError, match="to_out.0.weight is \\(32, 64\\), expected \\(32, 32\\)"):
        load_model(str(bad), device="cpu", components=str(flux_dir))
    sd = _fp8_file(pipe, "new")
    sd["model.diffusion_model.double_blocks.0.img_attn.proj.comfy_quant"] = torch.tensor(
        list(b'{"format": "nvfp4"}'), dtype=torch.uint8)
    save_file(sd, tmp_path / "nvfp4.safetensors")
    with pytest.raises(ModelError, match="'nvfp4'"):
        load_model(str(tmp_path / "nvfp4.safetensors"), device="cpu", components=str(flux_dir))
    sd = _fp8_file(pipe, "legacy")
    sd["model.diffusion_model.double_blocks.0.img_attn.proj.scale_weight"] = torch.ones(3)
    save_file(sd, tmp_path / "scale.safetensors")
    with pytest.raises(ModelError, match="has 3 values; expected 1"):
        load_model(str(tmp_path / "scale.safetensors"), device="cpu", components=str(flux_dir))


def test_sdxl_fp8_checkpoint_keeps_fp8_unet_and_takes_loras_exactly(tmp_path: Path) -> None:
    """An A1111-style SDXL single file with fp8 UNet weights (Linears and convolutions): fp8 storage kept, a LoCon
    merged per forward bit for bit, images generated, every stored byte kept."""
    from lorakit.quant.layers import Fp8Conv2d
    from lorakit.tools.checkpoint import to_checkpoint
    from tests.factories import make_kohya_lora, tiny_sdxl_pipeline
    from tests.test_quant import _reference, _stored

    pipe = tiny_sdxl_pipeline()
    sd = to_checkpoint(pipe, "sdxl")
    sd = {k: v.to(torch.float8_e4m3fn) if k.startswith("model.diffusion_model.") and v.dim() in (2, 4) else v
          for k, v in sd.items()}
    path = tmp_path / "xl-fp8.safetensors"
    save_file(sd, path)
    configs = {"unet": dict(pipe.unet.config), "vae": dict(pipe.vae.config),  # the tiny model's, not SDXL's
               "text_encoder": pipe.text_encoder.config.to_dict(), "text_encoder_2": pipe.text_encoder_2.config.to_dict()}
    model = place_model(load_single_file(path, configs, dtype=torch.bfloat16), torch.device("cpu"), torch.bfloat16)
    unet = model.pipe.unet
    convs = [m for m in unet.modules() if isinstance(m, Fp8Conv2d)]
    linears = [m for m in unet.modules() if isinstance(m, Fp8Linear)]
    assert convs and linears
    stored = {id(m): _stored(m) for m in convs + linears}
    lora = lora_from_state_dict(make_kohya_lora({"unet": pipe.unet}, "locon-tucker"), {})
    comps = {"unet": unet}
    layer = unet.down_blocks[0].resnets[0].conv1
    x = torch.randn(1, layer.in_channels, 8, 8, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    with apply_loras(comps, [(lora, 0.8)]):
        path_ = "unet.down_blocks.0.resnets.0.conv1"
        assert torch.equal(layer(x), _reference(layer, [(lora.layers[path_], 0.8)], x))
    gen = Generator(model, Library([tmp_path], index=tmp_path / "i.sqlite3"))
    image = gen(Request("a cat", steps=2, width=64, height=64, seed=1)).images[0]
    assert image.size == (64, 64)
    assert all(_stored(m) == stored[id(m)] for m in convs + linears)


def test_inspect_says_what_a_model_file_is_and_its_quantization(dense: object, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    from lorakit.cli import main

    pipe = dense.pipe  # type: ignore[attr-defined]
    gguf_path = tmp_path / "flux-Q8_0.gguf"
    write_gguf(gguf_path, bfl_state(pipe.transformer), "Q8_0")
    fp8_path = tmp_path / "flux-fp8.safetensors"
    save_file(_fp8_file(pipe, "legacy"), fp8_path)
    from lorakit.models.loading import is_flux_path

    assert is_flux_path(gguf_path)  # so ``--dtype auto`` runs it in bf16 on a GPU, as FLUX.1 folders
    assert main(["inspect", "--json", str(gguf_path), str(fp8_path)]) == 0
    gguf_info, fp8_info = json.loads(capsys.readouterr().out)
    assert gguf_info["family"] == "FLUX.1" and gguf_info["layout"] == "BFL" and gguf_info["gguf_architecture"] == "flux"
    assert set(gguf_info["quantization"]) == {"Q8_0", "F32"}
    assert fp8_info["scaled_fp8"] is True and "float8_e4m3fn" in fp8_info["quantization"]
    assert main(["inspect", str(gguf_path)]) == 0
    out = capsys.readouterr().out
    assert "quantization  F32 ×" in out and "Q8_0 ×38" in out
