"""The demo model on its whole frozen evaluation set (``lorakit.demo.evalset``, 324 prompts × seeds): accuracy per
attribute (colour, shape, count, size, position, background) and the confusions of the misses, with the default
sampler, steps and CFG (Euler a, 20, 7) unless told otherwise.

    python benchmarks/demo_eval.py                      # the shipped model
    python benchmarks/demo_eval.py --model-dir DIR      # a demo.safetensors + demo.json written elsewhere
    python benchmarks/demo_eval.py --slice --images out # the CI slice; save the pictures
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lorakit.demo import evalset
from lorakit.demo.evaluate import evaluate
from lorakit.demo.shapes import ATTRIBUTES
from lorakit.models.loading import demo_model, place_model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", type=Path, default=None, help="a folder with demo.safetensors + demo.json")
    p.add_argument("--slice", action="store_true", help="only the CI slice (every sixth case)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--cfg", type=float, default=None)
    p.add_argument("--sampler", default=None)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: tiny tensors, no stalls when busy)")
    p.add_argument("--images", type=Path, default=None, help="save each picture here")
    p.add_argument("--json", type=Path, default=None, help="write the accuracies and confusions here")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    cases = evalset.load()
    cases = evalset.ci_slice(cases) if a.slice else cases
    model = place_model(demo_model(a.model_dir), torch.device("cpu"), torch.float32)
    if a.images:
        a.images.mkdir(parents=True, exist_ok=True)

    def save(case: evalset.Case, image: Any) -> None:
        if a.images:
            image.save(a.images / f"{case.seed:05d}-{case.prompt.replace(' ', '_').replace(':', '')[:80]}.png")

    start = time.time()
    report = evaluate(model, cases, steps=a.steps, sampler=a.sampler, cfg=a.cfg, on_image=save)
    print(f"{len(cases)} cases, {time.time() - start:.0f}s; model {a.model_dir or 'shipped'}")
    print(report.table())
    if a.json:
        a.json.write_text(json.dumps({x: {"accuracy": report.accuracy(x), "right": report.right[x],
                                          "asked": report.asked[x],
                                          "confusions": {f"{e}->{g}": n for (e, g), n in
                                                         report.confusions[x].most_common()}}
                                      for x in ATTRIBUTES}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
