"""SD/SDXL GGUF UNet single files (ComfyUI-GGUF's layout, written with the ``gguf`` package: LDM names, tensors
reshaped to rows of 256 with ``comfy.gguf.orig_shape``) on the tiny SDXL: the UNet keeps its GGUF blocks — Linears
as diffusers' ``GGUFLinear`` (blocks crossing rows: ``GGUFShapedLinear``), convolutions as ``GGUFConv2d`` — and the
rest comes from the SDXL folder (``--components``). Every patched layer is bit for bit
``F.conv2d/F.linear(x, round_c(fp32(dq) + ΣΔW))``; strength 0 is the unpatched layer; restore keeps every stored
byte; bad files are ModelErrors naming file and tensor."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lorakit import apply_loras
from lorakit.errors import ModelError
from lorakit.lora_model import lora_from_state_dict
from lorakit.models.loading import load_model
from lorakit.models.sd_gguf import build_unet, unet_tensors
from lorakit.quant.files import read_gguf
from lorakit.quant.layers import GGUFConv2d, GGUFShapedLinear, dq, is_quantized
from tests.factories import make_kohya_lora, tiny_sdxl_pipeline
from tests.sd_gguf_factories import PREFIX, unet_ldm_state, write_unet_gguf
from tests.test_quant import _reference

C = torch.bfloat16
ERROR = {"Q8_0": 0.01, "Q5_1": 0.05, "Q4_0": 0.15}  # dq vs the dense weight, relative to its largest value


@pytest.fixture(scope="module")
def pipe() -> object:
    return tiny_sdxl_pipeline()


@pytest.fixture(scope="module")
def ldm(pipe: object) -> dict[str, torch.Tensor]:
    return unet_ldm_state(pipe)


def _stored(module: torch.nn.Module) -> bytes:
    raw = module.weight.as_tensor()  # type: ignore[operator]
    return hashlib.sha256(raw.contiguous().numpy().tobytes()).digest()


@pytest.mark.parametrize("qtype, prefix, arch", [("Q8_0", "", "sdxl"), ("Q5_1", PREFIX, None)])
def test_gguf_unet_loads_with_its_blocks_and_the_folders_other_parts(
        pipe: object, ldm: dict[str, torch.Tensor], tiny_sdxl_dir: Path, tmp_path: Path, qtype: str, prefix: str,
        arch: str | None) -> None:
    path = tmp_path / f"xl-{qtype}.gguf"
    types = write_unet_gguf(path, ldm, qtype, arch=arch, prefix=prefix)
    model = load_model(str(path), device="cpu", dtype="bf16", components=str(tiny_sdxl_dir))
    assert model.arch == "sdxl" and type(model.pipe).__name__ == "StableDiffusionXLPipeline"
    unet = model.pipe.unet
    dense = dict(pipe.unet.named_modules())  # type: ignore[attr-defined]
    quantized = {n: m for n, m in unet.named_modules() if is_quantized(m)}
    assert len(quantized) == sum(t == qtype for t in types.values())  # every quantized tensor is a kept weight
    kinds = {type(m).__name__ for m in quantized.values()}
    assert kinds == {"GGUFLinear", "GGUFConv2d", "GGUFShapedLinear"}  # add_embedding's 80 inputs: blocks cross rows
    for name, module in quantized.items():
        want = dense[name].weight.detach().float()
        assert dq(module).shape == want.shape and dq(module).dtype == C, name
        assert (dq(module).float() - want).abs().max() <= ERROR[qtype] * want.abs().max(), name
    assert type(unet.conv_in) is torch.nn.Conv2d and unet.conv_in.weight.dtype == C  # an F16 tensor: dense
    conv = unet.down_blocks[0].resnets[0].conv1
    raw = next(t for t in read_gguf(path).tensors.items() if t[0] == f"{prefix}input_blocks.1.0.in_layers.2.weight")
    assert isinstance(conv, GGUFConv2d) and torch.equal(conv.weight.as_tensor().flatten(), raw[1].as_tensor().flatten())
    assert torch.equal(model.pipe.text_encoder_2.text_model.final_layer_norm.weight.float(),  # type: ignore[attr-defined]
                       pipe.text_encoder_2.text_model.final_layer_norm.weight.to(C).float())  # type: ignore[attr-defined]


def _unet(path: Path, pipe: object) -> torch.nn.Module:
    return build_unet(unet_tensors(read_gguf(path).tensors), dict(pipe.unet.config), path, C)  # type: ignore[attr-defined]


def _input(module: torch.nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    if isinstance(module, torch.nn.Conv2d):
        return torch.randn(1, module.in_channels, 6, 6, generator=g).to(C)
    return torch.randn(2, 3, module.in_features, generator=g).to(C)  # type: ignore[arg-type]


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_K"])
def test_every_patched_gguf_layer_is_the_exact_merge(pipe: object, ldm: dict[str, torch.Tensor], tmp_path: Path,
                                                     qtype: str) -> None:
    """LoRA on Linears + LoCon on convolutions, LoCon with a Tucker core, LoHa+DoRA (reads W through dq), LoKr."""
    path = tmp_path / f"xl-{qtype}.gguf"
    write_unet_gguf(path, ldm, qtype)
    unet = _unet(path, pipe)
    comps = {"unet": unet}
    quantized = {n: m for n, m in unet.named_modules() if is_quantized(m)}
    assert any(isinstance(m, GGUFConv2d) for m in quantized.values())
    assert qtype == "Q4_0" or sum(isinstance(m, GGUFShapedLinear) for m in quantized.values()) > 20
    stored = {n: _stored(m) for n, m in quantized.items()}
    plain = {n: m(_input(m)) for n, m in quantized.items()}
    dense = {"unet": pipe.unet}  # type: ignore[attr-defined]
    for seed, (kind, m) in enumerate([("lora", 0.8), ("locon-tucker", -0.6), ("doha", 1.0), ("lokr", 0.7)]):
        lora = lora_from_state_dict(make_kohya_lora(dense, kind, seed=seed), {}, name=kind)
        with apply_loras(comps, [(lora, m)]):
            for name, module in quantized.items():
                ref = _reference(module, [(lora.layers[f"unet.{name}"], m)], _input(module))
                assert torch.equal(module(_input(module)), ref), (kind, name)
                assert not torch.equal(ref, plain[name]), (kind, name)  # the layer took its change
        if kind in ("lora", "locon-tucker"):  # hooks mode: the side branch q(x) + m·s·up(down(x)), within rounding
            with apply_loras(comps, [(lora, m)], mode="hooks"):
                for name, module in quantized.items():
                    ref = _reference(module, [(lora.layers[f"unet.{name}"], m)], _input(module)).float()
                    off = (module(_input(module)).float() - ref).abs().max()
                    assert off <= 2 ** -6 * ref.abs().max(), (kind, name)  # a few bf16 ulps of the output
        with apply_loras(comps, [(lora, 0.0)]):
            assert all(torch.equal(module(_input(module)), plain[n]) for n, module in quantized.items()), kind
    assert all(_stored(m) == stored[n] for n, m in quantized.items())
    assert all(torch.equal(m(_input(m)), plain[n]) for n, m in quantized.items())


def test_generate_on_a_gguf_unet_with_a_lora(pipe: object, ldm: dict[str, torch.Tensor], tiny_sdxl_dir: Path,
                                             tmp_path: Path) -> None:
    from PIL import Image

    from lorakit.cli import main
    from lorakit.files.io import save_file

    path = tmp_path / "xl-Q8_0.gguf"
    write_unet_gguf(path, ldm, "Q8_0")
    loras = tmp_path / "loras"
    loras.mkdir()
    save_file(make_kohya_lora({"unet": pipe.unet}, "lora", seed=3), loras / "style.safetensors")  # type: ignore[attr-defined]
    out = tmp_path / "x.png"
    rc = main(["generate", "a cat <lora:style:0.8>", "--model", str(path), "--components", str(tiny_sdxl_dir),
               "--lora-dir", str(loras), "--steps", "2", "-W", "64", "-H", "64", "--seed", "1", "-o", str(out),
               "--device", "cpu", "--dtype", "bf16"])
    assert rc == 0
    image = Image.open(out)
    assert image.size == (64, 64) and "style" in image.text["parameters"]
    assert np.asarray(image).std() > 1
    _mixed_batch(path, tiny_sdxl_dir, loras, tmp_path)


def _mixed_batch(path: Path, components: Path, loras: Path, tmp_path: Path) -> None:
    """A batch of a LoRA request and a plain one (per-sample side branches on the GGUF layers): the plain sample is
    the plain image, the styled one differs, and no stored byte changed."""
    from lorakit.generate.pipeline import Generator, Request
    from lorakit.library import Library

    model = load_model(str(path), device="cpu", dtype="bf16", components=str(components))
    quantized = [m for m in model.pipe.unet.modules() if is_quantized(m)]
    stored = [_stored(m) for m in quantized]
    gen = Generator(model, Library([loras], index=tmp_path / "i.sqlite3"))
    req = dict(steps=2, width=64, height=64, seed=1)
    plain = np.asarray(gen(Request("a cat", **req)).images[0], dtype=np.int16)  # type: ignore[arg-type]
    batched = gen.run_batch([Request("a cat <lora:style:1>", **req), Request("a cat", **req)])  # type: ignore[arg-type]
    styled, same = (np.asarray(r.images[0], dtype=np.int16) for r in batched)  # type: ignore[union-attr]
    assert np.abs(same - plain).max() <= 2 and np.abs(styled - plain).max() > 8
    gen.close()
    assert [_stored(m) for m in quantized] == stored


def test_diffusers_named_gguf_unet(pipe: object, tmp_path: Path) -> None:
    """A UNet in diffusers' names (ComfyUI-GGUF converts those too): no renaming, the same layers."""
    path = tmp_path / "xl-diffusers-Q8_0.gguf"
    write_unet_gguf(path, dict(pipe.unet.state_dict()), "Q8_0")  # type: ignore[attr-defined]
    unet = _unet(path, pipe)
    dense = dict(pipe.unet.named_modules())  # type: ignore[attr-defined]
    quantized = {n: m for n, m in unet.named_modules() if is_quantized(m)}
    assert any(isinstance(m, GGUFConv2d) for m in quantized.values()) and len(quantized) > 100
    for name, module in quantized.items():
        want = dense[name].weight.detach().float()
        assert (dq(module).float() - want).abs().max() <= ERROR["Q8_0"] * want.abs().max(), name


def _with_type(path: Path, name: str, type_id: int) -> bytes:
    """The file's bytes with tensor ``name``'s GGML type id replaced (the u32 after its name and dims)."""
    data = bytearray(path.read_bytes())
    raw = name.encode()
    at = data.index(len(raw).to_bytes(8, "little") + raw) + 8 + len(raw)
    dims = int.from_bytes(data[at:at + 4], "little")
    at += 4 + 8 * dims
    data[at:at + 4] = type_id.to_bytes(4, "little")
    return bytes(data)


def test_bad_gguf_unets_are_model_errors(ldm: dict[str, torch.Tensor], tiny_sdxl_dir: Path,
                                         tmp_path: Path) -> None:
    name = "input_blocks.1.0.in_layers.2.weight"  # a 3×3 convolution, reshaped
    good = tmp_path / "good.gguf"
    write_unet_gguf(good, ldm, "Q8_0")

    def load(p: Path, components: Path | None = tiny_sdxl_dir) -> None:
        load_model(str(p), device="cpu", components=str(components) if components else None)

    cases = {"count.gguf": ({name: [32, 32, 3, 2]}, f"tensor {name} holds 9216 values"),
             "shape.gguf": ({name: [32, 32, 9, 1]}, "conv1.weight is \\(32, 32, 9, 1\\), expected \\(32, 32, 3, 3\\)")}
    for file, (shapes, message) in cases.items():
        write_unet_gguf(tmp_path / file, ldm, "Q8_0", shapes=shapes)
        with pytest.raises(ModelError, match=f"{file}.*{message}"):
            load(tmp_path / file)
    (tmp_path / "cut.gguf").write_bytes(good.read_bytes()[:-3000])
    (tmp_path / "type.gguf").write_bytes(_with_type(good, name, 99))
    (tmp_path / "tq.gguf").write_bytes(_with_type(good, name, 34))  # TQ1_0: a real type lorakit cannot dequantize
    for file, message in [("cut.gguf", "not a readable GGUF file"), ("type.gguf", "not a readable GGUF file"),
                          ("tq.gguf", f"tensor {name} is TQ1_0")]:
        with pytest.raises(ModelError, match=f"{file}: {message}"):
            load(tmp_path / file)
    with pytest.raises(ModelError, match="good.gguf: a GGUF UNet carries no text encoders.*--components"):
        load(good, None)
    sd1 = tmp_path / "sd1"
    sd1.mkdir()
    (sd1 / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ModelError, match="a Stable Diffusion XL UNet; .*sd1 is a StableDiffusionPipeline folder"):
        load(good, sd1)


def test_inspect_says_a_gguf_unets_family_and_quantization(ldm: dict[str, torch.Tensor], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from lorakit.cli import main

    path = tmp_path / "xl-Q4_0.gguf"
    types = write_unet_gguf(path, ldm, "Q4_0")
    assert main(["inspect", "--json", str(path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "Stable Diffusion XL" and info["gguf_architecture"] == "sdxl"
    assert info["layout"] == "diffusers/LDM"
    from lorakit.models.loading import dit_of_path

    assert dit_of_path(path) is None  # Stable Diffusion: fp16 on a GPU with --dtype auto
    assert info["quantization"] == {t: list(types.values()).count(t) for t in set(types.values())}


def test_requant_opt_in_on_gguf_convolutions_reports_its_loss_and_restores(pipe: object, ldm: dict[str, torch.Tensor],
                                                                           tmp_path: Path) -> None:
    from lorakit import restore

    path = tmp_path / "xl-Q8_0.gguf"
    write_unet_gguf(path, ldm, "Q8_0")
    unet = _unet(path, pipe)
    quantized = {n: m for n, m in unet.named_modules() if is_quantized(m)}
    params = {n: m.weight for n, m in quantized.items()}
    stored = {n: _stored(m) for n, m in quantized.items()}
    before = {n: dq(m).float() for n, m in quantized.items()}
    lora = lora_from_state_dict(make_kohya_lora({"unet": pipe.unet}, "lora", seed=4), {})  # type: ignore[attr-defined]
    report = apply_loras({"unet": unet}, [(lora, 1.0)], mode="requant").patcher.requantized.report
    assert set(report) == {f"unet.{n}" for n in quantized}
    for name, module in quantized.items():
        w32 = before[name]
        delta = (w32 + lora.layers[f"unet.{name}"].delta(w32, 1.0)).to(C).float() - w32
        effective = dq(module).float() - w32  # the requantized blocks, read as the layer reads them
        kept, error = report[f"unet.{name}"]
        assert error == pytest.approx(float((effective - delta).norm() / delta.norm()), rel=1e-4, abs=1e-6), name
        assert kept == pytest.approx(float((effective * delta).sum() / (delta * delta).sum()), rel=1e-4, abs=1e-6)
    restore({"unet": unet})
    assert all(m.weight is params[n] and _stored(m) == stored[n] for n, m in quantized.items())


def test_sd1_gguf_unet_with_1x1_projection_convolutions(tiny_sdxl_dir: Path, tmp_path: Path) -> None:
    from tests.factories import tiny_sd1_pipeline

    sd1 = tiny_sd1_pipeline()
    folder = tmp_path / "sd1"
    sd1.save_pretrained(folder)  # type: ignore[attr-defined]
    path = tmp_path / "sd1-Q8_0.gguf"
    write_unet_gguf(path, unet_ldm_state(sd1), "Q8_0", arch="sd1")
    model = load_model(str(path), device="cpu", dtype="bf16", components=str(folder))
    assert type(model.pipe).__name__ == "StableDiffusionPipeline" and model.arch != "sdxl"
    proj = model.pipe.unet.down_blocks[0].attentions[0].proj_in
    assert isinstance(proj, GGUFConv2d) and proj.kernel_size == (1, 1)
    want = sd1.unet.down_blocks[0].attentions[0].proj_in.weight.detach().float()  # type: ignore[attr-defined]
    assert dq(proj).shape == want.shape and (dq(proj).float() - want).abs().max() <= 0.01 * want.abs().max()
    with pytest.raises(ModelError, match="a Stable Diffusion 1.x UNet; .* is a StableDiffusionXLPipeline folder"):
        load_model(str(path), device="cpu", components=str(tiny_sdxl_dir))


def test_a_training_network_on_a_gguf_unet_sees_its_layers_shapes_and_values(pipe: object,
                                                                            ldm: dict[str, torch.Tensor],
                                                                            tmp_path: Path) -> None:
    """``lorakit train --model unet.gguf`` starts from the layers' logical shapes and dequantized values (DoRA's
    magnitudes = dq's norms), never from the stored bytes."""
    from lorakit.train.network import Network, NetworkSpec, target_modules

    path = tmp_path / "xl-Q8_0.gguf"
    write_unet_gguf(path, ldm, "Q8_0")
    unet = _unet(path, pipe)
    spec = NetworkSpec(kind="dora", rank=2, alpha=1.0, train="unet")
    modules = target_modules({"unet": unet}, spec)
    network = Network(modules, spec, seed=0)
    quantized = [p for p, m in modules.items() if is_quantized(m)]
    assert any(isinstance(modules[p], GGUFConv2d) for p in quantized)
    for p in quantized:
        w = dq(modules[p]).float()
        down, up = network.leaves[p]["lora_down.weight"], network.leaves[p]["lora_up.weight"]
        assert (up.shape[0], down.shape[1]) == w.shape[:2], p
        magnitude = network.leaves[p]["dora_scale"].detach().flatten()
        assert torch.allclose(magnitude, w.flatten(1).norm(dim=1), rtol=1e-3) or \
            torch.allclose(magnitude, w.flatten(1).norm(dim=0), rtol=1e-3), p
