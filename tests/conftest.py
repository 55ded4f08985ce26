from __future__ import annotations

import pytest
import torch

from .factories import tiny_components


@pytest.fixture
def tiny() -> dict[str, torch.nn.Module]:
    return tiny_components("sd1")


@pytest.fixture
def tiny_xl() -> dict[str, torch.nn.Module]:
    return tiny_components("sdxl")


def snapshot(components: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    return {f"{c}.{n}": p.detach().clone() for c, m in components.items() for n, p in m.named_parameters()}


def assert_original(components: dict[str, torch.nn.Module], snap: dict[str, torch.Tensor]) -> None:
    for c, m in components.items():
        for n, p in m.named_parameters():
            assert torch.equal(p.detach(), snap[f"{c}.{n}"]), f"{c}.{n} differs from the original"
