"""FLUX.1 control LoRAs (BFL's Canny/Depth LoRAs, R8): ``img_in`` reads twice the latent channels, so the transformer's
``x_embedder`` is widened while such a LoRA is applied (zero-padded, config ``in_channels`` set) and put back exactly
after; the control image goes through diffusers' FluxControlPipeline."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lorakit import apply_loras, restore
from lorakit.errors import IncompatibleLora, LorakitError
from lorakit.files.io import save_file
from lorakit.generate.pipeline import Generator, Request
from lorakit.library import Library
from lorakit.lora_model import lora_from_state_dict
from lorakit.models.loading import load_model
from tests.factories import adapter_tensors
from tests.flux_factories import H, tiny_flux_pipeline


def control_lora(seed: int = 0, rank: int = 4) -> dict[str, torch.Tensor]:
    """BFL's control-LoRA layout at tiny size: img_in reads 8 (4 latent + 4 control) channels, biases, a norm scale."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.3  # noqa: E731
    return {"img_in.lora_A.weight": r(rank, 8), "img_in.lora_B.weight": r(H, rank), "img_in.lora_B.bias": r(H),
            "double_blocks.0.img_attn.qkv.lora_A.weight": r(rank, H),
            "double_blocks.0.img_attn.qkv.lora_B.weight": r(3 * H, rank),
            "double_blocks.0.img_attn.qkv.lora_B.bias": r(3 * H),
            "double_blocks.1.img_attn.norm.query_norm.scale": torch.rand(16, generator=g) + 0.5}


@pytest.fixture(scope="module")
def gen(tmp_path_factory: pytest.TempPathFactory) -> Generator:
    root = tmp_path_factory.mktemp("control")
    tiny_flux_pipeline().save_pretrained(root / "flux")  # type: ignore[attr-defined]
    (root / "loras").mkdir()
    save_file(control_lora(), root / "loras" / "canny.safetensors")
    t = adapter_tensors("lora", (H, 4), 4, torch.Generator().manual_seed(3))
    save_file({f"lora_unet_img_in.{k}": v * 10 if k == "lora_up.weight" else v for k, v in t.items()},
              root / "loras" / "plain.safetensors")
    model = load_model(str(root / "flux"), device="cpu", dtype="fp32")
    return Generator(model, Library([root / "loras"], index=root / "i.sqlite3"))


def _control() -> object:
    from PIL import Image

    image = Image.new("RGB", (64, 64), (0, 0, 0))
    image.paste((255, 255, 255), (16, 16, 48, 48))
    return image


def test_control_lora_widens_the_input_while_applied_and_restores_it_exactly(gen: Generator) -> None:
    tr = gen.model.pipe.transformer
    x_embedder = tr.x_embedder
    original = x_embedder.weight
    lora = lora_from_state_dict(control_lora(), {})
    with apply_loras(gen.model.pipe, [(lora, 0.8)]):
        a = lora.layers["transformer.x_embedder"]
        assert tr.config.in_channels == 8 and x_embedder.in_features == 8
        want = torch.cat([original.detach(), torch.zeros(H, 4)], dim=1) + a.delta(torch.zeros(H, 8), 0.8)
        assert torch.allclose(x_embedder.weight, want, atol=1e-6)
    assert x_embedder.weight is original and tr.config.in_channels == 4 and x_embedder.in_features == 4


def test_plain_lora_beside_a_control_lora_reads_the_original_inputs(gen: Generator) -> None:
    tr = gen.model.pipe.transformer
    before = tr.x_embedder.weight.detach().clone()
    control = lora_from_state_dict(control_lora(), {})
    t = adapter_tensors("lora", (H, 4), 4, torch.Generator().manual_seed(4))
    plain = lora_from_state_dict({f"lora_unet_img_in.{k}": v for k, v in t.items()}, {})
    with apply_loras(gen.model.pipe, [(control, 1.0), (plain, 1.0)]):
        d_plain = t["alpha"] / 4 * t["lora_up.weight"] @ t["lora_down.weight"]
        d_control = control.layers["transformer.x_embedder"].delta(torch.zeros(H, 8), 1.0)
        want = torch.cat([before + d_plain, torch.zeros(H, 4)], dim=1) + d_control
        assert torch.allclose(tr.x_embedder.weight, want, atol=1e-5)
    with apply_loras(gen.model.pipe, [(plain, 1.0)]):  # switching to a set without a control LoRA narrows it again
        assert tr.config.in_channels == 4 and tr.x_embedder.weight.shape == (H, 4)
    restore(gen.model.pipe)
    lokr = lora_from_state_dict({f"lora_unet_img_in.{k}": v for k, v in
                                 adapter_tensors("lokr", (H, 4), 2, torch.Generator().manual_seed(5)).items()}, {})
    with pytest.raises(IncompatibleLora, match="cannot share the widened input layer"):
        apply_loras(gen.model.pipe, [(control, 1.0), (lokr, 1.0)])
    assert torch.equal(tr.x_embedder.weight, before) and tr.config.in_channels == 4


def test_generation_with_a_control_image_equals_diffusers_control_pipeline(gen: Generator) -> None:
    from diffusers import FluxControlPipeline

    req = Request("a cat <lora:canny:0.8>", steps=2, width=64, height=64, seed=7, control=_control())
    ours = np.asarray(gen(req).images[0], dtype=np.int16)
    gen.close()
    # the reference: the same weights, widened by hand, sampled by diffusers' control pipeline
    pipe = gen.model.pipe
    tr = pipe.transformer
    before = tr.x_embedder.weight
    tr.x_embedder.weight = torch.nn.Parameter(torch.cat([before.detach(), torch.zeros(H, 4)], dim=1))
    tr.register_to_config(in_channels=8)
    try:
        apply_loras(pipe, [(lora_from_state_dict(control_lora(), {}), 0.8)])
        names = ("scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "transformer")
        ref_pipe = FluxControlPipeline(**{k: pipe.components[k] for k in names})
        embeds, pooled, _ = pipe.encode_prompt("a cat", "a cat", max_sequence_length=512)
        image = ref_pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, control_image=_control(), width=64,
                         height=64, num_inference_steps=2, guidance_scale=3.5,
                         generator=[torch.Generator().manual_seed(7)]).images[0]
    finally:
        restore(pipe)
        tr.x_embedder.weight = before
        tr.register_to_config(in_channels=4)
    assert np.abs(ours - np.asarray(image, dtype=np.int16)).max() <= 1


def test_control_image_and_lora_go_together(gen: Generator) -> None:
    with pytest.raises(LorakitError, match="needs a control image"):
        gen(Request("a cat <lora:canny:1>", steps=2, width=64, height=64, seed=1))
    with pytest.raises(LorakitError, match="needs a FLUX.1 control LoRA"):
        gen(Request("a cat <lora:plain:1>", steps=2, width=64, height=64, seed=1, control=_control()))
    assert gen.model.pipe.transformer.config.in_channels == 4


def test_cli_control_image(gen: Generator, tmp_path: Path) -> None:
    from lorakit.cli import main

    control = tmp_path / "edges.png"
    _control().save(control)  # type: ignore[attr-defined]
    out = tmp_path / "out.png"
    loras = gen.index.dirs[0]  # type: ignore[attr-defined]
    rc = main(["generate", "a cat <lora:canny:0.8>", "--model", str(loras.parent / "flux"), "--lora-dir",
               str(loras), "--control-image", str(control), "--steps", "2", "-W", "64", "-H", "64",
               "--seed", "1", "-o", str(out), "--device", "cpu"])
    assert rc == 0 and out.is_file()
