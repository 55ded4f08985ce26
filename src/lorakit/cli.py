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


def _generate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .infotext import save_png
    from .library import EmbeddingIndex, LoraIndex
    from .models import load_model
    from .pipeline import Generator, Request
    from .settings import load_settings

    settings = load_settings(args.config)
    prompts = _prompts(args)
    model = load_model(args.model or settings.model)
    embedding_dirs = args.embeddings_dir or settings.embedding_dirs
    generator = Generator(model, LoraIndex(args.lora_dir or settings.lora_dirs),
                          EmbeddingIndex(embedding_dirs) if embedding_dirs else None)
    out = Path(args.output)
    many = len(prompts) > 1 or args.batch > 1
    n = 0
    try:
        for prompt in prompts:
            req = Request(prompt, args.negative, args.steps, args.cfg, args.sampler, args.seed, args.width,
                          args.height, args.batch, args.clip_skip)
            result = generator(req)
            for image, text in zip(result.images, result.infotexts):
                n += 1
                path = out.with_name(f"{out.stem}-{n:04d}{out.suffix}") if many else out
                path.parent.mkdir(parents=True, exist_ok=True)
                save_png(image, path, text)
                print(f"{path}\n{text}\n")
    finally:
        generator.close()
    return 0


def _prompts(args: argparse.Namespace) -> list[str]:
    if args.prompts_file:
        from pathlib import Path

        try:
            lines = Path(args.prompts_file).read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise LorakitError(f"{args.prompts_file}: cannot read prompts file ({e.strerror})") from None
        prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        if not prompts:
            raise LorakitError(f"{args.prompts_file}: no prompts in the file")
        return prompts
    if not args.prompt:
        raise LorakitError("give a prompt, or --prompts-file")
    return [args.prompt]


def _add_generate(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("generate", help="generate images; LoRAs from <lora:NAME:W> tags in the prompt")
    p.add_argument("prompt", nargs="?", help="the prompt, LoRA tags included")
    p.add_argument("-n", "--negative", default="", help="negative prompt (LoRA tags work here too)")
    p.add_argument("-m", "--model", help="a diffusers model folder; default: the embedded demo model")
    p.add_argument("-l", "--lora-dir", action="append", help="LoRA folder (repeatable); also $LORAKIT_LORA_DIRS "
                                                             "or lora_dirs in lorakit.toml")
    p.add_argument("-e", "--embeddings-dir", action="append", help="textual-inversion embeddings folder "
                                                                   "(repeatable; also embedding_dirs in lorakit.toml)")
    p.add_argument("--steps", type=int, help="sampling steps (default 20; 6 with an LCM LoRA)")
    p.add_argument("--cfg", type=float, help="CFG scale (default 7; 1.5 with an LCM LoRA)")
    p.add_argument("--sampler", help="Euler, Euler a (default), DPM++ 2M, DPM++ 2M Karras, DDIM, UniPC, LCM")
    p.add_argument("--seed", type=int, help="seed (default random; image i of a batch uses seed+i)")
    p.add_argument("-W", "--width", type=int, default=512)
    p.add_argument("-H", "--height", type=int, default=512)
    p.add_argument("--batch", type=int, default=1, help="images per prompt")
    p.add_argument("--clip-skip", type=int, help="text-encoder layer from the end (default 1, or the LoRA's "
                                                 "ss_clip_skip)")
    p.add_argument("--prompts-file", help="one prompt per line, each with its own LoRAs; # starts a comment")
    p.add_argument("-o", "--output", default="lorakit.png", help="PNG path; numbered when there are several")
    p.add_argument("--config", help="settings file (default ./lorakit.toml, then ~/.config/lorakit/config.toml)")
    p.set_defaults(func=_generate, verbose_default=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", description="LoRA support for Stable Diffusion.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="show what a LoRA file is: format, type, base, rank, trigger words, hashes")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--json", action="store_true", help="machine-readable output (schema lorakit.inspect/1)")
    p.add_argument("--strict", action="store_true", help="fail on keys lorakit does not understand")
    p.set_defaults(func=_inspect)
    _add_generate(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    chatty = args.verbose or getattr(args, "verbose_default", False)
    logging.basicConfig(level=logging.INFO if chatty else logging.WARNING, format="%(message)s")
    for noisy in ("diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        return int(args.func(args))
    except LorakitError as e:
        print(f"lorakit: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
