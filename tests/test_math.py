"""Tier 1: for every network type × Linear / Conv 1×1 / Conv 3×3 × fp32/fp16/bf16, the hook's output change equals
running the layer with W + ΔW."""
from __future__ import annotations

import pytest
import torch

from lorakit.adapters import build_adapter
from lorakit.adapters import functional as fn

from .factories import KINDS, adapter_tensors

LAYERS = {
    "linear": lambda: torch.nn.Linear(24, 36),
    "conv1x1": lambda: torch.nn.Conv2d(24, 36, 1),
    "conv3x3": lambda: torch.nn.Conv2d(24, 36, 3, padding=1, stride=2),
}
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-2, 2e-2), torch.bfloat16: (8e-2, 8e-2)}


def _input(layer: str, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 24, generator=g) if layer == "linear" else torch.randn(2, 24, 6, 6, generator=g)
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("kind", KINDS)
def test_hook_equals_weight_delta(kind: str, layer: str, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    module = LAYERS[layer]().to(dtype)
    w32 = module.weight.detach().float()
    adapter, rest = build_adapter(adapter_tensors(kind, tuple(module.weight.shape)), "test.layer")
    assert adapter is not None and rest == []
    assert adapter.shape_error(module.weight.shape) is None
    strength = 0.7
    x = _input(layer, dtype)
    delta = adapter.delta(w32, strength)
    assert delta.shape == w32.shape and delta.abs().sum() > 0
    bias = module.bias.detach().float()
    db = adapter.bias_delta(strength)
    expected = fn.module_op(module, x.float(), w32 + delta, bias + (db if db is not None else 0))
    with torch.no_grad():
        got = module(x) + adapter.hook_output(module, x, w32, strength)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(got.float(), expected, rtol=rtol, atol=atol * float(expected.abs().max()))


@pytest.mark.parametrize("layer", ["group", "layer"])
def test_norm_layers(layer: str) -> None:
    module = torch.nn.GroupNorm(4, 16) if layer == "group" else torch.nn.LayerNorm(16)
    adapter, _ = build_adapter(adapter_tensors("norm", (16, 16)), "n")
    x = torch.randn(2, 16, 3, 3) if layer == "group" else torch.randn(2, 5, 16)
    w, b = module.weight.detach(), module.bias.detach()
    patched = fn.module_op(module, x, w + adapter.delta(w, 0.5), b + adapter.bias_delta(0.5))
    with torch.no_grad():
        torch.testing.assert_close(module(x) + adapter.hook_output(module, x, w, 0.5), patched)


@pytest.mark.parametrize("kind", ["lora", "loha", "lokr-decomposed", "full", "ia3", "glora"])
def test_linear_types_scale_with_strength(kind: str) -> None:
    w = torch.randn(36, 24)
    adapter, _ = build_adapter(adapter_tensors(kind, (36, 24)), "x")
    torch.testing.assert_close(adapter.delta(w, 0.3) * 2, adapter.delta(w, 0.6))


def test_lora_formula_by_hand() -> None:
    up, down = torch.randn(6, 2), torch.randn(2, 5)
    adapter, _ = build_adapter({"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(1.0)}, "x")
    torch.testing.assert_close(adapter.delta(torch.zeros(6, 5), 0.8), 0.8 * 0.5 * up @ down)


def test_explicit_scale_replaces_alpha_over_rank() -> None:
    up, down = torch.randn(6, 2), torch.randn(2, 5)
    adapter, _ = build_adapter({"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(1.0),
                                "scale": torch.tensor(3.0)}, "x")
    torch.testing.assert_close(adapter.delta(torch.zeros(6, 5), 1.0), 3.0 * up @ down)


def test_dyn_uses_first_ranks_with_full_rank_scale() -> None:
    up, down = torch.randn(6, 4), torch.randn(4, 5)
    adapter, _ = build_adapter({"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(2.0)}, "x")
    torch.testing.assert_close(adapter.delta(torch.zeros(6, 5), 1.0, dyn=2), 0.5 * up[:, :2] @ down[:2])


def test_dora_conventions_told_apart_by_shape() -> None:
    """The same magnitudes read per output vs per input give different weights; neither is broadcast wrongly."""
    w = torch.randn(8, 8)
    base = adapter_tensors("lora", (8, 8))
    mag = 1 + torch.rand(8)
    out_ad, _ = build_adapter({**base, "dora_scale": mag.reshape(8, 1)}, "x")
    in_ad, _ = build_adapter({**base, "dora_scale": mag.reshape(1, 8)}, "x")
    w_out = w + out_ad.delta(w, 1.0)
    w_in = w + in_ad.delta(w, 1.0)
    torch.testing.assert_close(w_out.norm(dim=1), mag)  # each output row has its magnitude
    torch.testing.assert_close(w_in.norm(dim=0), mag)  # each input column has its magnitude
    assert not torch.allclose(w_out, w_in)
    torch.testing.assert_close(out_ad.delta(w, 0.0), torch.zeros_like(w))


def test_old_lycoris_oft_diag_is_the_rotation_itself() -> None:
    """LyCORIS ≤ 2.x saved R (not B) as ``oft_diag``; identity blocks change nothing, a permutation permutes."""
    w = torch.randn(4, 3)
    identity, _ = build_adapter({"oft_diag": torch.eye(2).repeat(2, 1, 1)}, "x")
    torch.testing.assert_close(identity.delta(w, 1.0), torch.zeros_like(w))
    swap = torch.tensor([[0.0, 1.0], [1.0, 0.0]]).repeat(2, 1, 1)
    permuted, _ = build_adapter({"oft_diag": swap}, "x")
    torch.testing.assert_close(w + permuted.delta(w, 1.0), w[[1, 0, 3, 2]])
    torch.testing.assert_close(permuted.delta(w, 0.5), 0.5 * permuted.delta(w, 1.0))


def test_oft_constraint_limits_the_rotation() -> None:
    """With constraint c the skew matrix Q is scaled to ‖Q‖ = c·out when larger (kohya/LyCORIS)."""
    w = torch.randn(4, 3)
    blocks = torch.randn(2, 2, 2)
    free, _ = build_adapter({"oft_blocks": blocks, "alpha": torch.tensor(0.0)}, "x")
    tight, _ = build_adapter({"oft_blocks": blocks, "alpha": torch.tensor(1e-3)}, "x")
    assert tight.delta(w, 1.0).norm() < 0.05 * free.delta(w, 1.0).norm()


@pytest.mark.parametrize("kind", ["glora", "glora-old"])
def test_glora_layout_when_input_width_equals_rank(kind: str) -> None:
    """conv_in (32, 4, 3, 3) with rank 4: a1 is square, the b1/b2 chain still tells the layouts apart."""
    w = torch.randn(32, 4, 3, 3)
    adapter, _ = build_adapter(adapter_tensors(kind, tuple(w.shape), rank=4), "conv_in")
    assert adapter.old_layout == (kind == "glora-old")
    assert adapter.shape_error(w.shape) is None and adapter.delta(w, 1.0).shape == w.shape


@pytest.mark.parametrize("module", [torch.nn.Conv2d(4, 32, 3, padding=1), torch.nn.Linear(4, 32)],
                         ids=["conv_in", "linear"])
def test_glora_with_input_narrower_than_rank_equals_lycoris(module: torch.nn.Module) -> None:
    """conv_in has 4 input channels; GLoRA of rank 8 on it (a1 (4, 8), a2 (8, 4), b1 (32, 8), b2 (8, 4, 3, 3)) is
    read in the new layout with rank 8 and applied exactly as LyCORIS merges it."""
    from lycoris.modules.glora import GLoRAModule

    ref = GLoRAModule("lycoris_x", module, 1.0, lora_dim=8, alpha=4.0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    merged, _ = ref.get_merged_weight(multiplier=1.0, shape=module.weight.shape, device=torch.device("cpu"))
    adapter, rest = build_adapter({k: v.detach().clone() for k, v in ref.state_dict().items()}, "x")
    assert rest == [] and adapter.rank == 8 and not adapter.old_layout
    assert adapter.shape_error(module.weight.shape) is None
    w = module.weight.detach()
    torch.testing.assert_close(w + adapter.delta(w, 1.0), merged.detach(), rtol=1e-5, atol=1e-6)


def test_loha_factors_of_different_ranks() -> None:
    """Each Hadamard factor is a product of its own pair; their ranks need not agree (α/r uses w1's)."""
    g = torch.Generator().manual_seed(0)
    w1a, w1b, w2a, w2b = (torch.randn(s, generator=g) for s in ((6, 4), (4, 5), (6, 2), (2, 5)))
    adapter, _ = build_adapter({"hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b,
                                "alpha": torch.tensor(2.0)}, "x")
    assert adapter.shape_error(torch.Size((6, 5))) is None
    torch.testing.assert_close(adapter.delta(torch.zeros(6, 5), 1.0), 0.5 * (w1a @ w1b) * (w2a @ w2b))


def test_flattened_lokr_factor_is_the_same_change() -> None:
    """LoKr's w2_b may hold a conv's (in₂, kh, kw) flattened to in₂·kh·kw columns: the same ΔW."""
    t = adapter_tensors("lokr-decomposed", (36, 24, 3, 3))
    flat = {**t, "lokr_w2_b": t["lokr_w2_b"].reshape(t["lokr_w2_b"].shape[0], -1)}
    w = torch.randn(36, 24, 3, 3)
    a, _ = build_adapter(t, "x")
    b, _ = build_adapter(flat, "x")
    assert b.shape_error(w.shape) is None
    torch.testing.assert_close(b.delta(w, 1.0), a.delta(w, 1.0))
    assert b.shape_error(torch.Size((36, 24, 2, 2))) is not None  # 54 columns are no whole 2×2 kernels


@pytest.mark.parametrize("kind", KINDS)
def test_delta_is_made_on_the_device_of_its_tensors(kind: str) -> None:
    """Every tensor the math makes is created beside its inputs: with factors and weight on the ``meta`` device
    (standing in for CUDA/MPS; scalars stay on the CPU, as ``patch.placement`` keeps them), any tensor made on the
    CPU would fail to combine."""
    for shape in ((36, 24), (36, 24, 3, 3)):
        leaves = {k: v if v.dim() == 0 else v.to("meta") for k, v in adapter_tensors(kind, shape).items()}
        adapter, _ = build_adapter(leaves, "x")
        for strength in (1.0, 0.7):
            d = adapter.delta(torch.empty(shape, device="meta"), strength)
            assert d.device.type == "meta" and d.shape == shape
