"""Dialects, architecture detection and key coverage on full-size models (meta device)."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import lorakit
import lorakit.files.hashes
import lorakit.files.io
from lorakit.models.configs import build_components
from lorakit.patch.plan import build_plan

from .conftest import REAL_LORAS
from .factories import adapter_tensors, make_kohya_lora, tiny_components
from .lyco import file_state_dict

REAL = REAL_LORAS


@pytest.fixture(scope="module")
def sd15() -> dict[str, torch.nn.Module]:
    return build_components("sd1")


@pytest.fixture(scope="module")
def sdxl() -> dict[str, torch.nn.Module]:
    return build_components("sdxl")


def _coverage(components: dict[str, torch.nn.Module], lora: lorakit.LoraModel) -> lorakit.LoraReport:
    report = build_plan(components, [(lora, lorakit.as_weight(1.0))]).reports[0]
    assert report.unmatched == [] and lora.leftovers == [], (report.unmatched[:3], lora.leftovers[:3])
    assert sum(report.patched.values()) == len(lora.layers)
    return report


@pytest.mark.parametrize("name,dialect,patched", [
    ("cloneofsimo_sd15_disney.safetensors", "cloneofsimo", {"unet": 144, "text_encoder": 48}),
    ("diffusers_attnprocs_sd15_pokemon.safetensors", "diffusers-attnprocs", {"unet": 128}),
    ("diffusers_attnprocs_sd15_catundchat.bin", "diffusers-attnprocs", {"unet": 128}),
])
def test_real_files_map_every_key_onto_sd15(sd15: dict[str, torch.nn.Module], name: str, dialect: str,
                                            patched: dict[str, int]) -> None:
    lora = lorakit.load_lora(REAL / name)
    assert lora.dialect == dialect and lora.arch == "sd1"
    assert _coverage(sd15, lora).patched == patched


def test_cloneofsimo_embeddings_and_old_layer_order() -> None:
    lora = lorakit.load_lora(REAL / "cloneofsimo_sd15_disney.safetensors")
    assert sorted(lora.embeddings) == ["<s1>", "<s2>"] and lora.embeddings["<s1>"].shape == (768,)
    geglu = lora.layers["unet.down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj"]
    assert geglu.t["lora_up.weight"].shape == (2560, 1)  # index 4 in the file: attn1, ff, attn2 order


def test_attnprocs_with_unet_prefix_and_text_encoder(sd15: dict[str, torch.nn.Module]) -> None:
    sd = {f"unet.{k}": v for k, v in lorakit.files.io.load_file(REAL / "diffusers_attnprocs_sd15_pokemon.safetensors")[
        0].items()}
    sd["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight"] = torch.zeros(768, 4)
    sd["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight"] = torch.zeros(4, 768)
    assert _coverage(sd15, lorakit.lora_from_state_dict(sd, {})).patched == {"unet": 128, "text_encoder": 1}


@pytest.mark.parametrize("algo,kw", [("lora", dict(conv_dim=4)), ("loha", {}), ("lokr", {}), ("ia3", {}),
                                     ("glora", {}), ("diag-oft", {})])
def test_lycoris_files_cover_full_sd15(sd15: dict[str, torch.nn.Module], algo: str, kw: dict[str, object]) -> None:
    """Files written by LyCORIS for the whole UNet and the text encoder resolve to real modules of the right shape."""
    sd: dict[str, torch.Tensor] = {}
    for component in ("unet", "text_encoder"):
        net = _meta_network(sd15[component], algo, **kw)
        sd.update({k: torch.zeros(v.shape) for k, v in file_state_dict(net).items()})
    lora = lorakit.lora_from_state_dict(sd, {}, name=algo)
    assert lora.dialect == "lycoris"
    report = _coverage(sd15, lora)
    assert report.patched["unet"] > 100 and report.patched["text_encoder"] >= 72


def _meta_network(root: torch.nn.Module, algo: str, **kw: object) -> object:
    from lycoris import create_lycoris

    return create_lycoris(root, 1.0, linear_dim=4, linear_alpha=2.0, algo=algo, **kw)


def test_kohya_sdxl_ldm_names_cover_full_sdxl(sdxl: dict[str, torch.nn.Module]) -> None:
    """kohya SDXL files name the UNet in LDM/SGM terms (input_blocks_4_1_…); every one maps to diffusers."""
    from lorakit.keymap.ldm import ldm_to_diffusers

    inverse = {}
    for i in range(9):
        for j in range(3):
            for probe in ("transformer_blocks.0.attn1.to_q", "in_layers.2", "op", "proj_in"):
                mapped = ldm_to_diffusers(f"input_blocks.{i}.{j}.{probe}")
                if mapped:
                    inverse[mapped] = f"input_blocks.{i}.{j}.{probe}"
    sd = make_kohya_lora(sdxl, "lora", rank=2, convs=True)
    renamed = {}
    for k, v in sd.items():
        module, _, leaf = k.partition(".")
        path = module[len("lora_unet_"):] if module.startswith("lora_unet_") else None
        dotted = lorakit.keymap.unflatten(path) if path else None
        if dotted in inverse:
            module = "lora_unet_" + inverse[dotted].replace(".", "_")
        renamed[f"{module}.{leaf}"] = v
    assert any("input_blocks" in k for k in renamed)
    lora = lorakit.lora_from_state_dict(renamed, {})
    assert lora.arch == "sdxl"
    _coverage(sdxl, lora)


def test_sdxl_both_text_encoders(sdxl: dict[str, torch.nn.Module]) -> None:
    sd = make_kohya_lora({k: v for k, v in sdxl.items() if k.startswith("text")}, "lora", rank=1)
    lora = lorakit.lora_from_state_dict(sd, {})
    assert lora.arch == "sdxl" and any(k.startswith("lora_te2_") for k in sd)
    assert set(_coverage(sdxl, lora).patched) == {"text_encoder", "text_encoder_2"}


def test_peft_lora_and_dora_match_peft_itself() -> None:
    """A PEFT adapter (LoRA + DoRA, α≠r) saved the diffusers way gives the same UNet output as PEFT's forward."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    c = tiny_components("sd1")
    peft_unet = copy.deepcopy(c["unet"])
    peft_unet.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, use_dora=True,
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"]))
    sd = {f"unet.{k}": v.detach().clone() for k, v in get_peft_model_state_dict(peft_unet).items()}
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 8})}
    lora = lorakit.lora_from_state_dict(sd, meta)
    assert lora.dialect == "peft" and lora.network_types == ["dora(locon)", "dora(lora)"] and not lora.leftovers
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 7, 32, generator=g)
    with torch.no_grad():
        expected = peft_unet(x, 10, encoder_hidden_states=ctx).sample
        with lorakit.apply_loras({"unet": c["unet"]}, [lora]):
            got = c["unet"](x, 10, encoder_hidden_states=ctx).sample
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_peft_default_segment_and_base_model_prefix() -> None:
    t = adapter_tensors("lora", (320, 320))
    sd = {"base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.default.weight":
          t["lora_down.weight"],
          "base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.default.weight":
          t["lora_up.weight"]}
    lora = lorakit.lora_from_state_dict(sd, {})
    assert list(lora.layers) == ["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]


def test_comfyui_generic_names(sdxl: dict[str, torch.nn.Module]) -> None:
    t = adapter_tensors("lora", (640, 2048), rank=2)
    sd = {f"diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.{k}": v for k, v in t.items()}
    t2 = adapter_tensors("lora", (1280, 1280), rank=2)
    sd.update({f"text_encoders.clip_g.transformer.text_model.encoder.layers.3.self_attn.q_proj.{k}": v
               for k, v in t2.items()})
    lora = lorakit.lora_from_state_dict(sd, {})
    assert lora.dialect == "comfyui" and lora.arch == "sdxl"
    assert _coverage(sdxl, lora).patched == {"unet": 1, "text_encoder_2": 1}


def test_kohya_oft_prefix(sd15: dict[str, torch.nn.Module]) -> None:
    t = adapter_tensors("oft", (320, 320))
    sd = {f"oft_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.{k}": v for k, v in t.items()}
    lora = lorakit.lora_from_state_dict(sd, {})
    assert lora.network_types == ["oft"]
    _coverage(sd15, lora)


def test_te_spelled_without_text_model(sd15: dict[str, torch.nn.Module]) -> None:
    """LyCORIS on transformers 5 writes lora_te_encoder_layers_…; files in the wild lora_te_text_model_…."""
    t = adapter_tensors("lora", (768, 768))
    sd = {f"lora_te_encoder_layers_0_self_attn_q_proj.{k}": v for k, v in t.items()}
    sd.update({f"lora_te_text_model_encoder_layers_1_self_attn_q_proj.{k}": v for k, v in t.items()})
    _coverage(sd15, lorakit.lora_from_state_dict(sd, {}))


def test_bundled_embeddings_are_kept_aside() -> None:
    t = adapter_tensors("lora", (320, 320))
    sd = {f"lora_unet_down_blocks_0_attentions_0_proj_in.{k}": v for k, v in t.items()}
    sd["bundle_emb.mychar.string_to_param.*"] = torch.zeros(2, 768)
    lora = lorakit.lora_from_state_dict(sd, {})
    assert list(lora.embeddings) == ["mychar"] and lora.leftovers == []


@pytest.mark.parametrize("keys,family", [
    (["transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj.lora_A.weight"], "FLUX.2"),
    (["diffusion_model.double_stream_modulation_img.lin.lora_A.weight"], "FLUX.2"),
    (["transformer.transformer_blocks.20.attn.to_q.lora_A.weight"], "Qwen-Image or Stable Diffusion 3"),
    (["lora_transformer_blocks_0_attn_to_q.lora_up.weight"], "transformer"),
])
def test_foreign_families_refused_by_name(keys: list[str], family: str) -> None:
    with pytest.raises(lorakit.UnsupportedLora, match=family):
        lorakit.lora_from_state_dict({k: torch.zeros(2, 2) for k in keys}, {})


@pytest.mark.parametrize("meta,family", [({"modelspec.architecture": "hunyuan-video/lora"}, "Hunyuan"),
                                         ({"modelspec.architecture": "flux-2-dev/lora"}, "FLUX.2")])
def test_foreign_family_from_metadata(meta: dict[str, str], family: str) -> None:
    t = adapter_tensors("lora", (320, 320))
    sd = {f"lora_unet_x.{k}": v for k, v in t.items()}
    with pytest.raises(lorakit.UnsupportedLora, match=family):
        lorakit.lora_from_state_dict(sd, meta)


@pytest.mark.parametrize("meta,arch", [({"ss_base_model_version": "sd_v1"}, "sd1"), ({"ss_v2": "True"}, "sd2"),
                                       ({"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}, "sdxl"),
                                       ({}, "unknown")])
def test_arch_from_metadata_when_shapes_say_nothing(meta: dict[str, str], arch: str) -> None:
    t = adapter_tensors("lora", (320, 320))
    sd = {f"lora_unet_down_blocks_0_attentions_0_proj_in.{k}": v for k, v in t.items()}
    assert lorakit.lora_from_state_dict(sd, meta).arch == arch


@pytest.mark.parametrize("width,arch", [(768, "sd1"), (1024, "sd2"), (2048, "sdxl")])
def test_arch_from_cross_attention_width(width: int, arch: str) -> None:
    t = adapter_tensors("lora", (320, width))
    sd = {f"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.{k}": v for k, v in t.items()}
    assert lorakit.lora_from_state_dict(sd, {"ss_base_model_version": "sd_v1"}).arch == arch


def test_file_roundtrip_safetensors(tmp_path: Path) -> None:
    c = tiny_components("sd1")
    sd = make_kohya_lora(c, "loha")
    save_file(sd, str(tmp_path / "x.safetensors"), metadata={"ss_network_dim": "4"})
    lora = lorakit.load_lora(tmp_path / "x.safetensors")
    assert lora.network_types == ["loha"] and lora.metadata["ss_network_dim"] == "4" and lora.rank == 4


def test_sd2_full_coverage_and_detection() -> None:
    """SD2: OpenCLIP-H as transformers CLIPTextModel (1024 wide, 23 layers), 1024-wide cross-attention."""
    sd2 = build_components("sd2")
    lora = lorakit.lora_from_state_dict(make_kohya_lora(sd2, "lora", rank=1), {}, name="sd2")
    assert lora.arch == "sd2"
    report = _coverage(sd2, lora)
    assert report.patched["text_encoder"] == 23 * 6 and report.patched["unet"] > 250


def test_onetrainer_sdxl_names(sdxl: dict[str, torch.nn.Module]) -> None:
    t = adapter_tensors("lora", (1280, 1280), rank=2)
    t1 = adapter_tensors("lora", (768, 768), rank=2)
    sd = {f"lora_te2_text_projection.{k}": v for k, v in t.items()}
    sd.update({f"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.{k}": v for k, v in t1.items()})
    lora = lorakit.lora_from_state_dict(sd, {})
    assert lora.arch == "sdxl"
    assert _coverage(sdxl, lora).patched == {"text_encoder": 1, "text_encoder_2": 1}


def test_diffusers_lora_compatible_layout_reads_like_kohya(tiny: dict[str, torch.nn.Module]) -> None:
    """diffusers 0.21–0.24 wrote ``unet.<module>.lora.down.weight``: the same layers, the same ΔW."""
    from .factories import make_kohya_lora

    kohya = lorakit.lora_from_state_dict(make_kohya_lora(tiny, "lora", seed=3), {})
    sd = {}
    for path, adapter in kohya.layers.items():
        component, module = path.split(".", 1)
        sd[f"{component}.{module}.lora.down.weight"] = adapter.t["lora_down.weight"]
        sd[f"{component}.{module}.lora.up.weight"] = adapter.t["lora_up.weight"]
    lora = lorakit.lora_from_state_dict(sd, {})
    assert lora.dialect == "diffusers-attnprocs" and lora.leftovers == [] and set(lora.layers) == set(kohya.layers)
    path = next(iter(lora.layers))
    w = torch.zeros(kohya.layers[path].implied_shape())  # type: ignore[attr-defined]
    scale = kohya.layers[path].scale()
    torch.testing.assert_close(lora.layers[path].delta(w, 1.0) * scale, kohya.layers[path].delta(w, 1.0))
