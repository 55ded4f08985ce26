"""lorakit's merged weights equal LyCORIS's own, for every algorithm it offers, on full-size SD1.5 layers.

A full-size ``down_blocks.1`` of the SD1.5 UNet (Linear 640/768, GEGLU 640→5120, conv 3×3, conv 1×1, GroupNorm,
LayerNorm; 37 M parameters) is materialised with random weights; LyCORIS builds a network on it, the network's
file layout is written under kohya names (``lora_unet_down_blocks_1_…``, what LyCORIS' kohya wrapper writes),
lorakit reads it and fuses it into the UNet, and every changed weight is compared with LyCORIS' merge."""
from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.models.configs import build_components

from .lyco import file_state_dict, make_network, merged_weights

CASES = {
    "lora+conv": ("lora", dict(linear_dim=4, linear_alpha=2.0, conv_dim=4, conv_alpha=8.0)),
    "locon-tucker": ("lora", dict(linear_dim=4, linear_alpha=2.0, conv_dim=4, conv_alpha=2.0, use_tucker=True)),
    "loha": ("loha", dict(linear_dim=4, linear_alpha=2.0, conv_dim=4, conv_alpha=2.0)),
    "loha-tucker": ("loha", dict(linear_dim=4, linear_alpha=2.0, conv_dim=4, conv_alpha=2.0, use_tucker=True)),
    "lokr": ("lokr", dict(linear_dim=4, linear_alpha=4.0, conv_dim=4, conv_alpha=4.0)),
    "lokr-alpha": ("lokr", dict(linear_dim=4, linear_alpha=1.0, conv_dim=4, conv_alpha=2.0)),
    "lokr-full": ("lokr", dict(linear_dim=100000, linear_alpha=1.0, factor=8)),
    "lokr-tucker": ("lokr", dict(linear_dim=4, linear_alpha=4.0, conv_dim=4, conv_alpha=4.0, use_tucker=True,
                                 factor=4)),
    "ia3": ("ia3", dict(linear_dim=4, linear_alpha=1.0)),
    "glora": ("glora", dict(linear_dim=4, linear_alpha=2.0, conv_dim=4, conv_alpha=2.0)),
    "oft": ("diag-oft", dict(linear_dim=16, linear_alpha=1.0)),
    "oft-constrained-rescaled": ("diag-oft", dict(linear_dim=16, linear_alpha=1e-4, constraint=1e-4,
                                                  rescaled=True)),
    "boft": ("boft", dict(linear_dim=10, linear_alpha=1.0)),
    "full": ("full", dict(linear_dim=4, linear_alpha=1.0)),
    "dylora": ("dylora", dict(linear_dim=8, linear_alpha=4.0)),
    "lora+norms": ("lora", dict(linear_dim=4, linear_alpha=2.0, train_norm=True)),
    "dora-per-output": ("lora", dict(linear_dim=4, linear_alpha=2.0, conv_dim=4, conv_alpha=2.0, dora_wd=True)),
    "dora-per-input": ("lora", dict(linear_dim=4, linear_alpha=2.0, dora_wd=True, wd_on_output=False)),
    "doha": ("loha", dict(linear_dim=4, linear_alpha=4.0, dora_wd=True)),
    "dokr": ("lokr", dict(linear_dim=4, linear_alpha=4.0, dora_wd=True)),
}


@pytest.fixture(scope="module")
def unet() -> torch.nn.Module:
    unet = build_components("sd1")["unet"]
    block = unet.down_blocks[1]
    block.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05 + (1.0 if p.dim() == 1 else 0.0))
    return unet


@pytest.mark.parametrize("case", list(CASES))
def test_merged_weights_equal_lycoris(unet: torch.nn.Module, case: str) -> None:
    algo, kwargs = CASES[case]
    block = unet.down_blocks[1]
    net = make_network(block, algo, **kwargs)
    reference = merged_weights(net)
    sd = file_state_dict(net, rename=("lycoris_", "lora_unet_down_blocks_1_"))
    lora = lorakit.lora_from_state_dict(sd, {}, name=case)
    assert len(lora.layers) == len(reference) and not lora.leftovers
    with lorakit.apply_loras({"unet": unet}, [(lora, 1.0)], strict=True):
        for name, (w_ref, b_ref) in reference.items():
            module = _module(block, name)
            torch.testing.assert_close(module.weight.data, w_ref.to(module.weight.dtype), rtol=1e-4, atol=2e-6,
                                       msg=lambda m, n=name: f"{case} {n}: {m}")
            if b_ref is not None:
                torch.testing.assert_close(module.bias.data, b_ref, rtol=1e-4, atol=2e-6)


def _module(block: torch.nn.Module, lycoris_name: str) -> torch.nn.Module:
    from lorakit.keymap import unflatten

    return block.get_submodule(unflatten(lycoris_name[len("lycoris_"):]))
