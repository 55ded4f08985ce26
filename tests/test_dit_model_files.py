"""Chroma and Qwen-Image model files (and SD3's SAI single files, read the same way): ``bake`` into their diffusers
folders and single files (lodestones' BFL-named Chroma checkpoints, ComfyUI's Qwen-Image ones) is bit for bit what
``apply_loras`` fuses; ``extract`` of (base, base + ΔW) gives ΔW back within its rank; bad files are named; a single
file loads for generation with the rest from a ``--components`` folder, as the folder's own model."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import lorakit
from lorakit.errors import ModelError, ToolError
from lorakit.files.io import load_file, save_file
from lorakit.models.loading import load_model
from lorakit.tools.bake import bake
from lorakit.tools.extract import ExtractOptions, extract
from lorakit.tools.modelfile import open_model
from lorakit.tools.svd import RankRule
from tests.chroma_factories import chroma_bfl_state, chroma_lora
from tests.flux_factories import kohya_keys
from tests.qwen_factories import kohya_name, qwen_lora

COMFY = "model.diffusion_model."
T5_LAYER = "lora_te3_encoder_block_0_layer_0_SelfAttention_q"


def _params(comps: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    return {f"{c}.{n}": p.detach().clone() for c, m in comps.items() for n, p in m.named_parameters()}


def _folder_tensors(folder: Path, comps: tuple[str, ...]) -> dict[str, torch.Tensor]:
    out = {}
    for c in comps:
        for f in (folder / c).glob("*.safetensors"):
            out.update({f"{c}.{k}": v for k, v in load_file(f)[0].items()})
    return out


def _qwen_file(tr: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {COMFY + k: v.detach().clone() for k, v in tr.state_dict().items()}


@pytest.fixture(scope="module")
def chroma(tiny_chroma_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, torch.nn.Module], Path]:
    d = tmp_path_factory.mktemp("chroma_files")
    pipe = load_model(str(tiny_chroma_dir), device="cpu", dtype="fp32").pipe
    comps = {"transformer": pipe.transformer, "text_encoder": pipe.text_encoder}
    lora = kohya_keys(chroma_lora(pipe.transformer, "lora", seed=1))
    g = torch.Generator().manual_seed(2)
    lora |= {f"{T5_LAYER}.lora_down.weight": torch.randn(2, 32, generator=g),
             f"{T5_LAYER}.lora_up.weight": torch.randn(32, 2, generator=g)}
    save_file(lora, d / "lora.safetensors", {"ss_base_model_version": "chroma"})
    save_file(kohya_keys(chroma_lora(pipe.transformer, "dora-in", seed=3)), d / "dora.safetensors",
              {"ss_base_model_version": "chroma"})
    save_file(chroma_bfl_state(pipe.transformer), d / "chroma.safetensors")
    return comps, d


def test_chroma_bake_folder_and_bfl_file_equal_apply_bitwise(chroma: tuple[dict[str, torch.nn.Module], Path],
                                                             tiny_chroma_dir: Path) -> None:
    comps, d = chroma
    specs = [f"{d / 'lora.safetensors'}:0.8", f"{d / 'dora.safetensors'}:-0.6"]
    with lorakit.apply_loras(comps, [(d / "lora.safetensors", 0.8), (d / "dora.safetensors", -0.6)]):
        want, want_bfl = _params(comps), chroma_bfl_state(comps["transformer"])
    report = bake(tiny_chroma_dir, specs, d / "baked")
    assert report.left_out == [] and report.layers
    got = _folder_tensors(d / "baked", tuple(comps))
    assert [n for n in want if not torch.equal(got[n], want[n])] == []
    assert not torch.equal(want["text_encoder.encoder.block.0.layer.0.SelfAttention.q.weight"],
                           _params(comps)["text_encoder.encoder.block.0.layer.0.SelfAttention.q.weight"])
    bake(d / "chroma.safetensors", specs, d / "baked.safetensors")  # the T5 layer has no place there: reported
    out = load_file(d / "baked.safetensors")[0]
    assert out.keys() == want_bfl.keys()
    assert [k for k in out if not torch.equal(out[k], want_bfl[k])] == []


def _recovers(comps: dict[str, torch.nn.Module], lora: Path, tuned: dict[str, torch.Tensor], tol: float) -> None:
    """``lora`` applied at 1 on the base makes the tuned transformer's weights (relative error ≤ ``tol``)."""
    tr = comps["transformer"]
    with lorakit.apply_loras(comps, [(lora, 1.0)]):
        got = {n: p.detach().double() for n, p in tr.named_parameters()}
    changed = [n for n in tuned if not torch.equal(tuned[n], got[n])]
    assert changed
    for n in changed:
        assert float((got[n] - tuned[n].double()).norm()) <= tol * float(tuned[n].double().norm()) + 1e-7, n


def test_chroma_extract_from_files_and_folders(chroma: tuple[dict[str, torch.nn.Module], Path],
                                               tiny_chroma_dir: Path, tmp_path: Path) -> None:
    comps, d = chroma
    tr = comps["transformer"]
    with lorakit.apply_loras(comps, [(d / "lora.safetensors", 1.0)]):  # base + a rank-4 ΔW
        tuned = {n: p.detach().clone() for n, p in tr.named_parameters()}
        save_file(chroma_bfl_state(tr), tmp_path / "tuned.safetensors")
    out = tmp_path / "x.safetensors"
    report = extract(d / "chroma.safetensors", tmp_path / "tuned.safetensors", out,
                     ExtractOptions(RankRule("rank", 4), components=("transformer",)))
    assert report.per_component()["transformer"] < 1e-5
    sd = load_file(out)[0]
    assert sd["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape[0] == 3 * 32 + 128  # fused, BFL names
    assert "lora_unet_distilled_guidance_layer_layers_1_in_layer.lora_down.weight" in sd
    assert load_file(out)[1]["modelspec.architecture"] == "chroma/lora"
    _recovers(comps, out, tuned, 1e-4)
    report = extract(tiny_chroma_dir, d / "baked", out, ExtractOptions(RankRule("rank", 512)))  # full rank: ΔW
    assert report.per_component()["transformer"] < 1e-5 and open_model(d / "baked").arch == "chroma"


@pytest.fixture(scope="module")
def qwen(tiny_qwen_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, torch.nn.Module], Path]:
    d = tmp_path_factory.mktemp("qwen_files")
    tr = load_model(str(tiny_qwen_dir), device="cpu", dtype="fp32").pipe.transformer
    for name, kind, seed in (("lora", "lora", 1), ("lokr", "lokr", 2)):
        layers = qwen_lora(tr, kind, seed=seed)
        save_file({f"{kohya_name(m)}.{k}": v for m, ls in layers.items() for k, v in ls.items()},
                  d / f"{name}.safetensors", {"ss_base_model_version": "qwen_image"})
    save_file(_qwen_file(tr), d / "qwen_image.safetensors")
    return {"transformer": tr}, d


def test_qwen_bake_folder_and_comfy_file_equal_apply_bitwise(qwen: tuple[dict[str, torch.nn.Module], Path],
                                                             tiny_qwen_dir: Path) -> None:
    comps, d = qwen
    specs = [f"{d / 'lora.safetensors'}:0.7", f"{d / 'lokr.safetensors'}:0.5"]
    with lorakit.apply_loras(comps, [(d / "lora.safetensors", 0.7), (d / "lokr.safetensors", 0.5)]):
        want, want_file = _params(comps), _qwen_file(comps["transformer"])
    assert bake(tiny_qwen_dir, specs, d / "baked").left_out == []
    got = _folder_tensors(d / "baked", ("transformer",))
    assert [n for n in want if not torch.equal(got[n], want[n])] == []
    bake(d / "qwen_image.safetensors", specs, d / "baked.safetensors")
    out = load_file(d / "baked.safetensors")[0]
    assert out.keys() == want_file.keys()
    assert [k for k in out if not torch.equal(out[k], want_file[k])] == []


def test_qwen_extract_recovers_the_change(qwen: tuple[dict[str, torch.nn.Module], Path], tmp_path: Path) -> None:
    comps, d = qwen
    with lorakit.apply_loras(comps, [(d / "lora.safetensors", 1.0)]):
        tuned = {n: p.detach().clone() for n, p in comps["transformer"].named_parameters()}
        save_file(_qwen_file(comps["transformer"]), tmp_path / "tuned.safetensors")
    out = tmp_path / "x.safetensors"
    report = extract(d / "qwen_image.safetensors", tmp_path / "tuned.safetensors", out,
                     ExtractOptions(RankRule("rank", 4), components=("transformer",)))
    assert report.per_component()["transformer"] < 1e-5
    sd, meta = load_file(out)
    assert "lora_unet_transformer_blocks_1_img_mod_1.lora_down.weight" in sd  # musubi-tuner's names
    assert meta["modelspec.architecture"] == "Qwen-Image/lora"
    _recovers(comps, out, tuned, 1e-4)


def test_bad_chroma_and_qwen_files_are_named(chroma: tuple[dict[str, torch.nn.Module], Path],
                                             qwen: tuple[dict[str, torch.nn.Module], Path], tmp_path: Path,
                                             tiny_chroma_dir: Path) -> None:
    c, q = load_file(chroma[1] / "chroma.safetensors")[0], load_file(qwen[1] / "qwen_image.safetensors")[0]
    cases = {"odd": ({**c, "distilled_guidance_layer.extra.weight": torch.zeros(2, 2)},
                     "distilled_guidance_layer.extra.weight is not a Chroma transformer tensor"),
             "rows": ({**c, "single_blocks.0.linear1.weight": torch.zeros(3 * 32, 32)},
                      r"single_blocks.0.linear1.weight cannot be split.*leave nothing for"),
             "noimg": ({k: v for k, v in q.items() if "img_in" not in k}, "Qwen-Image file without img_in.weight"),
             "foreign": ({**q, COMFY + "blocks.0.ffn.weight": torch.zeros(2, 2)},
                         f"{COMFY}blocks.0.ffn.weight is not a Qwen-Image transformer tensor")}
    for name, (sd, message) in cases.items():
        save_file(sd, tmp_path / f"{name}.safetensors")
        with pytest.raises(ToolError, match=message):
            bake(tmp_path / f"{name}.safetensors", [str(qwen[1] / "lora.safetensors")],
                 tmp_path / f"o{name}.safetensors")
        assert not (tmp_path / f"o{name}.safetensors").exists()
    with pytest.raises(lorakit.LorakitError, match="odd.safetensors: distilled_guidance_layer.extra.weight is not"):
        load_model(str(tmp_path / "odd.safetensors"), device="cpu", dtype="fp32", components=tiny_chroma_dir)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "model_index.json").write_text('{"_class_name": "ChromaPipeline"}')
    with pytest.raises(ToolError, match="the Chroma model folder has no transformer/"):
        open_model(tmp_path / "empty")


def test_single_files_load_for_generation_with_components(chroma: tuple[dict[str, torch.nn.Module], Path],
                                                          qwen: tuple[dict[str, torch.nn.Module], Path],
                                                          tiny_chroma_dir: Path, tiny_qwen_dir: Path,
                                                          tmp_path: Path) -> None:
    from lorakit.generate.pipeline import Generator, Request
    from lorakit.library import Library

    for (comps, d), name, folder in ((chroma, "chroma", tiny_chroma_dir), (qwen, "qwen_image", tiny_qwen_dir)):
        with pytest.raises(ModelError, match="--components"):
            load_model(str(d / f"{name}.safetensors"), device="cpu", dtype="fp32")
        model = load_model(str(d / f"{name}.safetensors"), device="cpu", dtype="fp32", components=folder)
        assert model.arch == ("chroma" if name == "chroma" else "qwen-image")
        want = {**comps["transformer"].state_dict(), **dict(comps["transformer"].named_buffers())}
        got = {**model.pipe.transformer.state_dict(), **dict(model.pipe.transformer.named_buffers())}
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)  # Chroma's mod_proj
    req = Request("a red circle", steps=2, width=64, height=64, seed=1)
    (tmp_path / "loras").mkdir()
    library = Library([tmp_path / "loras"], index=tmp_path / "i.sqlite3")
    from_file = Generator(model, library)(req).images[0]  # Qwen-Image: the file's model draws the folder's picture
    from_folder = Generator(load_model(str(tiny_qwen_dir), device="cpu", dtype="fp32"), library)(req).images[0]
    assert from_file.tobytes() == from_folder.tobytes()


def test_sd3_sai_file_bake_and_extract(tmp_path: Path) -> None:
    """The last block's swapped 2·h context adaLN and the fused qkv: row ranges of the SAI tensors, put back."""
    from tests.sd3_factories import sai_lora, sai_state, tiny_sd3_transformer
    from tests.sd3_factories import kohya_keys as sai_kohya_keys

    comps = {"transformer": tiny_sd3_transformer()}
    tr = comps["transformer"]
    meta = {"modelspec.architecture": "stable-diffusion-3-medium/lora"}
    save_file({COMFY + k: v for k, v in sai_state(tr).items()}, tmp_path / "sd3.safetensors")
    save_file(sai_kohya_keys(sai_lora(tr, "lora", seed=1)), tmp_path / "a.safetensors", meta)
    save_file(sai_kohya_keys(sai_lora(tr, "loha", seed=2)), tmp_path / "b.safetensors", meta)
    with lorakit.apply_loras(comps, [(tmp_path / "b.safetensors", 0.5)]):
        want = {COMFY + k: v for k, v in sai_state(tr).items()}
    assert open_model(tmp_path / "sd3.safetensors").arch == "sd3-medium"
    bake(tmp_path / "sd3.safetensors", [f"{tmp_path / 'b.safetensors'}:0.5"], tmp_path / "baked.safetensors")
    out = load_file(tmp_path / "baked.safetensors")[0]
    assert out.keys() == want.keys() and [k for k in out if not torch.equal(out[k], want[k])] == []
    with lorakit.apply_loras(comps, [(tmp_path / "a.safetensors", 1.0)]):
        tuned = {n: p.detach().clone() for n, p in tr.named_parameters()}
        save_file(sai_state(tr), tmp_path / "tuned.safetensors")
    lora = tmp_path / "x.safetensors"
    report = extract(tmp_path / "sd3.safetensors", tmp_path / "tuned.safetensors", lora,
                     ExtractOptions(RankRule("rank", 4), components=("transformer",)))
    assert report.per_component()["transformer"] < 1e-5
    assert "lora_unet_joint_blocks_1_context_block_adaLN_modulation_1.lora_down.weight" in load_file(lora)[0]
    _recovers(comps, lora, tuned, 1e-4)


def test_lbw_vectors_are_the_families_data() -> None:
    """A vector's length names the families that list it (``Family.lbw``); a model whose family lists none refuses
    every vector (it named nothing there), and the messages name the families."""
    from lorakit.errors import WeightSpecError
    from lorakit.keymap.families import FAMILIES
    from lorakit.patch.weights import as_weight

    assert {f.key for f in FAMILIES.values() if any(58 in map(len, (v.blocks for v in vs)) for vs in f.lbw.values())} \
        == {"flux1", "chroma"}
    as_weight({"lbw": [1.0] * 58}).for_path("transformer.transformer_blocks.0.attn.to_q", "chroma")
    for arch, n, message in (("sd3-medium", 17, "17-value block-weight vector is for SD1/SD2, the model is sd3"),
                             ("qwen-image", 58, "is for FLUX.1 and Chroma, the model is qwen-image"),
                             ("sdxl", 26, "is for SD1/SD2, the model is sdxl")):
        with pytest.raises(WeightSpecError, match=message):
            as_weight({"lbw": [1.0] * n}).for_path("transformer.proj_out", arch)
    with pytest.raises(WeightSpecError, match=r"12 or 20 \(SDXL\) or 58 \(FLUX.1 and Chroma\), got 3"):
        as_weight({"lbw": [1.0] * 3})


def test_qwen_scaled_fp8_file_bakes_as_apply_computes(qwen: tuple[dict[str, torch.nn.Module], Path],
                                                      tmp_path: Path) -> None:
    """ComfyUI's scaled-fp8 Qwen-Image file (``qwen_image_fp8_e4m3fn``: fp8 block weights, ``scale_weight`` beside):
    a changed layer is written in bf16 as ``round_bf16(fp32(dq(Wq)) + ΔW)`` (against an fp32 model holding dq(Wq):
    within bf16's rounding), its scale dropped; every other tensor keeps its bytes."""
    comps, d = qwen
    state = _qwen_file(comps["transformer"])
    fp8: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if ".transformer_blocks." in k and k.endswith(".weight") and v.dim() == 2:
            scale = v.abs().max() / 448
            fp8[k] = (v / scale).to(torch.float8_e4m3fn)
            fp8[k.removesuffix("weight") + "scale_weight"] = scale.reshape(())
        else:
            fp8[k] = v.bfloat16()  # ComfyUI's fp8 files keep the rest in bf16
    save_file(fp8, tmp_path / "fp8.safetensors")
    dq = {n: (fp8[COMFY + n].float() * fp8[COMFY + n.removesuffix("weight") + "scale_weight"])
          if fp8[COMFY + n].dtype == torch.float8_e4m3fn else fp8[COMFY + n] for n in comps["transformer"].state_dict()}
    from tests.qwen_factories import tiny_qwen_transformer

    ref = tiny_qwen_transformer()
    ref.load_state_dict(dq)
    with lorakit.apply_loras({"transformer": ref}, [(d / "lora.safetensors", 0.7)]):
        want = {COMFY + n: p.detach().clone() for n, p in ref.named_parameters()}
    bake(tmp_path / "fp8.safetensors", [f"{d / 'lora.safetensors'}:0.7"], tmp_path / "baked.safetensors")
    out = load_file(tmp_path / "baked.safetensors")[0]
    changed = [k for k in fp8 if k.endswith(".weight") and fp8[k].dtype == torch.float8_e4m3fn]
    assert changed and all(out[k].dtype == torch.bfloat16 for k in changed)
    for k in changed:  # fp32(dq) + ΔW rounded once to bf16, ΔW from factors in the layer's bf16 compute dtype:
        delta = (want[k] - dq[k.removeprefix(COMFY)]).abs()  # within an ulp of the result and of ΔW
        err = (out[k].float() - want[k]).abs()
        assert bool((err <= (want[k].abs() + delta) * 2 ** -7 + 1e-6).all()), k
        assert float(err.mean()) < 0.05 * float(delta.mean()), k  # the LoRA's change is all there
    assert not any(k.endswith("scale_weight") for k in out)
    from tests.qwen_factories import qwen_table

    kept = [k for k in out if k.removeprefix(COMFY).rsplit(".", 1)[0] not in qwen_table()]  # no LoRA module
    assert kept and all(torch.equal(out[k], fp8[k]) for k in kept)
