"""Library scan benchmark: N synthetic LoRA files with realistic headers, cold and warm scans.

Files are sparse (real header, full apparent size, no data on disk): the scan reads headers only, so this is
what it meets in a real folder. Mix: 70 % kohya SD1.5 LoRA (792 tensors), 20 % kohya SDXL LoRA (2,958 tensors),
10 % SD1.5 LoCon with convolutions; all with kohya training metadata incl. a 300-tag ``ss_tag_frequency``; a
third have a preview PNG and an A1111 ``NAME.json``; 100 files per folder.

    python benchmarks/library_scan.py [--files 10000] [--dir /tmp/lorakit-bench-lib]
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import struct
import tempfile
import time
from pathlib import Path

from lorakit.library import Library

TE_MODS = ["self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2"]
BLOCK_MODS = ["attn1_to_q", "attn1_to_k", "attn1_to_v", "attn1_to_out_0", "attn2_to_q", "attn2_to_k", "attn2_to_v",
              "attn2_to_out_0", "ff_net_0_proj", "ff_net_2"]


def sd15_modules(conv: bool) -> list[tuple[str, int, int, int]]:
    """(kohya module name, out, in, kernel)."""
    mods = [(f"lora_te_text_model_encoder_layers_{i}_{m}", 768, 768, 1) for i in range(12) for m in TE_MODS]
    blocks = [(f"down_blocks_{b}_attentions_{a}", c) for b, c in enumerate((320, 640, 1280)) for a in (0, 1)]
    blocks += [("mid_block_attentions_0", 1280)]
    blocks += [(f"up_blocks_{b}_attentions_{a}", c) for b, c in ((1, 1280), (2, 640), (3, 320)) for a in (0, 1, 2)]
    for name, c in blocks:
        mods += [(f"lora_unet_{name}_proj_in", c, c, 1), (f"lora_unet_{name}_proj_out", c, c, 1)]
        mods += [(f"lora_unet_{name}_transformer_blocks_0_{m}", c, 768 if "attn2_to_k" in m or "attn2_to_v" in m
                  else c, 1) for m in BLOCK_MODS]
    if conv:
        mods += [(f"lora_unet_down_blocks_{b}_resnets_{r}_conv{k}", c, c, 3) for b, c in enumerate((320, 640, 1280))
                 for r in (0, 1) for k in (1, 2)]
    return mods


def sdxl_modules() -> list[tuple[str, int, int, int]]:
    mods = [(f"lora_te1_text_model_encoder_layers_{i}_{m}", 768, 768, 1) for i in range(12) for m in TE_MODS]
    mods += [(f"lora_te2_text_model_encoder_layers_{i}_{m}", 1280, 1280, 1) for i in range(32) for m in TE_MODS]
    attns = [("input_blocks_4_1", 640, 2), ("input_blocks_5_1", 640, 2), ("input_blocks_7_1", 1280, 10),
             ("input_blocks_8_1", 1280, 10), ("middle_block_1", 1280, 10)]
    attns += [(f"output_blocks_{i}_1", 1280, 10) for i in range(3)] + [(f"output_blocks_{i}_1", 640, 2)
                                                                        for i in range(3, 6)]
    for name, c, depth in attns:
        mods += [(f"lora_unet_{name}_proj_in", c, c, 1), (f"lora_unet_{name}_proj_out", c, c, 1)]
        mods += [(f"lora_unet_{name}_transformer_blocks_{d}_{m}", c, 2048 if "attn2_to_k" in m or "attn2_to_v" in m
                  else c, 1) for d in range(depth) for m in BLOCK_MODS]
    return mods


def header(mods: list[tuple[str, int, int, int]], rank: int, rng: random.Random, i: int) -> tuple[bytes, int]:
    tensors, offset = {}, 0
    for name, out, inp, k in mods:
        shapes = {"lora_down.weight": [rank, inp] + ([k, k] if k > 1 else []),
                  "lora_up.weight": [out, rank] + ([1, 1] if k > 1 else []), "alpha": []}
        for leaf in sorted(shapes):
            n = 2
            for s in shapes[leaf]:
                n *= s
            tensors[f"{name}.{leaf}"] = {"dtype": "F16", "shape": shapes[leaf], "data_offsets": [offset, offset + n]}
            offset += n
    tags = {f"tag{t}_{rng.randrange(10 ** 6)}": rng.randrange(1, 300) for t in range(300)}
    meta = {"ss_output_name": f"style_{i}", "ss_network_module": "networks.lora", "ss_network_dim": str(rank),
            "ss_network_alpha": str(rank / 2), "ss_tag_frequency": json.dumps({"10_style": tags}),
            "ss_dataset_dirs": json.dumps({"10_style": {"n_repeats": 10, "img_count": 40}}),
            **{f"ss_setting_{j}": str(rng.random()) for j in range(40)}}
    text = json.dumps({"__metadata__": meta, **tensors}, separators=(",", ":")).encode()
    return struct.pack("<Q", len(text)) + text, offset


def make_library(root: Path, n: int) -> None:
    rng = random.Random(0)
    kinds = {"sd15": sd15_modules(False), "sdxl": sdxl_modules(), "locon": sd15_modules(True)}
    for i in range(n):
        kind = "sdxl" if i % 10 in (1, 5) else "locon" if i % 10 == 7 else "sd15"
        folder = root / f"folder_{i // 100:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        head, data = header(kinds[kind], 32, rng, i)
        path = folder / f"{kind}_{i:05d}.safetensors"
        with path.open("wb") as f:
            f.write(head)
            f.truncate(len(head) + data)
        if i % 3 == 0:
            (folder / f"{path.stem}.preview.png").write_bytes(b"\x89PNG\r\n\x1a\n")
            (folder / f"{path.stem}.json").write_text(json.dumps({"activation text": f"style{i}",
                                                                  "preferred weight": 0.8}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="lorakit-bench-lib-"))
    index = root / "index.sqlite3"
    lib_dir = root / "loras"
    if not lib_dir.is_dir():
        t = time.perf_counter()
        make_library(lib_dir, args.files)
        print(f"made {args.files} files in {time.perf_counter() - t:.1f} s under {lib_dir}")
    t = time.perf_counter()
    for p in lib_dir.rglob("*.safetensors"):  # page cache warm: what is measured is lorakit's work, not the disk
        with p.open("rb") as f:
            f.read(8 + struct.unpack("<Q", f.read(8))[0])
    print(f"read every header once (page cache): {time.perf_counter() - t:.2f} s")
    index.unlink(missing_ok=True)
    for label in ("cold (empty index)", "warm (nothing changed)", "warm (nothing changed)"):
        t = time.perf_counter()
        lib = Library([lib_dir], index=index)
        print(f"{label:<28} {time.perf_counter() - t:7.3f} s  {lib.last_scan}")
    for p in sorted(lib_dir.rglob("*.safetensors"))[::100]:
        p.touch()
    t = time.perf_counter()
    lib.refresh()
    print(f"{'re-scan, 1 % touched':<28} {time.perf_counter() - t:7.3f} s  {lib.last_scan}")
    bases: dict[str, int] = {}
    for e in lib.entries:
        bases[e.base + "/" + ",".join(e.info["types"])] = bases.get(e.base + "/" + ",".join(e.info["types"]), 0) + 1
    print("detected:", bases)
    if not args.dir:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
