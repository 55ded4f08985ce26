"""``lorakit train`` on a tiny SD3 saved as a diffusers folder: kohya's SD3 network (one network per SAI module,
the fused ``qkv`` and the last block's swapped 2·h context adaLN included; CLIP-L, CLIP-G and T5), the training
forward equal to ``apply_loras`` of the written file, the file in SAI names with SD3 metadata, the loss going down
(the flow objective shared with FLUX.1), the CLI, and the flags SD3 refuses."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image, ImageDraw

import lorakit
from lorakit.errors import TrainingError
from lorakit.files.io import load_file
from lorakit.models.loading import BaseModel, load_model
from lorakit.train.config import TrainConfig
from lorakit.train.flow import FlowSpec
from lorakit.train.flux_loop import trainer_for
from lorakit.train.network import NetworkSpec
from lorakit.train.sd3_loop import SD3Trainer
from tests.sd3_factories import H, tiny_sd3_pipeline

SEQ = 16
SIZE = 64


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tinysd3train") / "tinysd3"
    tiny_sd3_pipeline().save_pretrained(path)  # type: ignore[attr-defined]
    return path


@pytest.fixture(scope="module")
def sd3(sd3_dir: Path) -> BaseModel:
    return load_model(str(sd3_dir), device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sd3data")
    for i, (colour, caption) in enumerate((((200, 30, 30), "a red disc"), ((30, 40, 200), "a blue square"))):
        im = Image.new("RGB", (SIZE, SIZE), (235, 235, 235))
        shape = ImageDraw.Draw(im).ellipse if i == 0 else ImageDraw.Draw(im).rectangle
        shape((12, 12, 52, 52), fill=colour)
        im.save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(caption)
    return folder


def _cfg(data: Path, out: Path, kind: str = "lora", net_kw: dict[str, object] | None = None,
         **kw: object) -> TrainConfig:
    spec = NetworkSpec(kind, rank=4, alpha=2.0, **(net_kw or {}))  # type: ignore[arg-type]
    kw.setdefault("steps", 3)
    kw.setdefault("lr", 1e-2)
    kw.setdefault("resolution", SIZE)
    flow = kw.pop("flow", FlowSpec(max_sequence_length=SEQ))
    return TrainConfig(data, out, network=spec, flow=flow, **kw)  # type: ignore[arg-type]


def _outputs(pipe: Any) -> tuple[torch.Tensor, ...]:
    """The prompt embeddings and pooled projection (all three encoders) and the transformer's prediction."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 8, 8, generator=gen)
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt("a red disc", "a red disc", "a red disc", device="cpu",
                                                  do_classifier_free_guidance=False, max_sequence_length=SEQ)
        pred = pipe.transformer(hidden_states=x, encoder_hidden_states=embeds, pooled_projections=pooled,
                                timestep=torch.tensor([600.0]), return_dict=False)[0]
    return embeds, pooled, pred


def _check_applies_as_trained(trainer: SD3Trainer, out: Path) -> None:
    pipe = trainer.model.pipe
    bare = _outputs(pipe)
    trainer.net.attach()
    try:
        trained = _outputs(pipe)
    finally:
        trainer.net.detach()
    with lorakit.apply_loras(pipe, [(out, 1.0)]):
        applied = _outputs(pipe)
    assert all(not torch.allclose(t, b) for t, b in zip(trained, bare))  # encoders and transformer changed
    for got, want in zip(applied, trained):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(_outputs(pipe), bare))  # restored


@pytest.mark.parametrize("kind", ["lora", "lokr"])
def test_training_forward_is_what_the_file_applies(kind: str, sd3: BaseModel, data: Path, tmp_path: Path) -> None:
    out = tmp_path / f"{kind}.safetensors"
    trainer = SD3Trainer(_cfg(data, out, kind, net_kw={"train": "both", "t5": True}, save_dtype="fp32"), sd3)
    trainer.run(progress=False)
    sd, meta = load_file(out)
    if kind == "lora":
        assert sd["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight"].shape == (3 * H, 4)
        assert sd["lora_unet_joint_blocks_1_context_block_adaLN_modulation_1.lora_up.weight"].shape == (2 * H, 4)
        assert meta["ss_network_module"] == "networks.lora_sd3"
    assert not any("transformer_blocks" in k for k in sd)  # SAI names only
    assert "lora_unet_joint_blocks_1_context_block_mlp_fc1.lora_down.weight" not in sd  # the last block has none
    assert {k.split("_", 2)[1] for k in sd} == {"unet", "te1", "te2", "te3"}
    assert (meta["modelspec.architecture"], meta["ss_base_model_version"]) == ("stable-diffusion-3-medium/lora",
                                                                               "sd3-medium")
    lora = lorakit.load_lora(out)
    assert (lora.arch, lora.dialect) == ("sd3-medium", "kohya")
    _check_applies_as_trained(trainer, out)


def test_loss_goes_down_and_the_cli_trains(sd3: BaseModel, sd3_dir: Path, data: Path, tmp_path: Path) -> None:
    trainer = trainer_for(_cfg(data, tmp_path / "l.safetensors", steps=10, lr=2e-2, net_kw={"train": "unet"}), sd3)
    assert isinstance(trainer, SD3Trainer)
    trainer.run(progress=False)
    assert all(math.isfinite(v) for v in trainer.losses) and len(trainer.losses) == 10
    assert sum(trainer.losses[-3:]) < sum(trainer.losses[:3]), trainer.losses
    from lorakit.cli import main

    out = tmp_path / "cli.safetensors"
    rc = main(["train", str(data), "--model", str(sd3_dir), "-o", str(out), "--steps", "2", "--rank", "2",
               "--resolution", str(SIZE), "--device", "cpu", "--max-sequence-length", str(SEQ), "--no-preview"])
    assert rc == 0 and lorakit.load_lora(out).arch == "sd3-medium"


@pytest.mark.parametrize("kw,match", [({"min_snr_gamma": 5.0}, "--min-snr-gamma"),
                                      ({"flow": FlowSpec(guidance=2.0)}, "--guidance"),
                                      ({"network": NetworkSpec("lora", t5=True, train="unet")}, "--train-t5")])
def test_flags_that_do_not_apply_are_refused(sd3: BaseModel, data: Path, tmp_path: Path, kw: dict[str, Any],
                                             match: str) -> None:
    network = kw.pop("network", None)
    cfg = _cfg(data, tmp_path / "x.safetensors", **kw)
    if network is not None:
        cfg.network = network
    with pytest.raises(TrainingError, match=match):
        SD3Trainer(cfg, sd3)
