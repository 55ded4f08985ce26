from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from .factories import tiny_components

ROOT = Path(__file__).resolve().parents[1]
# Real LoRA files from the wild: ../shared/fixtures/real_loras beside the checkout (as in CI), or $LORAKIT_SHARED.
REAL_LORAS = Path(os.environ.get("LORAKIT_SHARED", ROOT.parent / "shared")) / "fixtures" / "real_loras"
if not REAL_LORAS.is_dir():
    raise RuntimeError(f"real LoRA fixtures not found at {REAL_LORAS}: check out shared/ beside the repository or "
                       "set LORAKIT_SHARED")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--fuzz", action="store_true", help="run the long fuzz tests (marker fuzz)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``fuzz`` run with ``--fuzz`` or when ``-m`` names the marker; otherwise they are skipped."""
    if config.getoption("--fuzz") or "fuzz" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="long fuzz run: use --fuzz or -m fuzz")
    for item in items:
        if "fuzz" in item.keywords:
            item.add_marker(skip)


# The suite is the CPU suite, also on a machine with a GPU (its references are CPU fp32); test_gpu.py asks for CUDA.
os.environ.setdefault("LORAKIT_DEVICE", "cpu")


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The library index and hash caches live under $XDG_CACHE_HOME: keep the tests' out of the user's."""
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture
def read_header_calls(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The files whose whole header the library summary parsed (those whose two ends did not vouch for them)."""
    from lorakit.library import summary

    calls: list[Path] = []
    real = summary.read_header

    def spy(path: Path) -> object:
        calls.append(Path(path))
        return real(path)

    monkeypatch.setattr(summary, "read_header", spy)
    return calls


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


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny FLUX.1 pipeline saved as a diffusers folder (tests/flux_factories.py), once per session."""
    from tests.flux_factories import tiny_flux_pipeline

    path = tmp_path_factory.mktemp("tinyflux") / "tinyflux"
    tiny_flux_pipeline().save_pretrained(path)  # type: ignore[attr-defined]
    return path


@pytest.fixture(scope="session")
def tiny_chroma_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Chroma pipeline saved as a diffusers folder (tests/chroma_factories.py), once per session."""
    from tests.chroma_factories import tiny_chroma_pipeline

    path = tmp_path_factory.mktemp("tinychroma") / "tinychroma"
    tiny_chroma_pipeline().save_pretrained(path)  # type: ignore[attr-defined]
    return path


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen-Image pipeline saved as a diffusers folder (tests/qwen_factories.py), once per session."""
    from tests.qwen_factories import tiny_qwen_pipeline

    path = tmp_path_factory.mktemp("tinyqwen") / "tinyqwen"
    tiny_qwen_pipeline().save_pretrained(path)  # type: ignore[attr-defined]
    return path


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SDXL pipeline (tests/factories.py) saved as a diffusers folder, once per session."""
    from tests.factories import tiny_sdxl_pipeline

    path = tmp_path_factory.mktemp("tinysdxl") / "tinysdxl"
    tiny_sdxl_pipeline().save_pretrained(path)  # type: ignore[attr-defined]
    return path
