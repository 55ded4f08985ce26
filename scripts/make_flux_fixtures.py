"""A FLUX.1 LoRA ``.safetensors`` from a key → shape listing (``tests/fixtures/flux_listings/<name>.json``): seeded
random values with the listing's keys, shapes and metadata.

``--tiny`` scales it to the tiny FLUX of ``tests/flux_factories.py`` (2 double and 3 single blocks, h 32,
mlp 128; CLIP and T5 of width 32, 2 layers): 3072→32, 12288→128, 9216→96, 21504→224, 15360→160, 6144→64,
18432→192, T5's 4096→32 and d_ff 10240→37, CLIP's 768→32 and MLP 3072→37, img_in/proj_out 64→4, control img_in
128→8, q/k norm scales 128→16, ranks capped at 8; modules of blocks the tiny models lack are dropped
(``--double``/``--single`` set the counts). The rules live in ``tests/flux_fixtures.py`` (the tests use them too).

Usage::

    python scripts/make_flux_fixtures.py kohya out.safetensors --tiny --seed 0
    python scripts/make_flux_fixtures.py tests/fixtures/flux_listings/control.json control.safetensors  # full size
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DTYPES = ("float32", "float16", "bfloat16")


def main() -> None:
    import torch
    from safetensors.torch import save_file

    from tests.flux_fixtures import Tiny, listing_names, load_listing, random_state_dict, tiny_shapes

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("listing", help=f"a listing name ({', '.join(listing_names())}) or a .json path")
    ap.add_argument("out", type=Path)
    ap.add_argument("--tiny", action="store_true", help="scale to the tiny FLUX of tests/flux_factories.py")
    ap.add_argument("--double", type=int, default=Tiny.double, help="double blocks kept with --tiny")
    ap.add_argument("--single", type=int, default=Tiny.single, help="single blocks kept with --tiny")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=DTYPES, default="float32")
    args = ap.parse_args()
    listing = load_listing(args.listing)
    shapes = listing["shapes"]
    if args.tiny:
        shapes = tiny_shapes(shapes, Tiny(double=args.double, single=args.single))
    sd = random_state_dict(shapes, args.seed, getattr(torch, args.dtype))
    save_file(sd, str(args.out), metadata=listing["metadata"] or None)
    print(f"{args.out}: {len(sd)} tensors from {listing['source']}")


if __name__ == "__main__":
    main()
