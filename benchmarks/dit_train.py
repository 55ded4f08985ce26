"""``lorakit train`` on the tiny Chroma and Qwen-Image models of the tests: the loss over both pictures of the
tests' data at fixed noise and σ before and after training, and seconds per step (``docs/training.md``,
"Families").

    python benchmarks/dit_train.py             # 10 steps, rank 4, α 2, batch 2, LoRA and LoKr on each family
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import PeakRss  # noqa: F401 — also puts the repository on sys.path

from lorakit.models.loading import load_model
from lorakit.train.flow import FlowSpec
from lorakit.train.flux_loop import trainer_for
from tests.chroma_factories import tiny_chroma_pipeline
from tests.qwen_factories import tiny_qwen_pipeline
from tests.test_dit_train import _cfg, _hooked_loss, draw_data

RUNS: list[tuple[str, str, dict[str, Any]]] = [
    ("chroma", "lora", {"net_kw": {"t5": True}, "lr": 1e-2, "flow": FlowSpec(max_sequence_length=16)}),
    ("chroma", "lokr", {"net_kw": {"train": "unet"}, "lr": 1e-2, "flow": FlowSpec(max_sequence_length=16)}),
    ("qwen", "lora", {"lr": 3e-2}), ("qwen", "lokr", {"lr": 3e-2})]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "data").mkdir()
        pictures = draw_data(root / "data")
        for name, make in (("chroma", tiny_chroma_pipeline), ("qwen", tiny_qwen_pipeline)):
            make().save_pretrained(root / name)  # type: ignore[attr-defined]
        print("| family | network | loss before → after | s/step |\n|---|---|---|---|")
        for name, kind, kw in RUNS:
            model = load_model(str(root / name), device="cpu", dtype="fp32")
            trainer = trainer_for(_cfg(pictures, root / f"{name}_{kind}.safetensors", kind, steps=args.steps, **kw),
                                  model)
            before = _hooked_loss(trainer)
            start = time.perf_counter()
            trainer.run(progress=False)
            per_step = (time.perf_counter() - start) / args.steps
            print(f"| {name} | {kind} | {before:.2f} → {_hooked_loss(trainer):.2f} | {per_step:.2f} |")


if __name__ == "__main__":
    main()
