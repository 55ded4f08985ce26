"""``bake`` and ``extract`` on a GGUF FLUX.1 at full width (hidden 3072; default 1 double + 2 single blocks), CPU:
a BFL-named GGUF file (Q8_0 / Q4_K as valid random blocks, as city96's layout: ``x_embedder``'s 64 inputs dense for
K-quants, norms and biases F32) and a rank-16 kohya LoRA on every block layer, the embedders and the final layer.
Rows: ``bake`` to bf16 safetensors, ``bake --requant`` (Q8_0: K-quants are refused), ``extract`` of the base vs its
bf16 bake at rank 16 — wall time, peak RSS over the process at start (the tools read a tensor at a time: it should
stay near one layer's transients, whatever the model's size; anonymous memory apart, since the GGUF file's mapped
pages count in RSS too), file sizes, and for requant the share of ΔW kept (mean, worst) and the relative error it
reports. ``--single 1`` against ``--single 4``: a peak that does not grow with the model is per-layer.

Run with nothing else busy:  python benchmarks/gguf_tools.py [--quant Q8_0 Q4_K] [--double 1 --single 2]
"""
from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import PeakRss
from flux import make_file
from quant import quantized_model

from lorakit.files.io import save_file
from lorakit.tools.bake import BakeOptions, bake
from lorakit.tools.extract import ExtractOptions, extract
from lorakit.tools.report import ToolReport
from lorakit.tools.svd import RankRule
from tests.flux_factories import bfl_state


def write_base(kind: str, double: int, single: int, tmp: Path) -> tuple[Path, Path]:
    """The GGUF base in BFL names (fused rows stacked from the layers' raw blocks) and the LoRA."""
    import gguf

    tr = quantized_model(kind, double, single, torch.bfloat16, random_blocks=True)
    lora = tmp / "lora.safetensors"
    save_file(make_file(tr, "lora", 16, 1, double, single), lora)
    writer = gguf.GGUFWriter(path=None, arch="flux")
    for name, t in bfl_state(tr, double, single).items():
        if hasattr(t, "quant_type"):
            writer.add_tensor(name, t.as_tensor().contiguous().numpy(), raw_dtype=t.quant_type)
        else:
            writer.add_tensor(name, t.detach().float().numpy())
    path = tmp / f"flux-{kind}.gguf"
    writer.write_header_to_file(path=str(path))
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    del tr, writer
    gc.collect()
    return path, lora


class PeakAnon(PeakRss):
    """``PeakRss`` counting anonymous memory only (``RssAnon``: the GGUF file's memory-mapped pages, which the
    reader maps and the kernel can drop at will, are left out)."""

    def __init__(self) -> None:
        super().__init__()
        self.start = self.peak = anon()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, anon())
            time.sleep(0.002)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, anon())


def anon() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


def timed(run: Any) -> tuple[ToolReport, float, int, int]:
    """The tool's report, seconds, peak RSS and peak anonymous RSS over the start."""
    with PeakRss() as peak, PeakAnon() as peak_anon:
        t0 = time.perf_counter()
        report = run()
        seconds = time.perf_counter() - t0
    return report, seconds, peak.peak_over, peak_anon.peak_over


def rows(kind: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    base, lora = write_base(kind, args.double, args.single, tmp)
    mib = 2 ** 20
    out: dict[str, Any] = {"quant": kind, "gguf_MiB": round(base.stat().st_size / mib)}
    baked = tmp / f"baked-{kind}.safetensors"
    report, s, peak, peak_anon = timed(lambda: bake(base, [f"{lora}:0.8"], baked))
    out |= {"bake_s": round(s, 1), "bake_peak_MiB": round(peak / mib), "bake_peak_anon_MiB": round(peak_anon / mib),
            "baked_MiB": round(baked.stat().st_size / mib), "layers": len(report.layers)}
    if "requant" in args.rows and kind in ("Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1"):
        requant = tmp / f"requant-{kind}.gguf"
        report, s, peak, peak_anon = timed(lambda: bake(base, [f"{lora}:0.8"], requant, BakeOptions(requant=True)))
        kept = [float(r.note.split("requantized ")[1].split(": ")[1].split("%")[0]) for r in report.layers]
        out |= {"requant_s": round(s, 1), "requant_peak_MiB": round(peak / mib),
                "requant_peak_anon_MiB": round(peak_anon / mib),
                "requant_kept_mean_%": round(sum(kept) / len(kept), 1), "requant_kept_worst_%": min(kept),
                "requant_error_%": round(100 * report.per_component()["transformer"], 2)}
        requant.unlink()
    x = tmp / f"x-{kind}.safetensors"
    if "extract" in args.rows:
        report, s, peak, peak_anon = timed(lambda: extract(base, baked, x, ExtractOptions(
            RankRule("rank", 16), components=("transformer",))))
        out |= {"extract_s": round(s, 1), "extract_peak_MiB": round(peak / mib),
                "extract_peak_anon_MiB": round(peak_anon / mib),
                "extract_error_%": round(100 * report.per_component()["transformer"], 3)}
    for f in (base, baked, x, lora):
        f.unlink(missing_ok=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quant", nargs="+", default=["Q8_0", "Q4_K"], help="Q8_0, Q4_K, … (random valid blocks)")
    ap.add_argument("--double", type=int, default=1)
    ap.add_argument("--single", type=int, default=2)
    ap.add_argument("--rows", default="bake,requant,extract", help="which rows (bake always runs: extract reads it)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        for kind in args.quant:
            print(json.dumps(rows(kind, args, Path(d))), flush=True)


if __name__ == "__main__":
    main()
