"""The tool commands of ``lorakit``: merge, bake, extract, resize, convert (``add_tool_commands`` registers them).

Every command prints its report; ``--dry-run`` computes it and writes nothing; ``--json`` prints it as JSON.
Outputs go to a temporary name and are renamed when complete; an output that would replace an input is refused.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import ToolError
from .output import parse_dtype
from .report import ToolReport
from .svd import RankRule

DYNAMIC = ("sv_ratio", "sv_fro", "sv_cumulative")


def add_tool_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    _add_merge(sub)
    _add_bake(sub)
    _add_extract(sub)
    _add_resize(sub)
    _add_convert(sub)


def _common(p: argparse.ArgumentParser, output_help: str = "output .safetensors file") -> None:
    p.add_argument("-o", "--output", help=output_help + " (required unless --dry-run)")
    p.add_argument("--dry-run", action="store_true", help="compute and print the report; write nothing")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def _rank_flags(p: argparse.ArgumentParser, rank_help: str) -> None:
    p.add_argument("--rank", type=int, help=rank_help)
    p.add_argument("--sv-ratio", type=float, help="keep σ ≥ σ_max/T (per layer; --rank then caps)")
    p.add_argument("--sv-fro", type=float, help="keep the fewest σ whose share of ‖ΔW‖_F is ≥ T (e.g. 0.99)")
    p.add_argument("--sv-cumulative", type=float, help="keep the fewest σ whose share of Σσ is ≥ T")
    p.add_argument("--conv-rank", type=int, help="rank (or cap) for 3×3 convolutions; 0 leaves them out")


def _rule(args: argparse.Namespace, default_rank: int | None) -> RankRule | None:
    given = [m for m in DYNAMIC if getattr(args, m) is not None]
    if len(given) > 1:
        raise ToolError(f"give one of --sv-ratio, --sv-fro, --sv-cumulative, not {len(given)}")
    if given:
        return RankRule(given[0], getattr(args, given[0]), max_rank=args.rank, conv_rank=args.conv_rank)
    rank = args.rank if args.rank is not None else default_rank
    return None if rank is None else RankRule("rank", rank, conv_rank=args.conv_rank)


def _output(args: argparse.Namespace) -> Path | None:
    if args.output is None and not args.dry_run:
        raise ToolError(f"{args.command}: give -o OUTPUT (or --dry-run to see the report only)")
    return Path(args.output) if args.output is not None else None  # "" is "." (a folder: refused), not "none"


def _device(args: argparse.Namespace) -> str:
    """``--device``, checked: one that is unknown or not on this machine is a ``DeviceError`` before any work."""
    from ..models.device import resolve_device

    return str(resolve_device(args.device))


def _print(report: ToolReport, args: argparse.Namespace) -> int:
    print(json.dumps(report.as_json(), indent=2) if args.json else report.text())
    return 0


def _merge(args: argparse.Namespace) -> int:
    from .merge import MergeOptions, merge

    opts = MergeOptions(args.method, _rule(args, None), args.base, parse_dtype(args.dtype), _device(args),
                        args.dry_run, args.conv_rank)
    return _print(merge(args.loras, _output(args), opts), args)


def _add_merge(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("merge", help="merge LoRAs into one file (exact concat, or SVD to a rank)")
    p.add_argument("loras", nargs="+", metavar="FILE[:WEIGHTS]",
                   help="a LoRA and its weight in the prompt syntax: a.safetensors:0.7, b.safetensors:te=0.5:unet=1, "
                        "c.safetensors:1:lbw=OUTD")
    _common(p)
    p.add_argument("--method", choices=["concat", "svd"], help="concat: exact, ranks add up (default when every "
                                                               "layer is LoRA/LoCon); svd: any types, to a rank")
    _rank_flags(p, "svd: the rank (default: the sum of the input ranks, lossless for LoRA inputs)")
    p.add_argument("--base", help="base model (folder or single file) for DoRA/OFT/IA3/GLoRA layers (svd)")
    p.add_argument("--dtype", help="fp32, fp16 or bf16 (default: the inputs')")
    p.add_argument("--device", default="cpu", help="where the SVDs run (cpu, cuda, mps)")
    p.set_defaults(func=_merge)


def _bake(args: argparse.Namespace) -> int:
    from .bake import BakeOptions, bake

    return _print(bake(args.model, args.loras, _output(args), BakeOptions(dry_run=args.dry_run, requant=args.requant)),
                  args)


def _add_bake(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("bake", help="fuse LoRAs into a base model (same form and dtype; bit-identical to apply)",
                       description="Quantized bases: an fp8 / scaled-fp8 base keeps its unchanged layers and writes "
                       "the changed ones in bf16; a FLUX.1 GGUF base is written as a bf16 .safetensors file in its own "
                       "key layout (changed layers: the weights apply_loras computes on it in bf16; unchanged "
                       "quantized tensors dequantized to bf16, F32/F16 ones as stored), or with --requant as a .gguf "
                       "of its own types (lossy; each layer's loss reported).")
    p.add_argument("model", metavar="MODEL", help="a diffusers model folder, a .safetensors single file or a FLUX.1 "
                   ".gguf file")
    p.add_argument("loras", nargs="+", metavar="FILE[:WEIGHTS]", help="LoRAs and weights, as for merge")
    p.add_argument("--requant", action="store_true", help="GGUF base only: write a .gguf, each changed layer "
                   "requantized to its own type (Q8_0, Q5_0/1, Q4_0/1, BF16; K-quants are refused: gguf has no "
                   "quantizer for them) with the share of the LoRA kept and the error reported per layer; without "
                   "it the output is bf16 .safetensors, exact")
    _common(p, "output folder (for a folder model), .safetensors file (.gguf with --requant)")
    p.set_defaults(func=_bake)


def _extract(args: argparse.Namespace) -> int:
    from .extract import ExtractOptions, extract

    rule = _rule(args, 32)
    assert rule is not None  # a default rank is given
    comps = tuple(c.strip() for c in args.components.split(",") if c.strip())
    opts = ExtractOptions(rule, comps, args.min_diff, not args.no_norms, parse_dtype(args.dtype), _device(args),
                          args.dry_run)
    return _print(extract(args.base, args.tuned, _output(args), opts), args)


def _add_extract(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("extract", help="a LoRA from the difference of a fine-tuned model and its base")
    p.add_argument("base", metavar="BASE", help="the base model (folder, .safetensors, or a FLUX.1 .gguf: its "
                   "quantized weights read dequantized in bf16, the values a base loaded in bf16 computes with)")
    p.add_argument("tuned", metavar="TUNED", help="the fine-tuned model")
    _common(p)
    _rank_flags(p, "the rank (default 32; with --sv-*, the cap)")
    p.add_argument("--components", default="unet,te", help="unet (the UNet or FLUX.1's transformer), te or both "
                                                            "(default unet,te)")
    p.add_argument("--min-diff", type=float, default=0.0, help="leave out (and report) layers whose largest "
                                                               "change is below this (default 0: none)")
    p.add_argument("--no-norms", action="store_true", help="report changed norm layers instead of writing them")
    p.add_argument("--dtype", help="fp32, fp16 or bf16 (default: the tuned model's)")
    p.add_argument("--device", default="cpu", help="where the SVDs run (cpu, cuda, mps)")
    p.set_defaults(func=_extract)


def _resize(args: argparse.Namespace) -> int:
    from .resize import ResizeOptions, resize

    rule = _rule(args, None)
    if rule is None:
        raise ToolError("resize: give --rank R, --sv-ratio T, --sv-fro T or --sv-cumulative T")
    opts = ResizeOptions(rule, parse_dtype(args.dtype), _device(args), args.dry_run)
    return _print(resize(args.input, _output(args), opts), args)


def _add_resize(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("resize", help="change a LoRA's rank (fixed or per layer), keeping its strength")
    p.add_argument("input", metavar="IN", help="the LoRA file")
    _common(p)
    _rank_flags(p, "the rank (with --sv-*, the cap); a rank ≥ a layer's own leaves it unchanged")
    p.add_argument("--dtype", help="fp32, fp16 or bf16 (default: each layer's own)")
    p.add_argument("--device", default="cpu", help="where the SVDs run (cpu, cuda, mps)")
    p.set_defaults(func=_resize)


def _convert(args: argparse.Namespace) -> int:
    from .convert import ConvertOptions, convert

    ldm = None if args.names is None else args.names == "ldm"
    opts = ConvertOptions(args.to, ldm, args.drop_unsupported, args.dry_run)
    return _print(convert(args.input, _output(args), opts), args)


def _add_convert(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("convert", help="convert a LoRA between kohya, PEFT, diffusers and ComfyUI (FLUX.1) files, "
                                       "losslessly")
    p.add_argument("input", metavar="IN", help="the LoRA file (any dialect lorakit reads)")
    _common(p)
    p.add_argument("--to", required=True, choices=["kohya", "peft", "diffusers", "comfy"],
                   help="the target format (comfy: FLUX.1 / SD3 files in ComfyUI's BFL / SAI PEFT names)")
    p.add_argument("--names", choices=["ldm", "diffusers"], help="kohya UNet names (default: ldm for SDXL, as "
                                                                  "sd-scripts writes; diffusers otherwise)")
    p.add_argument("--drop-unsupported", action="store_true", help="leave out (and report) what the target "
                                                                   "cannot hold instead of failing")
    p.set_defaults(func=_convert)
