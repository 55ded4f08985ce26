"""The demo model on its whole frozen evaluation set (``lorakit.demo.evalset``, 324 prompts × seeds): accuracy per
attribute (colour, shape, count, size, position, background) and the confusions of the misses, with the default
sampler, steps and CFG (Euler a, 20, 7) unless told otherwise.

    python benchmarks/demo_eval.py                      # the shipped model
    python benchmarks/demo_eval.py --model-dir DIR      # a demo.safetensors + demo.json written elsewhere
    python benchmarks/demo_eval.py --slice --images out # the CI slice; save the pictures
    python benchmarks/demo_eval.py --vae-round-trip     # the VAE alone: each case's scene rendered, encode → decode
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
from lorakit.demo.classify import classify
from lorakit.demo.shapes import ATTRIBUTES, COUNT_WORDS, Scene, render
from lorakit.models.loading import demo_model, place_model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", type=Path, default=None, help="a folder with demo.safetensors + demo.json")
    p.add_argument("--slice", action="store_true", help="only the CI slice (every twelfth case)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--cfg", type=float, default=None)
    p.add_argument("--sampler", default=None)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: tiny tensors, no stalls when busy)")
    p.add_argument("--images", type=Path, default=None, help="save each picture here")
    p.add_argument("--json", type=Path, default=None, help="write the accuracies and confusions here")
    p.add_argument("--vae-round-trip", action="store_true",
                   help="judge the VAE alone: each case's expected scene rendered, encoded and decoded")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    cases = evalset.load()
    cases = evalset.ci_slice(cases) if a.slice else cases
    model = place_model(demo_model(a.model_dir), torch.device("cpu"), torch.float32)
    if a.vae_round_trip:
        right = vae_round_trip(model.pipe.vae, cases)
        print(f"{len(cases)} scenes through the VAE of {a.model_dir or 'the shipped model'}: "
              + ", ".join(f"{x} {right[x] / len(cases):.3f}" for x in ATTRIBUTES))
        return 0
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


def scene_of(expect: dict[str, str | None]) -> Scene:
    """The scene a case asks for (an unnamed background: white, or gray under a white shape)."""
    count = {word: n for n, word in COUNT_WORDS.items()}[str(expect["count"])]
    background = expect["background"] or ("gray" if expect["colour"] == "white" else "white")
    return Scene(str(expect["shape"]), str(expect["colour"]), background, str(expect["size"]),
                 str(expect["position"]), count)


@torch.no_grad()
def vae_round_trip(vae: Any, cases: list[evalset.Case]) -> dict[str, int]:
    """Per attribute, how many cases' rendered scenes the classifier still judges right after encode → decode."""
    import numpy as np
    from PIL import Image

    right = dict.fromkeys(ATTRIBUTES, 0)
    scenes = [scene_of(c.expect) for c in cases]
    for i in range(0, len(scenes), 48):
        batch = scenes[i:i + 48]
        x = torch.from_numpy(np.stack([np.asarray(render(s), np.float32) for s in batch]) / 127.5 - 1)
        x = x.permute(0, 3, 1, 2).to(vae.device, vae.dtype)
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample.float().clamp(-1, 1)
        pixels = ((rec + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        for scene, px in zip(batch, pixels):
            got = classify(Image.fromarray(px)).attributes()
            for attribute, want in scene.attributes().items():
                right[attribute] += int(got[attribute] == want)
    return right


if __name__ == "__main__":
    raise SystemExit(main())
