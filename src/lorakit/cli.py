"""The ``lorakit`` command: a thin shell over the library. Errors print one line and exit 2."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from .errors import LorakitError


def _inspect(args: argparse.Namespace) -> int:
    from .describe import as_text, describe
    from .lora_model import load_lora

    for i, path in enumerate(args.files):
        info = describe(path, load_lora(path, strict=args.strict))
        if args.json:
            print(json.dumps(info, indent=2))
        else:
            print(("\n" if i else "") + as_text(info))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", description="LoRA support for Stable Diffusion.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="show what a LoRA file is: format, type, base, rank, trigger words, hashes")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--json", action="store_true", help="machine-readable output (schema lorakit.inspect/1)")
    p.add_argument("--strict", action="store_true", help="fail on keys lorakit does not understand")
    p.set_defaults(func=_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return int(args.func(args))
    except LorakitError as e:
        print(f"lorakit: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
