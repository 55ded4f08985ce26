"""lorakit against diffusers' own FLUX.1 loader (``FluxPipeline.load_lora_weights`` + ``fuse_lora``, PEFT) on the
tiny FLUX, with the listings of real files at tiny size: the transformer weights agree within fp32 rounding wherever
diffusers converts correctly at any size (ROUND3_NOTES §1.7: diffusers/PEFT files, XLabs, kohya double blocks — its
kohya converter asserts on a tiny single block). Where diffusers is known to be wrong, the difference is written
down: each of those tests fails the day diffusers is fixed, and then becomes a parity case."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from lorakit import apply_loras, lora_from_state_dict
from tests.flux_factories import bfl_lora, bfl_table, kohya_keys, reference_deltas, tiny_flux_transformer
from tests.flux_fixtures import load_listing, random_state_dict, tiny_shapes

StateDict = dict[str, torch.Tensor]
SEED = 5


def _tiny_listing(name: str, keep: Callable[[str], bool] = lambda k: True) -> StateDict:
    return {k: v for k, v in random_state_dict(tiny_shapes(load_listing(name)["shapes"])).items() if keep(k)}


def tiny_pipeline() -> Any:
    """A FluxPipeline of the tiny transformer and a tiny VAE, no text encoders (prompts come as embeddings)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline

    vae = AutoencoderKL(block_out_channels=(4,), layers_per_block=1, latent_channels=1, norm_num_groups=1,
                        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=tiny_flux_transformer(SEED))


def _weights(pipe: Any) -> StateDict:
    return {k: v.detach().clone() for k, v in pipe.transformer.state_dict().items()}


def diffusers_fused(sd: StateDict) -> StateDict:
    """The tiny transformer's weights after diffusers loads ``sd`` into the pipeline and fuses it (scale 1)."""
    pipe = tiny_pipeline()
    pipe.load_lora_weights({k: v.clone() for k, v in sd.items()})
    pipe.fuse_lora()
    pipe.unload_lora_weights()  # keeps the fused weights, drops PEFT's wrappers
    return _weights(pipe)


def lorakit_fused(sd: StateDict) -> StateDict:
    """The same with ``lorakit.apply_loras(pipe, …)``."""
    pipe = tiny_pipeline()
    with apply_loras(pipe, [(lora_from_state_dict(sd, {}), 1.0)]):
        return _weights(pipe)


def _assert_close(ours: StateDict, theirs: StateDict) -> None:
    assert ours.keys() == theirs.keys()
    for k, v in ours.items():
        assert (v - theirs[k]).abs().max() <= 1e-6 * max(1.0, float(v.abs().max())), k


def _changed(weights: StateDict) -> set[str]:
    base = tiny_flux_transformer(SEED).state_dict()
    return {k.rsplit(".", 1)[0] for k, v in weights.items() if not torch.equal(v, base[k])}


def _renamed(sd: StateDict, old: str, new: str, leaves: dict[str, str] | None = None) -> StateDict:
    out = {}
    for k, v in sd.items():
        for a, b in (leaves or {}).items():
            k = k.replace(a, b)
        out[new + k[len(old):] if k.startswith(old) else k] = v
    return out


def _double(k: str) -> bool:
    return "double_blocks" in k


# (lorakit's file, what diffusers is given: the same file, or the same LoRA in a dialect diffusers reads)
CASES: dict[str, Callable[[], tuple[StateDict, StateDict]]] = {
    "diffusers": lambda: (sd := _tiny_listing("diffusers"), sd),
    "diffusers_no_proj_mlp": lambda: (sd := _tiny_listing("diffusers_no_proj_mlp"), sd),
    "diffusers_norm_out (embedders, guidance, norm_out)": lambda: (sd := _tiny_listing("diffusers_norm_out"), sd),
    "xlabs": lambda: (sd := _tiny_listing("xlabs"), sd),
    "kohya double blocks": lambda: (sd := _tiny_listing("kohya", _double), sd),
    # diffusers reads base_model.model. keys as fal Kontext's BFL names (KeyError on diffusers names): given
    # the same tensors under transformer.
    "diffusers_base_model": lambda: (sd := _tiny_listing("diffusers_base_model"),
                                     _renamed(sd, "base_model.model.", "transformer.")),
    # BFL-PEFT (diffusion_model. + lora_A) has no diffusers path; its ComfyUI kohya-suffix twin has
    "aitoolkit double blocks": lambda: (sd := _tiny_listing("aitoolkit", _double), _renamed(
        sd, "", "", {".lora_A.weight": ".lora_down.weight", ".lora_B.weight": ".lora_up.weight"})),
    # diffusers drops dora_scale (below): compared without it
    "onetrainer without dora_scale": lambda: (sd := _tiny_listing(
        "onetrainer_dora", lambda k: k.startswith("lora_transformer_") and not k.endswith(".dora_scale")), sd),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_transformer_weights_equal_diffusers_fused(case: str) -> None:
    ours, theirs = CASES[case]()
    lorakit_weights = lorakit_fused(ours)
    assert _changed(lorakit_weights)  # the LoRA does something
    _assert_close(lorakit_weights, diffusers_fused(theirs))


# -- where diffusers 0.42 is wrong (ROUND3_NOTES §1.4) ---------------------------------------------------------------
def test_diffusers_drops_kohya_embedder_and_final_layer_lora() -> None:
    """Its kohya converter writes these keys without ``transformer.`` and they are dropped silently; lorakit applies
    them as the independent fused reference says (the final adaLN's halves swapped)."""
    tr = tiny_flux_transformer(SEED)
    heads = ("img_in", "txt_in", "time_in.in_layer", "vector_in.out_layer", "final_layer.linear",
             "final_layer.adaLN_modulation.1")
    layers = bfl_lora(tr, lambda bfl: "lora" if bfl in heads or bfl == "double_blocks.0.img_attn.proj" else None)
    sd = kohya_keys(layers)
    theirs, ours = diffusers_fused(sd), lorakit_fused(sd)
    top = {"x_embedder", "context_embedder", "time_text_embed.timestep_embedder.linear_1",
           "time_text_embed.text_embedder.linear_2", "proj_out", "norm_out.linear"}
    assert _changed(theirs) == {"transformer_blocks.0.attn.to_out.0"}  # only the block layer
    assert _changed(ours) == top | {"transformer_blocks.0.attn.to_out.0"}
    base = tr.state_dict()
    for bfl in heads:
        for module, delta in reference_deltas(tr, bfl, layers[bfl], 1.0, bfl_table(2, 3)).items():
            assert torch.allclose(ours[f"{module}.weight"], base[f"{module}.weight"] + delta, atol=1e-6), module


def test_diffusers_drops_onetrainer_dora_scale() -> None:
    """diffusers applies an OneTrainer DoRA file as the plain LoRA without its magnitudes (a warning only)."""
    sd = _tiny_listing("onetrainer_dora", lambda k: k.startswith("lora_transformer_"))
    plain = {k: v for k, v in sd.items() if not k.endswith(".dora_scale")}
    theirs, ours = diffusers_fused(sd), lorakit_fused(sd)
    _assert_close(theirs, lorakit_fused(plain))
    q = "transformer_blocks.0.attn.to_q.weight"
    assert (ours[q] - theirs[q]).abs().max() > 1e-2


def test_diffusers_cannot_read_bfl_peft_or_base_model_diffusers_names() -> None:
    """ai-toolkit's BFL-PEFT names load as nothing (a warning); PEFT ``base_model.model.`` + diffusers names raise
    KeyError (read as fal Kontext's BFL names). lorakit applies both (parity cases above)."""
    assert _changed(diffusers_fused(_tiny_listing("aitoolkit", _double))) == set()
    with pytest.raises(KeyError, match="base_model.model.double_blocks"):
        diffusers_fused(_tiny_listing("diffusers_base_model"))
