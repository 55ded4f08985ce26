"""Fuzzing the file readers with hypothesis: mutated factory-made and real LoRA files (``tests/file_mutations.py``)
go through ``load_lora``, ``describe`` (``lorakit inspect``), the library summary and ``apply_loras`` on a tiny model,
fused and in hooks mode with a forward pass. Only ``LorakitError``s may escape, and after every apply, failed or
restored, each weight is ``torch.equal`` to the original.

A few hundred cases run in the normal suite (derandomized: the same cases every run); ``--fuzz`` / ``-m fuzz`` runs
``FULL`` random cases, each through every target. The memory test runs the two known memory bombs and fuzzed files
in a subprocess whose address space may grow by at most 2 GiB (measured on the CPU test machine: ``import torch``
needs 0.6 GiB of address space, torch + lorakit + the tiny model 0.95 GiB, so the limit is the process's own size
after those imports plus 2 GiB — the *increase* is what is bounded)."""
from __future__ import annotations

import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import lorakit
from lorakit.describe import describe
from lorakit.library.summary import summarise
from lorakit.patch.targets import find_module

from .conftest import ROOT, assert_original, snapshot
from .factories import kohya_name, tiny_components
from .file_mutations import make_case

FAST, FULL = 300, 10_000
T = TypeVar("T")


@pytest.fixture(scope="module")
def model() -> tuple[dict[str, torch.nn.Module], dict[str, torch.Tensor]]:
    c = tiny_components("sd1")
    return c, snapshot(c)


def _lorakit_only(f: Callable[..., T], *args: object) -> T | None:
    """``f(*args)``, or ``None`` when it raises a ``LorakitError``; any other exception fails the test."""
    try:
        return f(*args)
    except lorakit.LorakitError:
        return None


def _forward_layers(components: dict[str, torch.nn.Module], lora: lorakit.LoraModel) -> None:
    """Run every module the LoRA hooks on a random input (a whole UNet forward costs 100× more)."""
    for path in lora.layers:
        module = find_module(components, path)
        if isinstance(module, torch.nn.Linear):
            x = torch.randn(2, module.in_features)
        elif isinstance(module, torch.nn.Conv2d):
            x = torch.randn(1, module.in_channels, 6, 6)
        elif isinstance(module, torch.nn.GroupNorm):
            x = torch.randn(1, module.num_channels, 4, 4)
        elif isinstance(module, torch.nn.LayerNorm):
            x = torch.randn(2, *module.normalized_shape)
        else:
            continue
        with torch.no_grad():
            module(x)


def check_file(path: Path, components: dict[str, torch.nn.Module]) -> None:
    """Every target on one file. The parameters of the layers the LoRA names (all an apply can change) are compared
    after each apply; ``run`` compares the whole model once more at the end."""
    lora = _lorakit_only(lorakit.load_lora, path)
    _lorakit_only(describe, path)
    _lorakit_only(summarise, path)
    if lora is None:
        return
    modules = [m for m in (find_module(components, p) for p in lora.layers) if m is not None]
    before = [(p, p.detach().clone()) for m in modules for p in m.parameters(recurse=False)]
    for mode in ("fused", "hooks"):
        try:
            with lorakit.apply_loras(components, [lora], mode=mode):
                if mode == "hooks":
                    _forward_layers(components, lora)
        except lorakit.LorakitError:
            pass
        assert all(torch.equal(p.detach(), b) for p, b in before), f"{path.name}: a weight changed ({mode})"


def run(model: tuple[dict[str, torch.nn.Module], dict[str, torch.Tensor]], folder: Path, cases: int) -> None:
    options = settings(max_examples=cases, deadline=None, database=None, derandomize=cases == FAST,
                       suppress_health_check=list(HealthCheck))

    @options
    @given(st.randoms(use_true_random=False))
    def check(rng: random.Random) -> None:
        check_file(make_case(rng, folder, "case"), model[0])

    check()
    assert_original(*model)


def test_files_fuzz_fast(model: tuple[dict[str, torch.nn.Module], dict[str, torch.Tensor]], tmp_path: Path) -> None:
    run(model, tmp_path, FAST)


@pytest.mark.fuzz
def test_files_fuzz(model: tuple[dict[str, torch.nn.Module], dict[str, torch.Tensor]], tmp_path: Path) -> None:
    run(model, tmp_path, FULL)


# --- bounded memory --------------------------------------------------------------------------------------------------

def cloneofsimo_bomb(path: Path) -> Path:
    """A few hundred bytes (the file found by fuzzing had 712): text-encoder layer 4·10⁹ — the reader once built a
    table of that many module names (5.7 GB)."""
    save_file({"text_encoder:4000000000:up": torch.zeros(1, 1), "text_encoder:4000000000:down": torch.zeros(1, 1)},
              str(path))
    return path


def loha_tucker_bomb(path: Path) -> Path:
    """13 KB: a LoHa-Tucker layer whose ``hada_t1`` is 2-D; the first factor then fits the 32×32 weight, and the
    second (core (1, 1, 32, 32), w2_a (1, 1000), w2_b (1, 1000)) was rebuilt to 10⁹ values (4 GB)."""
    g = torch.Generator().manual_seed(0)
    leaves = {"hada_t1": torch.ones(1, 1), "hada_w1_a": torch.randn(1, 32, generator=g),
              "hada_w1_b": torch.randn(1, 32, generator=g), "hada_t2": torch.randn(1, 1, 32, 32, generator=g),
              "hada_w2_a": torch.randn(1, 1000, generator=g), "hada_w2_b": torch.randn(1, 1000, generator=g)}
    name = kohya_name("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    save_file({f"{name}.{k}": v for k, v in leaves.items()}, str(path))
    return path


LIMITED = r"""
import re, resource, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
import lorakit
from lorakit.describe import describe
from lorakit.library.summary import summarise
from lorakit.patch.targets import find_module
from tests.factories import tiny_components

model = tiny_components("sd1")
torch.ones(64, 64) @ torch.ones(64, 64)  # thread pool and allocator up before the size is taken
size = int(re.search(r"VmSize:\s+(\d+) kB", open("/proc/self/status").read())[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (size + (2 << 30), resource.getrlimit(resource.RLIMIT_AS)[1]))
try:
    torch.empty(3 << 28)  # 3 GiB of fp32: must fail, or the limit is not in force
    print("LIMIT NOT IN FORCE")
except (RuntimeError, MemoryError):
    pass
for path in map(Path, sys.argv[1:]):
    try:
        for target in (describe, summarise):
            try:
                target(path)
            except lorakit.LorakitError:
                pass
        with lorakit.apply_loras(model, [lorakit.load_lora(path)]):
            pass
        print("applied", path)
    except lorakit.LorakitError as e:
        print("refused", path, type(e).__name__, str(e)[:300].replace(chr(10), " "))
    except BaseException as e:
        print("ESCAPED", path, type(e).__name__, str(e)[:300].replace(chr(10), " "))
"""


def test_memory_bombs_and_fuzzed_files_under_a_2_gib_limit(tmp_path: Path) -> None:
    bombs = [cloneofsimo_bomb(tmp_path / "te_index.safetensors"), loha_tucker_bomb(tmp_path / "t1_2d.safetensors")]
    assert bombs[0].stat().st_size < 1_000 and bombs[1].stat().st_size < 14_000
    fuzzed = [make_case(random.Random(i), tmp_path, f"fuzz{i}") for i in range(40)]
    run_ = subprocess.run([sys.executable, "-c", LIMITED, *map(str, bombs + fuzzed)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=False)
    lines = run_.stdout.splitlines()
    assert run_.returncode == 0 and "LIMIT NOT IN FORCE" not in lines, run_.stdout + run_.stderr[-3000:]
    assert len(lines) == len(bombs) + len(fuzzed), run_.stdout + run_.stderr[-3000:]
    assert not [line for line in lines if line.startswith("ESCAPED")], run_.stdout
    assert lines[0].startswith(f"refused {bombs[0]} InvalidLora") and "index 4000000000 beyond" in lines[0]
    assert lines[1].startswith(f"refused {bombs[1]} InvalidLora") and "hada_t1" in lines[1]
