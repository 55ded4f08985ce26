"""Every FLUX.1 dialect listing of a real file (``tests/fixtures/flux_listings``), scaled to the tiny FLUX
(``flux_fixtures.tiny_shapes``, the ``--tiny`` path of ``scripts/make_flux_fixtures.py``), written as a
``.safetensors`` file with seeded values, loaded and applied: every layer lands on a module, fused equals hooks
(transformer and text-encoder outputs), restore gives back every weight exactly."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lorakit import apply_loras, load_lora, restore
from lorakit.lora_model import LoraModel
from tests.flux_factories import tiny_flux_components, transformer_forward
from tests.flux_fixtures import FLUX_BASES, load_listing, random_state_dict, tiny_shapes

Components = dict[str, torch.nn.Module]
STRENGTH = 0.8
# A control LoRA's widened img_in is told by its full-size width (128 inputs); at tiny size (8) the file shows a
# dev-family LoRA (its guidance layers) only.
TINY_BASES = {"control": "flux-1-dev"}


@pytest.fixture(scope="module")
def models() -> dict[str, Components]:
    """A tiny dev model (4 latent channels) and a tiny control model (4 + 4 in, 4 out)."""
    return {"flux": tiny_flux_components(seed=5),
            "control": tiny_flux_components(seed=5, in_channels=8, out_channels=4)}


def write_tiny_fixture(name: str, folder: Path, seed: int = 0) -> Path:
    """``scripts/make_flux_fixtures.py <name> --tiny``: the listing at tiny size, seeded values, its metadata."""
    listing = load_listing(name)
    path = folder / f"{name}.safetensors"
    save_file(random_state_dict(tiny_shapes(listing["shapes"]), seed), str(path), metadata=listing["metadata"] or None)
    return path


def _outputs(components: Components, lora: LoraModel) -> dict[str, torch.Tensor]:
    """The outputs of the transformer and of each text encoder the LoRA changes, on fixed inputs."""
    tr = components["transformer"]
    x = torch.randn(1, 4, tr.config.in_channels, generator=torch.Generator().manual_seed(1))
    out = {"transformer": transformer_forward(tr, x)}
    ids = torch.tensor([[49406, 320, 1125, 539, 49407]])
    with torch.no_grad():
        for name in ("text_encoder", "text_encoder_2"):
            if name in lora.modules_per_component():
                out[name] = components[name](input_ids=ids).last_hidden_state
    return out


def _params(components: Components) -> dict[str, torch.Tensor]:
    return {f"{c}.{n}": p.detach().clone() for c, m in components.items() for n, p in m.named_parameters()}


@pytest.mark.parametrize("name", sorted(FLUX_BASES))
def test_tiny_fixture_of_every_listing_applies_fused_equal_hooks_and_restores(
        models: dict[str, Components], tmp_path: Path, name: str) -> None:
    lora = load_lora(write_tiny_fixture(name, tmp_path))
    assert lora.leftovers == [] and lora.arch == "flux1" and lora.base == TINY_BASES.get(name, FLUX_BASES[name])
    components = models["control" if name == "control" else "flux"]
    before = _params(components)
    with apply_loras(components, [(lora, STRENGTH)]) as applied:
        report = applied.reports[0]
        assert report.unmatched == [] and report.patched == lora.modules_per_component()
        changed = {k.rsplit(".", 1)[0] for k, p in _params(components).items() if not torch.equal(p, before[k])}
        assert changed >= set(lora.layers), sorted(set(lora.layers) - changed)[:5]
        fused = _outputs(components, lora)
    with apply_loras(components, [(lora, STRENGTH)], mode="hooks"):
        hooks = _outputs(components, lora)
    assert all(torch.equal(p, before[k]) for k, p in _params(components).items())
    plain = _outputs(components, lora)
    for part, out in fused.items():
        assert torch.allclose(out, hooks[part], rtol=1e-4, atol=1e-5), (part, (out - hooks[part]).abs().max())
        assert not torch.allclose(out, plain[part], atol=1e-3), f"{part}: the LoRA changed nothing"
    restore(components)
