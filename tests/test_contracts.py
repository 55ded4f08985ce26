"""Each network type's full shape contract, tested per leaf: every leaf of every type, perturbed in shape, is refused
(``InvalidLora`` at load or ``IncompatibleLora`` at apply) and leaves the weights bit-identical — never a torch
error halfway through a patch. Perturbations that keep the values' layout (a flattened or unsqueezed factor) may be
accepted, and then must patch exactly what the unperturbed file does."""
from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch

import lorakit

from .factories import KINDS, adapter_tensors, kohya_name, tiny_components

LAYERS = {  # out ≠ in everywhere, so a swapped axis cannot pass by accident
    "linear": "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k",  # (64, 32)
    "conv3x3": "unet.down_blocks.1.resnets.0.conv1",  # (64, 32, 3, 3)
    "conv1x1": "unet.down_blocks.1.resnets.0.conv_shortcut",  # (64, 32, 1, 1)
}
SCALARS = ("alpha", "scale", "on_input")
# Valid by the type's own contract: one more BOFT stage is still a butterfly when the block count allows it.
STILL_VALID = {("boft", "oft_blocks", 0)}
Perturb = tuple[str, Callable[[torch.Tensor], torch.Tensor]]


@pytest.fixture(scope="module")
def model() -> dict[str, torch.nn.Module]:
    return tiny_components("sd1")


def _grow(t: torch.Tensor, axis: int) -> torch.Tensor:
    shape = list(t.shape)
    shape[axis] += 1
    return torch.randn(shape).to(t.dtype) * 0.1


def _refusing(t: torch.Tensor) -> Iterator[Perturb]:
    """Perturbations that break any contract: one more along an axis, an empty axis, a 0-d factor, swapped axes."""
    for axis in range(t.dim()):
        yield f"grow{axis}", lambda x, a=axis: _grow(x, a)
        yield f"empty{axis}", lambda x, a=axis: x.narrow(a, 0, 0)
    if t.numel() > 1:
        yield "0-d", lambda x: x.flatten()[0].clone()
    if t.dim() >= 2 and t.shape[0] != t.shape[1]:
        yield "swap01", lambda x: x.transpose(0, 1).contiguous()


def _keeping(t: torch.Tensor) -> Iterator[Perturb]:
    """Perturbations that keep the values' layout (row-major): flattened trailing axes, unsqueezed trailing axes."""
    if t.dim() >= 3:
        yield "flatten", lambda x: x.reshape(x.shape[0], -1)
    if t.dim() >= 1:
        yield "unsqueeze", lambda x: x.reshape(*x.shape, 1, 1)


def _apply(model: dict[str, torch.nn.Module], path: str, leaves: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The patched weight of ``path``, or ``None`` when refused (the weights then bit-identical to before)."""
    module = model["unet"].get_submodule(path.split(".", 1)[1])
    before = module.weight.detach().clone(), None if module.bias is None else module.bias.detach().clone()
    sd = {f"{kohya_name(path)}.{leaf}": t for leaf, t in leaves.items()}
    try:
        lora = lorakit.lora_from_state_dict(sd, {}, name="p")
        with lorakit.apply_loras(model, [lora]):
            return module.weight.detach().clone()
    except (lorakit.InvalidLora, lorakit.IncompatibleLora):
        return None
    finally:
        assert torch.equal(module.weight.detach(), before[0])
        assert before[1] is None or torch.equal(module.bias.detach(), before[1])


def _cases(kind: str) -> list[tuple[str, str, int]]:
    """(layer, canonical path, rank): every kind on a Linear and conv layers; GLoRA also on conv_in with in < r."""
    cases = [(name, path, 4) for name, path in LAYERS.items()]
    return cases + [("conv_in", "unet.conv_in", 8)] if kind.startswith("glora") else cases


@pytest.mark.parametrize("kind", KINDS)
def test_every_leaf_perturbed_is_refused_or_exact(model: dict[str, torch.nn.Module], kind: str) -> None:
    checked = 0
    for layer, path, rank in _cases(kind):
        module = model["unet"].get_submodule(path.split(".", 1)[1])
        base = adapter_tensors(kind, tuple(module.weight.shape), rank=rank)
        expected = _apply(model, path, base)
        assert expected is not None, f"{kind} on {layer}: the unperturbed layer must apply"
        for leaf, t in base.items():
            if leaf in SCALARS:
                got = _apply(model, path, {**base, leaf: t.reshape(1).repeat(2)})
                assert got is None, f"{kind} {layer}: a vector {leaf} was accepted"
                continue
            for name, change in _refusing(t):
                axis = int(name[-1]) if name[-1].isdigit() else -1
                got = _apply(model, path, {**base, leaf: change(t)})
                allowed = (kind.split("-")[0], leaf, axis) in STILL_VALID and name.startswith("grow")
                assert got is None or allowed, f"{kind} {layer}: {leaf} {name} {tuple(change(t).shape)} accepted"
                checked += 1
            for name, change in _keeping(t):
                got = _apply(model, path, {**base, leaf: change(t)})
                assert got is None or torch.equal(got, expected), f"{kind} {layer}: {leaf} {name} patched differently"
                checked += 1
    assert checked > 0


def test_norm_shapes(model: dict[str, torch.nn.Module]) -> None:
    path = "unet.down_blocks.1.resnets.0.norm1"  # GroupNorm(…, 32): weight and bias (32,)
    base = adapter_tensors("norm", (32, 32))
    assert _apply(model, path, base) is not None
    for leaf, t in base.items():
        for name, change in _refusing(t):
            assert _apply(model, path, {**base, leaf: change(t)}) is None, f"norm {leaf} {name} accepted"


def test_lora_on_a_norm_layer_is_refused_not_a_torch_error(model: dict[str, torch.nn.Module]) -> None:
    """A LoRA keyed to a 1-d GroupNorm weight: the Linear/Conv types say it does not fit."""
    for kind in ("lora", "loha", "lokr", "glora", "ia3", "oft", "dora-out"):
        assert _apply(model, "unet.down_blocks.1.resnets.0.norm1", adapter_tensors(kind, (32, 32))) is None, kind
