"""Reader fixes found while writing FLUX.1 files: a kohya ``dora_scale`` beside PEFT-style ``lora_A``/``lora_B``
keys keeps its own shape (ComfyUI reads both spellings), and ComfyUI's text-encoder names under ``lora_A`` keys."""
from __future__ import annotations

import torch

from lorakit.adapters import DoRA
from lorakit.lora_model import lora_from_state_dict
from tests.factories import adapter_tensors
from tests.flux_factories import H


def test_per_input_dora_scale_beside_lora_a_keys_stays_per_input() -> None:
    t = adapter_tensors("dora-in", (H, H), 4, torch.Generator().manual_seed(0))  # square: shapes cannot tell
    assert t["dora_scale"].shape == (1, H)
    names = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}
    sd = {f"diffusion_model.double_blocks.0.img_attn.proj.{names.get(k, k)}": v for k, v in t.items()}
    layer = lora_from_state_dict(sd, {}).layers["transformer.transformer_blocks.0.attn.to_out.0"]
    assert isinstance(layer, DoRA) and not layer.per_output
    peft = {k.replace("dora_scale", "lora_magnitude_vector"): v.flatten() if "dora" in k else v for k, v in sd.items()}
    layer = lora_from_state_dict(peft, {}).layers["transformer.transformer_blocks.0.attn.to_out.0"]
    assert isinstance(layer, DoRA) and layer.per_output  # PEFT's own magnitude is per output


def test_comfy_text_encoder_names_with_lora_a_keys() -> None:
    g = torch.Generator().manual_seed(1)
    sd = {"diffusion_model.img_in.lora_A.weight": torch.randn(2, 4, generator=g),
          "diffusion_model.img_in.lora_B.weight": torch.randn(H, 2, generator=g),
          "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight":
              torch.randn(2, 32, generator=g),
          "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight":
              torch.randn(32, 2, generator=g),
          "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight":
              torch.randn(2, 32, generator=g),
          "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.lora_B.weight":
              torch.randn(32, 2, generator=g)}
    lora = lora_from_state_dict(sd, {})
    assert sorted(lora.layers) == ["text_encoder.encoder.layers.0.self_attn.q_proj",
                                   "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q",
                                   "transformer.x_embedder"] and lora.leftovers == []


def test_peft_patterns_name_one_module_where_a_path_ends_another(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """FLUX.1's top-level ``proj_out`` is also the end of every ``single_transformer_blocks.N.proj_out``: PEFT reads a
    ``rank_pattern`` key as a path's end and takes the first that matches, so a plain ``proj_out`` key gave the
    single blocks its rank (diffusers: size mismatch on load). Written ``^proj_out``, read back by lorakit too."""
    import json

    import lorakit
    from lorakit.files.io import load_file, save_file
    from lorakit.tools.convert import ConvertOptions, convert
    from tests.flux_factories import tiny_flux_pipeline

    g = torch.Generator().manual_seed(0)
    sd = {}
    for module, r, shape in (("final_layer_linear", 2, (4, H)), ("single_blocks_0_linear2", 4, (H, 5 * H)),
                             ("double_blocks_0_img_attn_proj", 4, (H, H))):
        sd |= {f"lora_unet_{module}.lora_down.weight": torch.randn(r, shape[1], generator=g),
               f"lora_unet_{module}.lora_up.weight": torch.randn(shape[0], r, generator=g),
               f"lora_unet_{module}.alpha": torch.tensor(3.0 if r == 2 else 1.0)}
    save_file(sd, tmp_path / "k.safetensors")
    convert(tmp_path / "k.safetensors", tmp_path / "p.safetensors", ConvertOptions("diffusers"))
    meta = json.loads(load_file(tmp_path / "p.safetensors")[1]["lora_adapter_metadata"])
    assert meta["transformer.rank_pattern"] == {"^proj_out": 2} and meta["transformer.alpha_pattern"] == {
        "^proj_out": 3.0}
    convert(tmp_path / "p.safetensors", tmp_path / "back.safetensors", ConvertOptions("kohya"))
    back = load_file(tmp_path / "back.safetensors")[0]
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    pipe = tiny_flux_pipeline()
    tr = pipe.transformer  # type: ignore[attr-defined]
    with lorakit.apply_loras({"transformer": tr}, [(tmp_path / "p.safetensors", 1.0)]):
        want = {n: p.detach().clone() for n, p in tr.named_parameters()}
    pipe.load_lora_weights(str(tmp_path / "p.safetensors"))  # type: ignore[attr-defined]
    pipe.fuse_lora(components=["transformer"])  # type: ignore[attr-defined]
    got = {n.replace(".base_layer", ""): p.detach() for n, p in tr.named_parameters() if "lora_" not in n}
    for name in ("proj_out.weight", "single_transformer_blocks.0.proj_out.weight"):
        assert torch.allclose(got[name], want[name], atol=1e-5), name
