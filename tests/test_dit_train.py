"""``lorakit train`` on the tiny Chroma and Qwen-Image models (diffusers folders, offline): the flow loss falls on a
fixed batch; the file is in the dialect the field writes for the family (Chroma: kohya's FLUX.1 BFL layout with
``chroma`` metadata; Qwen-Image: musubi-tuner's ``lora_unet_`` model names), loads, is detected as its family,
applies as trained and exactly as an independent reference (hand-written module tables) says, changes the generated
image; resume is bitwise; the CLI trains; the flags a family does not take are refused."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import lorakit
from lorakit.errors import TrainingError
from lorakit.files.io import load_file
from lorakit.generate.pipeline import Generator, Request
from lorakit.library import Library
from lorakit.models.loading import BaseModel, load_model
from lorakit.train.chroma_loop import ChromaTrainer
from lorakit.train.config import TrainConfig
from lorakit.train.flow import FlowSpec
from lorakit.train.flow_loop import FlowTrainer
from lorakit.train.flux_loop import trainer_for
from lorakit.train.network import NetworkSpec
from lorakit.train.qwen_loop import QwenTrainer
from tests.chroma_factories import chroma_table
from tests.flux_factories import reference_deltas
from tests.qwen_factories import kohya_name, qwen_table, reference_delta

SIZE = 64
SEQ = 16  # Chroma's T5 tokens in these tests


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return draw_data(tmp_path_factory.mktemp("ditdata"))


def draw_data(folder: Path) -> Path:
    """Two 64-px pictures; captions of different lengths (Qwen-Image's embeddings keep their own)."""
    for i, (colour, caption) in enumerate((((200, 30, 30), "zq, a red disc"),
                                           ((30, 40, 200), "zq, a large blue square on a grey ground"))):
        im = Image.new("RGB", (SIZE, SIZE), (235, 235, 235))
        (ImageDraw.Draw(im).ellipse if i == 0 else ImageDraw.Draw(im).rectangle)((12, 12, 52, 52), fill=colour)
        im.save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(caption)
    return folder


@pytest.fixture(scope="module")
def chroma(tiny_chroma_dir: Path) -> BaseModel:
    return load_model(str(tiny_chroma_dir), device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def qwen(tiny_qwen_dir: Path) -> BaseModel:
    return load_model(str(tiny_qwen_dir), device="cpu", dtype="fp32")


def _cfg(data: Path, out: Path, kind: str = "lora", net_kw: dict[str, Any] | None = None, **kw: Any) -> TrainConfig:
    kw = {"steps": 6, "lr": 1e-2, "resolution": SIZE, "batch": 2, "save_dtype": "fp32", "preview": False, **kw}
    return TrainConfig(data, out, network=NetworkSpec(kind, rank=4, alpha=2.0, **(net_kw or {})), **kw)


def _eval_loss(trainer: FlowTrainer) -> float:
    """The loss of both pictures at fixed noise and σ (the same draws every call)."""
    state = trainer.gen.get_state()
    trainer.gen.manual_seed(1234)
    try:
        with torch.no_grad():
            return sum(float(trainer.loss([i, i])) for i in range(len(trainer.samples)))
    finally:
        trainer.gen.set_state(state)


def _hooked_loss(trainer: FlowTrainer) -> float:
    trainer.net.attach()
    try:
        return _eval_loss(trainer)
    finally:
        trainer.net.detach()


def _train_and_check(trainer: FlowTrainer, out: Path) -> dict[str, torch.Tensor]:
    """Trains; the fixed-batch loss falls; the file applied (fused) gives the loss the training hooks give, and
    the bare model's after restore. Returns the file's tensors."""
    bare = _eval_loss(trainer)
    before = _hooked_loss(trainer)
    trainer.run(progress=False)
    after = _hooked_loss(trainer)
    assert all(math.isfinite(v) for v in trainer.losses) and len(trainer.losses) == trainer.total
    assert before == pytest.approx(bare) and after < 0.9 * before, (before, after, trainer.losses)
    with lorakit.apply_loras(trainer.model.pipe, [(out, 1.0)]):
        assert _eval_loss(trainer) == pytest.approx(after, rel=1e-5)
    assert _eval_loss(trainer) == bare  # restored
    sd, _ = load_file(out)
    return sd


def _weight_changes(pipe: Any, out: Path, want: dict[str, torch.Tensor]) -> None:
    """``apply_loras(out)`` changes each transformer module by the reference's ΔW, and no other (a layer whose
    output the image never sees — Qwen-Image's last text stream — got no gradient: ΔW = 0, nothing changes)."""
    tr = pipe.transformer
    before = {n: p.detach().clone() for n, p in tr.named_parameters()}
    with lorakit.apply_loras(pipe, [(out, 1.0)]):
        changed = {n.removesuffix(".weight") for n, p in tr.named_parameters() if not torch.equal(p, before[n])}
        assert changed == {m for m, d in want.items() if d.abs().max() > 0} and len(changed) > len(want) // 2
        for module, delta in want.items():
            got = tr.get_submodule(module).weight.detach() - before[f"{module}.weight"]
            torch.testing.assert_close(got, delta, rtol=1e-4, atol=1e-6)


def _changes_the_image(model: BaseModel, out: Path, tmp_path: Path) -> None:
    """The library shows the file's base and trained trigger; the LoRA's tag changes the generated picture."""
    library = Library([out.parent], index=tmp_path / "index.sqlite3")
    entry = library.resolve(out.stem)
    assert (entry.base, entry.trigger_phrases) == (model.arch, ["zq"])
    gen = Generator(model, library)
    try:
        def draw(prompt: str) -> np.ndarray:
            req = Request(prompt, steps=2, width=SIZE, height=SIZE, seed=1, cfg=1.0)
            return np.asarray(gen(req).images[0], dtype=np.int16)
        plain, styled = draw("zq, a red disc"), draw(f"zq, a red disc <lora:{out.stem}:1>")
    finally:
        gen.close()
    assert np.abs(plain - styled).mean() > 0.5


def test_chroma_trains_a_kohya_flux_layout_lora(chroma: BaseModel, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "chroma_style.safetensors"
    cfg = _cfg(data, out, net_kw={"t5": True}, flow=FlowSpec(max_sequence_length=SEQ))
    trainer = trainer_for(cfg, chroma)
    assert isinstance(trainer, ChromaTrainer)
    sd = _train_and_check(trainer, out)
    names = {k.split(".")[0] for k in sd}
    blocks = {n for n in names if n.startswith("lora_unet_")}
    table = chroma_table()
    trained = [b for b in table if b.startswith(("double_blocks", "single_blocks"))]
    assert blocks == {f"lora_unet_{b.replace('.', '_')}" for b in trained}  # BFL names, no pruned modulation
    assert names - blocks and all(n.startswith("lora_te3_encoder_block_") for n in names - blocks)  # T5
    assert sd["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape[0] == 3 * 32 + 4 * 32  # q|k|v|mlp fused
    _, meta = load_file(out)
    want = {"ss_base_model_version": "chroma", "modelspec.architecture": "chroma/lora", "ss_model_type": "chroma",
            "ss_network_module": "networks.lora_flux", "ss_apply_t5_attn_mask": "True",
            "modelspec.trigger_phrase": "zq", "ss_t5xxl_max_token_length": str(SEQ)}
    assert {k: meta.get(k) for k in want} == want
    lora = lorakit.load_lora(out)
    assert (lora.arch, lora.dialect) == ("chroma", "kohya")
    tr = chroma.pipe.transformer
    ref: dict[str, torch.Tensor] = {}
    for bfl in trained:
        name = f"lora_unet_{bfl.replace('.', '_')}"
        leaves = {k.split(".", 1)[1]: v for k, v in sd.items() if k.split(".")[0] == name}
        ref.update(reference_deltas(tr, bfl, leaves, 1.0, table))
    _weight_changes(chroma.pipe, out, ref)
    _changes_the_image(chroma, out, tmp_path)


def test_qwen_trains_a_musubi_layout_lora(qwen: BaseModel, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "qwen_style.safetensors"
    trainer = trainer_for(_cfg(data, out, trigger="zq", lr=3e-2, steps=10), qwen)
    assert isinstance(trainer, QwenTrainer)
    sd = _train_and_check(trainer, out)
    trained = [m for m in qwen_table() if m.startswith("transformer_blocks") and "_mod" not in m]  # musubi's reach
    assert {k.split(".")[0] for k in sd} == {kohya_name(m) for m in trained}
    _, meta = load_file(out)
    want = {"ss_base_model_version": "qwen_image", "modelspec.architecture": "Qwen-Image/lora",
            "ss_network_module": "networks.lora_qwen_image", "modelspec.trigger_phrase": "zq",
            "modelspec.implementation": "https://github.com/QwenLM/Qwen-Image"}
    assert {k: meta.get(k) for k in want} == want
    lora = lorakit.load_lora(out)
    assert (lora.arch, lora.dialect) == ("qwen-image", "kohya")
    tr = qwen.pipe.transformer
    ref = {m: reference_delta(tr.get_submodule(m).weight,
                              {k.split(".", 1)[1]: v for k, v in sd.items() if k.split(".")[0] == kohya_name(m)}, 1.0)
           for m in trained}
    _weight_changes(qwen.pipe, out, ref)
    _changes_the_image(qwen, out, tmp_path)


def test_qwen_resume_ends_bitwise_where_an_uninterrupted_run_ends(qwen: BaseModel, data: Path, tmp_path: Path
                                                                  ) -> None:
    kw: dict[str, Any] = dict(steps=4, save_every=2, schedule="cosine", batch=2, caption_dropout=0.5,
                              flow=FlowSpec(timestep_sampling="flux_shift"))
    whole = QwenTrainer(_cfg(data, tmp_path / "a" / "l.safetensors", "lokr", **kw), qwen)
    whole.run(progress=False)
    first = QwenTrainer(_cfg(data, tmp_path / "b" / "l.safetensors", "lokr", **kw), qwen)
    state = first.run(stop_at=2, progress=False)
    resumed = QwenTrainer(_cfg(data, tmp_path / "b" / "l.safetensors", "lokr", resume=state, **kw), qwen)
    resumed.run(progress=False)
    a, _ = load_file(tmp_path / "a" / "l.safetensors")
    b, _ = load_file(tmp_path / "b" / "l.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert whole.losses == resumed.losses


def test_cli_trains_qwen_and_refuses_what_a_family_does_not_take(tiny_qwen_dir: Path, tiny_chroma_dir: Path,
                                                                  data: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from lorakit.cli import main

    out = tmp_path / "cli.safetensors"
    common = ["--steps", "2", "--rank", "2", "--resolution", str(SIZE), "--device", "cpu", "--no-preview"]
    assert main(["train", str(data), "--model", str(tiny_qwen_dir), "-o", str(out), *common]) == 0
    assert lorakit.load_lora(out).arch == "qwen-image"
    for model, args, match in ((tiny_qwen_dir, ["--train", "te"], "--train te: lorakit does not train Qwen-Image"),
                               (tiny_qwen_dir, ["--guidance", "2"], "--guidance: not for Qwen-Image"),
                               (tiny_chroma_dir, ["--guidance", "2"], "--guidance: Chroma has no guidance"),
                               (tiny_chroma_dir, ["--train", "te"], "Chroma's only text encoder is T5"),
                               (tiny_chroma_dir, ["--min-snr-gamma", "5"], "--min-snr-gamma: for ε/v-prediction")):
        capsys.readouterr()
        bad = tmp_path / "bad.safetensors"
        assert main(["train", str(data), "--model", str(model), "-o", str(bad), *common, *args]) == 2
        assert match in capsys.readouterr().err and not bad.exists()


def test_chroma_network_reaches_the_embedders_and_the_approximator_on_request(chroma: BaseModel, data: Path,
                                                                               tmp_path: Path) -> None:
    only = ("img_attn.qkv", "img_in", "txt_in", "final_layer.linear", "in_proj", "in_layer")
    trainer = ChromaTrainer(_cfg(data, tmp_path / "o.safetensors", net_kw={"only": only, "train": "unet"}), chroma)
    assert sorted(p.split(".", 1)[1] for p in trainer.net.leaves) == sorted(
        ["double_blocks.0.img_attn.qkv", "double_blocks.1.img_attn.qkv", "img_in", "txt_in", "final_layer.linear",
         "distilled_guidance_layer.in_proj", "distilled_guidance_layer.layers.0.in_layer",
         "distilled_guidance_layer.layers.1.in_layer"])
    with pytest.raises(TrainingError, match="no layer of the Chroma model"):
        ChromaTrainer(_cfg(data, tmp_path / "x.safetensors", net_kw={"only": ("img_mod.lin",), "train": "unet"}),
                      chroma)
