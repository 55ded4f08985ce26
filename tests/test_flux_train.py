"""``lorakit train`` on FLUX.1, end to end on a tiny FLUX saved as a diffusers folder: the flow-matching objective
(σ sampling as kohya's ``get_noisy_model_input_and_timesteps``), one network per fused BFL layer whose parts get
gradients, the training forward equal to ``apply_loras`` of the written kohya FLUX file (every network type, the
embedders and the swapped final layer, CLIP-L and T5), the loss going down, the metadata, bitwise resume, the CLI
(folder and BFL single file with --components) and the flags FLUX refuses."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image, ImageDraw

import lorakit
from lorakit.errors import TrainingError
from lorakit.files.io import load_file, save_file
from lorakit.models.loading import BaseModel, load_model
from lorakit.train import flow
from lorakit.train.config import TrainConfig
from lorakit.train.flow import FlowSpec
from lorakit.train.flux_loop import FluxTrainer, trainer_for
from lorakit.train.network import NetworkSpec
from tests.flux_factories import H, MLP, bfl_table, reference_deltas, tiny_flux_pipeline
from tests.flux_factories import bfl_state

SEQ = 16  # T5 tokens in these tests (the model's own 512 only slow them down)
SIZE = 64


@pytest.fixture(scope="module")
def flux_dir(tiny_flux_dir: Path) -> Path:
    return tiny_flux_dir


@pytest.fixture(scope="module")
def flux(flux_dir: Path) -> BaseModel:
    return load_model(str(flux_dir), device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two 64-px pictures with their captions."""
    folder = tmp_path_factory.mktemp("data")
    for i, (colour, caption) in enumerate((((200, 30, 30), "a red disc"), ((30, 40, 200), "a blue square"))):
        im = Image.new("RGB", (SIZE, SIZE), (235, 235, 235))
        shape = ImageDraw.Draw(im).ellipse if i == 0 else ImageDraw.Draw(im).rectangle
        shape((12, 12, 52, 52), fill=colour)
        im.save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(caption)
    return folder


def _cfg(data: Path, out: Path, kind: str = "lora", flow_kw: dict[str, object] | None = None,
         net_kw: dict[str, object] | None = None, **kw: object) -> TrainConfig:
    spec = NetworkSpec(kind, rank=4, alpha=2.0, **(net_kw or {}))  # type: ignore[arg-type]
    kw.setdefault("steps", 3)
    kw.setdefault("lr", 1e-2)
    kw.setdefault("resolution", SIZE)
    fs = FlowSpec(**{"max_sequence_length": SEQ, **(flow_kw or {})})  # type: ignore[arg-type]
    return TrainConfig(data, out, network=spec, flow=fs, **kw)  # type: ignore[arg-type]


# -- the objective ----------------------------------------------------------------------------------------------
def test_sigma_sampling_follows_kohya() -> None:
    def draw(spec: FlowSpec, tokens: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
        got = flow.sample_sigmas(5000, spec, torch.Generator().manual_seed(3), tokens)
        u = torch.Generator().manual_seed(3)
        return got, (torch.rand(5000, generator=u) if spec.sampling == "uniform" else torch.randn(5000, generator=u))

    got, u = draw(FlowSpec())
    torch.testing.assert_close(got, torch.sigmoid(u))
    got, u = draw(FlowSpec("sigmoid", sigmoid_scale=2.0))
    torch.testing.assert_close(got, torch.sigmoid(2 * u))
    got, u = draw(FlowSpec("uniform"))
    torch.testing.assert_close(got, u)
    got, u = draw(FlowSpec("shift", shift=3.1582))
    s = torch.sigmoid(u)
    torch.testing.assert_close(got, 3.1582 * s / (1 + 2.1582 * s))
    for tokens, mu in ((256, 0.5), (4096, 1.15)):
        got, u = draw(FlowSpec("flux_shift"), tokens)
        s = torch.sigmoid(u)
        torch.testing.assert_close(got, math.exp(mu) / (math.exp(mu) + (1 / s - 1)))
    assert 0 < float(got.min()) and float(got.max()) < 1 and float(got.mean()) > 0.6  # shifted toward noise
    x0, eps, sig = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4), torch.tensor([0.25, 1.0])
    torch.testing.assert_close(flow.add_noise(x0, eps, sig)[1], eps[1])
    torch.testing.assert_close(flow.add_noise(x0, eps, sig)[0], 0.75 * x0[0] + 0.25 * eps[0])
    torch.testing.assert_close(flow.target(x0, eps), eps - x0)
    for bad, match in ((FlowSpec("sigma"), "--timestep-sampling"), (FlowSpec(shift=2.0), "shift only"),
                       (FlowSpec("shift", shift=0.0), "> 0"), (FlowSpec(guidance=float("nan")), "--guidance")):
        with pytest.raises(TrainingError, match=match):
            bad.check()


# -- the network: one per fused layer, exactly what the file applies ---------------------------------------------
def _outputs(pipe: Any, t5: bool) -> tuple[torch.Tensor, ...]:
    """CLIP-L's pooled output, T5's output and the transformer's prediction on fixed inputs."""
    from diffusers import FluxPipeline

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49407, (1, 77), generator=gen)
    x = torch.randn(1, 64, 4, generator=gen)
    img_ids = FluxPipeline._prepare_latent_image_ids(1, 8, 8, "cpu", torch.float32)
    with torch.no_grad():
        pooled = pipe.text_encoder(ids).pooler_output
        t5_out = pipe.text_encoder_2(ids[:, :SEQ])[0] if t5 else torch.randn(1, SEQ, 32, generator=gen)
        pred = pipe.transformer(hidden_states=x, encoder_hidden_states=t5_out, pooled_projections=pooled,
                                timestep=torch.tensor([0.6]), guidance=torch.tensor([3.5]), txt_ids=torch.zeros(SEQ, 3),
                                img_ids=img_ids, return_dict=False)[0]
    return pooled, t5_out, pred


def _check_applies_as_trained(trainer: FluxTrainer, out: Path, t5: bool = False, changed: tuple[int, ...] = (2,)
                              ) -> None:
    """The outputs with the training hooks = with ``apply_loras(out)``; the ``changed`` ones differ from the bare
    model's (0: CLIP-L pooled, 1: T5, 2: the transformer's prediction); all restored after."""
    pipe = trainer.model.pipe
    bare = _outputs(pipe, t5)
    trainer.net.attach()
    try:
        trained = _outputs(pipe, t5)
    finally:
        trainer.net.detach()
    with lorakit.apply_loras(pipe, [(out, 1.0)]):
        applied = _outputs(pipe, t5)
    assert all(not torch.allclose(trained[i], bare[i]) for i in changed)  # the network does something
    for got, want in zip(applied, trained):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(_outputs(pipe, t5), bare))  # restored


@pytest.mark.parametrize("kind", ["lora", "lokr", "loha", "dora"])
def test_training_forward_is_what_apply_loras_applies(kind: str, flux: BaseModel, data: Path, tmp_path: Path) -> None:
    out = tmp_path / f"{kind}.safetensors"
    trainer = FluxTrainer(_cfg(data, out, kind, save_dtype="fp32"), flux)
    trainer.run(progress=False)
    qkv = trainer.net.leaves["transformer.double_blocks.0.img_attn.qkv"]
    linear1 = trainer.net.leaves["transformer.single_blocks.0.linear1"]
    if kind in ("lora", "dora"):  # one down for the fused layer; every part's rows of up were trained
        assert qkv["lora_up.weight"].shape == (3 * H, 4) and linear1["lora_up.weight"].shape == (3 * H + MLP, 4)
        for a in range(0, 3 * H + MLP, H):
            assert float(linear1["lora_up.weight"].detach()[a:a + H].abs().max()) > 0, a
    if kind == "lokr":
        assert float(qkv["lokr_w2_b" if "lokr_w2_b" in qkv else "lokr_w2"].detach().abs().max()) > 0
    _check_applies_as_trained(trainer, out)


def test_embedders_and_the_swapped_final_layer_train_too(flux: BaseModel, data: Path, tmp_path: Path) -> None:
    only = ("img_attn.qkv", "linear1", "img_in", "txt_in", "guidance_in.in_layer", "final_layer.adaLN_modulation.1")
    out = tmp_path / "emb.safetensors"
    trainer = FluxTrainer(_cfg(data, out, net_kw={"only": only, "train": "unet"}, save_dtype="fp32"), flux)
    trainer.run(progress=False)
    assert {p.split(".", 2)[-1] if "blocks" in p else p.split(".", 1)[1] for p in trainer.net.leaves} == \
        {"0.img_attn.qkv", "1.img_attn.qkv", "0.linear1", "1.linear1", "2.linear1", "img_in", "txt_in",
         "guidance_in.in_layer", "final_layer.adaLN_modulation.1"}
    sd, _ = load_file(out)
    assert sd["lora_unet_final_layer_adaLN_modulation_1.lora_up.weight"].shape == (2 * H, 4)
    _check_applies_as_trained(trainer, out)
    # the file means what BFL's layout means: the independent reference (fused weight rebuilt by a hand-written
    # table, the change made on it, halves swapped back, rows cut) gives the weight changes apply_loras makes
    tr = flux.pipe.transformer
    table = bfl_table(2, 3)
    want = {part: delta for path, leaves in trainer.net.groups(torch.float32).items()
            for part, delta in reference_deltas(tr, path.split(".", 1)[1], leaves, 1.0, table).items()}
    before = {part: tr.get_submodule(part).weight.detach().clone() for part in want}
    with lorakit.apply_loras(flux.pipe, [(out, 1.0)]):
        for part, delta in want.items():
            torch.testing.assert_close(tr.get_submodule(part).weight.detach() - before[part], delta, rtol=1e-4,
                                       atol=1e-6)
    assert len(want) == 2 * 3 + 3 * 4 + 4  # every part of every fused layer, and the plain ones


def test_clip_and_t5_train_with_train_t5(flux: BaseModel, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "t5.safetensors"
    trainer = FluxTrainer(_cfg(data, out, net_kw={"t5": True, "train": "te"}, save_dtype="fp32", lr=5e-2), flux)
    trainer.run(progress=False)
    sd, meta = load_file(out)
    assert {k.split("_", 2)[1] for k in sd} == {"te1", "te3"}
    assert "lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight" in sd
    assert "lora_te3_encoder_block_1_layer_1_DenseReluDense_wi_0.lora_up.weight" in sd
    assert json.loads(meta["ss_network_args"])["train_t5xxl"] == "True"
    _check_applies_as_trained(trainer, out, t5=True, changed=(0, 1, 2))


# -- the run ----------------------------------------------------------------------------------------------------
def _eval_loss(trainer: FluxTrainer) -> float:
    """The loss over both images at fixed noise and σ (the same draws before and after training)."""
    state = trainer.gen.get_state()
    trainer.gen.manual_seed(1234)
    try:
        with torch.no_grad():
            return sum(float(trainer.loss([i, i, i, i])) for i in range(len(trainer.samples))) / len(trainer.samples)
    finally:
        trainer.gen.set_state(state)


def test_loss_is_finite_and_goes_down(flux: BaseModel, data: Path, tmp_path: Path) -> None:
    trainer = FluxTrainer(_cfg(data, tmp_path / "l.safetensors", steps=12, lr=1e-2, net_kw={"train": "unet"}), flux)
    trainer.net.attach()
    try:
        before = _eval_loss(trainer)
    finally:
        trainer.net.detach()
    trainer.run(progress=False)
    trainer.net.attach()
    try:
        after = _eval_loss(trainer)
    finally:
        trainer.net.detach()
    assert all(math.isfinite(v) for v in trainer.losses) and len(trainer.losses) == 12
    assert after < 0.9 * before, (before, after, trainer.losses)
    assert sum(trainer.losses[-4:]) < sum(trainer.losses[:4])


def test_the_file_reads_back_as_a_kohya_flux_lora(flux: BaseModel, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "meta.safetensors"
    trainer = FluxTrainer(_cfg(data, out, trigger="tok", flow_kw={"timestep_sampling": "shift", "shift": 3.1582}),
                          flux)
    trainer.run(progress=False)
    sd, meta = load_file(out)
    assert sd["lora_unet_double_blocks_1_txt_attn_qkv.lora_up.weight"].shape == (3 * H, 4)
    assert sd["lora_unet_single_blocks_2_linear1.lora_down.weight"].shape == (4, H)
    assert sd["lora_unet_single_blocks_2_linear1.lora_up.weight"].dtype == torch.float16
    assert all(k.startswith(("lora_unet_double_blocks_", "lora_unet_single_blocks_", "lora_te1_text_model_"))
               for k in sd)
    assert not any("transformer_blocks" in k for k in sd)  # BFL names only
    want = {"ss_base_model_version": "flux1", "modelspec.architecture": "flux-1-dev/lora",
            "modelspec.implementation": "https://github.com/black-forest-labs/flux", "ss_network_module":
            "networks.lora_flux", "ss_timestep_sampling": "shift", "ss_discrete_flow_shift": "3.1582",
            "ss_guidance_scale": "1", "ss_model_prediction_type": "raw", "ss_t5xxl_max_token_length": str(SEQ),
            "ss_network_dim": "4", "ss_network_alpha": "2", "ss_steps": "3", "modelspec.resolution": "64x64"}
    assert {k: meta.get(k) for k in want} == want
    assert "modelspec.prediction_type" not in meta and meta["modelspec.trigger_phrase"].startswith("tok")
    lora = lorakit.load_lora(out)
    assert (lora.arch, lora.variant, lora.dialect) == ("flux1", "flux-1-dev", "kohya")
    r = subprocess.run([sys.executable, "-m", "lorakit.cli", "inspect", "--json", str(out)], capture_output=True,
                       text=True, timeout=120)
    info = json.loads(r.stdout)
    assert info["network_types"] == ["lora"] and info["hashes"]["sshs_matches"] is True
    assert "tok" in info["trigger_words"]


def test_resume_ends_bitwise_where_an_uninterrupted_run_ends(flux: BaseModel, data: Path, tmp_path: Path) -> None:
    kw: dict[str, Any] = dict(steps=5, save_every=2, schedule="cosine", warmup=1, batch=2, caption_dropout=0.5,
                              flow_kw={"timestep_sampling": "flux_shift"})
    whole = FluxTrainer(_cfg(data, tmp_path / "a" / "l.safetensors", "lokr", **kw), flux)
    whole.run(progress=False)
    first = FluxTrainer(_cfg(data, tmp_path / "b" / "l.safetensors", "lokr", **kw), flux)
    state = first.run(stop_at=3, progress=False)
    resumed = FluxTrainer(_cfg(data, tmp_path / "b" / "l.safetensors", "lokr", resume=state, **kw), flux)
    assert resumed.step == 3
    resumed.run(progress=False)
    a, _ = load_file(tmp_path / "a" / "l.safetensors")
    b, _ = load_file(tmp_path / "b" / "l.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert whole.losses == resumed.losses
    other = _cfg(data, tmp_path / "c" / "l.safetensors", "lokr", resume=state,
                 **{**kw, "flow_kw": {"timestep_sampling": "sigmoid"}})
    with pytest.raises(TrainingError, match="other settings"):
        FluxTrainer(other, flux)


# -- the command line, schnell, and what FLUX refuses -------------------------------------------------------------
def _train_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    from lorakit.cli import main

    capsys.readouterr()
    rc = main(["train", *args, "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    return rc, err.splitlines()[-1] if err else ""


def test_cli_trains_a_folder_and_a_bfl_single_file(flux: BaseModel, flux_dir: Path, data: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--steps", "2", "--resolution", str(SIZE), "--rank", "4", "--max-sequence-length", str(SEQ)]
    out = tmp_path / "cli.safetensors"
    rc, err = _train_cli(capsys, str(data), "-o", str(out), "--model", str(flux_dir), "--network", "lokr",
                         "--timestep-sampling", "flux_shift", "--guidance", "3.5", *common)
    assert rc == 0, err
    _, meta = load_file(out)
    assert meta["ss_timestep_sampling"] == "flux_shift" and meta["ss_guidance_scale"] == "3.5"
    single = tmp_path / "flux1-tiny.safetensors"
    save_file(bfl_state(flux.pipe.transformer), single)
    out2 = tmp_path / "cli2.safetensors"
    rc, err = _train_cli(capsys, str(data), "-o", str(out2), "--model", str(single), "--components", str(flux_dir),
                         *common)
    assert rc == 0, err
    assert lorakit.load_lora(out2).variant == "flux-1-dev"


def test_flags_that_do_not_apply_are_refused(flux_dir: Path, data: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "x.safetensors")
    for args, match in ((["--min-snr-gamma", "5"], "--min-snr-gamma: for ε/v-prediction models"),
                        (["--noise-offset", "0.05"], "--noise-offset"),
                        (["--network", "locon"], "no convolutions"),
                        (["--train-t5", "--train", "unet"], "--train-t5 trains T5 beside CLIP-L"),
                        (["--discrete-flow-shift", "3"], "--timestep-sampling shift only")):
        rc, err = _train_cli(capsys, str(data), "-o", out, "--model", str(flux_dir), "--steps", "1", *args)
        assert rc == 2 and err.startswith("lorakit: error:") and match in err, err
    rc, err = _train_cli(capsys, str(data), "-o", out, "--steps", "1", "--guidance", "2", "--timestep-sampling",
                         "shift")
    assert rc == 2 and "--timestep-sampling, --guidance: for the flow-matching models only" in err, err
    assert not Path(out).exists()


def test_schnell_trains_without_guidance(data: Path, tmp_path: Path) -> None:
    path = tmp_path / "schnell"
    tiny_flux_pipeline(guidance=False).save_pretrained(path)  # type: ignore[attr-defined]
    model = load_model(str(path), device="cpu", dtype="fp32")
    out = tmp_path / "s.safetensors"
    with pytest.raises(TrainingError, match="--guidance: flux-1-schnell has no guidance embedding"):
        trainer_for(_cfg(data, out, flow_kw={"guidance": 3.5}), model)
    trainer = trainer_for(_cfg(data, out, steps=2, sample_every=2, sample_prompt="a red disc"), model)
    assert isinstance(trainer, FluxTrainer) and trainer.guidance is None
    trainer.run(progress=False)
    with Image.open(tmp_path / "samples" / "s-000002.png") as im:
        assert im.size == (SIZE, SIZE)
    _, meta = load_file(out)
    assert meta["modelspec.architecture"] == "flux-1-schnell/lora" and meta["ss_guidance_scale"] == "None"
    assert lorakit.load_lora(out).variant == "flux-1-schnell"
