"""The ``lorakit`` command: a thin shell over the library. Errors print one line and exit 2."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Before torch loads (every torch import here is lazy): OpenMP threads that wait by sleeping, not spinning. On a
# busy CPU, spinning threads take the time the working one needs — `lorakit train` on the demo model with another
# job running: 5.3 s/step with 2 spinning threads, 0.40 s/step passive, 0.74 s/step with 1 thread (docs/training.md);
# on an idle CPU passive costs ~4 %. OMP_WAIT_POLICY set by the user wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .errors import LorakitError  # noqa: E402
from .keymap.arch import LORA_BASES, Arch  # noqa: E402
from .keymap.detection import FLUX1_VARIANTS  # noqa: E402

if TYPE_CHECKING:
    from .generate.init_image import InitImage

MAX_PROMPTS_BYTES = 16 * 2 ** 20  # --prompts-file: a prompt a line


def _inspect(args: argparse.Namespace) -> int:
    """Each file in turn: a bad one is one error line (stderr) and the rest are still reported; exit 2 at the end
    if any failed (a file for a family lorakit does not apply is reported, saying so: no failure). ``--json``: one
    object for one file (nothing when it fails), else a list in which a bad file is ``{"schema", "file",
    "error"}``."""
    from pathlib import Path

    from .describe import as_text, describe, failure
    from .describe_model import as_text as model_text
    from .describe_model import describe_model, is_model_file

    infos, failed = [], False
    for path in args.files:
        try:
            if is_model_file(Path(path)):  # a base model (GGUF, fp8, a checkpoint): what it is and its quantization
                info = describe_model(Path(path))
                infos.append(info)
                if not args.json:
                    print(("\n" if len(infos) > 1 else "") + model_text(info), flush=True)
                continue
            info = describe(path, strict=args.strict)
        except LorakitError as e:
            failed = True
            sys.stdout.flush()  # keep the error line in its place among the reports
            print(f"lorakit: error: {e}", file=sys.stderr)
            infos.append(failure(path, e))
            continue
        infos.append(info)
        if not args.json:
            print(("\n" if len(infos) > 1 else "") + as_text(info), flush=True)
    if args.json and (len(infos) > 1 or not failed):
        print(json.dumps(infos if len(infos) > 1 else infos[0], indent=2))
    return 2 if failed else 0


def _generate(args: argparse.Namespace) -> int:
    from .files.output import check_writable, write_atomic
    from .generate.infotext import save_png
    from .generate.pipeline import Generator, Request
    from .library import EmbeddingIndex, LoraIndex
    from .models.loading import load_model
    from .settings import load_settings

    settings = load_settings(args.config)
    prompts = _prompts(args)
    init = _init_image(args)  # a bad image fails before the model loads
    out = Path(args.output)
    check_writable(out)  # so does an output that cannot be written (a device, a FIFO, a path under a file)
    control = _control_image(args)
    model = load_model(args.model or settings.model, **settings.device_options(args))
    embedding_dirs = args.embeddings_dir or settings.embedding_dirs
    generator = Generator(model, LoraIndex(args.lora_dir or settings.lora_dirs),
                          EmbeddingIndex(embedding_dirs) if embedding_dirs else None)
    many = len(prompts) > 1 or args.batch > 1
    width, height = (model.native_size if v is None else v for v in (args.width, args.height))
    if model.arch == Arch.DEMO:
        logging.getLogger("lorakit").info(_demo_notice())
    n = 0
    try:
        for prompt in prompts:
            req = Request(prompt, args.negative, args.steps, args.cfg, args.sampler, args.seed, width, height,
                          args.batch, args.clip_skip, args.auto_triggers, init, guidance=args.guidance,
                          control=control)
            result = generator(req)
            for image, text in zip(result.images, result.infotexts):
                n += 1
                path = out.with_name(f"{out.stem}-{n:04d}{out.suffix}") if many else out
                write_atomic(path, lambda tmp: save_png(image, tmp, text))
                print(f"{path}\n{text}\n")
    finally:
        generator.close()
    return 0


def _init_image(args: argparse.Namespace) -> InitImage | None:
    """``--init-image`` and its settings (``None`` without it); unreadable files are ``ImageInputError``s."""
    from .generate.init_image import InitImage, open_image

    if not args.init_image:
        if args.mask:
            raise LorakitError("--mask needs --init-image (the image to inpaint)")
        return None
    read = lambda path, what: open_image(_read_bytes(path, what), f"{what} {path}")
    mask = read(args.mask, "--mask") if args.mask else None
    init = InitImage(read(args.init_image, "--init-image"), args.strength, args.resize_mode, mask,
                     (args.mask_blur, args.mask_blur), args.masked_content, args.invert_mask,
                     args.only_masked is not None, args.only_masked or 0)
    init.check()
    return init


def _control_image(args: argparse.Namespace) -> Any:
    """``--control-image``: a FLUX.1 control LoRA's control image (``None`` without it)."""
    from .generate.init_image import open_image

    return open_image(_read_bytes(args.control_image, "--control-image"), f"--control-image {args.control_image}") \
        if args.control_image else None


def _read_bytes(path: str, what: str) -> bytes:
    from .errors import ImageInputError
    from .files.inputs import read_limited
    from .generate.init_image import MAX_BYTES

    try:
        return read_limited(path, MAX_BYTES)
    except ValueError as e:
        raise ImageInputError(f"{what} {path}: {e}") from None


def _demo_notice() -> str:
    """What the embedded demo model can draw (said once per run, so its pictures are not taken for a bug)."""
    from .demo.shapes import BACKGROUNDS, COLOURS, SHAPES

    return (f"the demo model draws 64×64 pictures of coloured shapes: {', '.join(SHAPES)}; "
            f"{', '.join(COLOURS)}; small/large, left/right/top/bottom, \"two …\", on a "
            f"{'/'.join(BACKGROUNDS)} background (e.g. \"two small blue stars\"). --model PATH for a real model")


def _list(args: argparse.Namespace) -> int:
    from .library import Library
    from .library.listing import SCHEMA, as_table, entry_dict
    from .settings import load_settings

    dirs = args.lora_dir or load_settings(args.config).lora_dirs
    if not dirs:
        raise LorakitError("no LoRA folder: give --lora-dir, set $LORAKIT_LORA_DIRS, or lora_dirs in lorakit.toml")
    library = Library(dirs)
    entries = library.search(args.base, args.search)
    if args.json:
        print(json.dumps({"schema": SCHEMA, "loras": [entry_dict(e) for e in entries]}, indent=2))
    else:
        print(as_table(entries))
        bad = sum(1 for e in entries if e.error)
        total = len(library.entries)
        print(f"{len(entries)} of {total} LoRA{'' if total == 1 else 's'}" + (f", {bad} unreadable" if bad else ""))
    return 0


def _prompts(args: argparse.Namespace) -> list[str]:
    if args.prompts_file:
        from .files.inputs import read_limited

        try:
            lines = read_limited(args.prompts_file, MAX_PROMPTS_BYTES).decode("utf-8").splitlines()
        except ValueError as e:  # UnicodeDecodeError is one
            raise LorakitError(f"{args.prompts_file}: cannot read the prompts file ({e})") from None
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
    p.add_argument("-m", "--model", help="a diffusers model folder or a single-file checkpoint (.safetensors/.ckpt "
                                         "of SD1.x, SD2.x or SDXL; FLUX.1 BFL/ComfyUI and SD3 SAI files with "
                                         "--components); "
                                         "default: the embedded demo model")
    p.add_argument("-l", "--lora-dir", action="append", help="LoRA folder (repeatable); also $LORAKIT_LORA_DIRS "
                                                             "or lora_dirs in lorakit.toml")
    p.add_argument("-e", "--embeddings-dir", action="append", help="textual-inversion embeddings folder "
                                                                   "(repeatable; also embedding_dirs in lorakit.toml)")
    p.add_argument("--steps", type=int, help="sampling steps (default 20, FLUX.1-dev 28, schnell 4; 6 with an LCM "
                                             "LoRA)")
    p.add_argument("--cfg", type=float, help="CFG scale (default 7; 1.5 with an LCM LoRA); on FLUX.1 default 1: "
                                             "above 1 it is true CFG with the negative prompt (twice the time)")
    p.add_argument("--guidance", type=float, help="FLUX.1-dev's distilled guidance (Forge's Distilled CFG Scale; "
                                                  "default 3.5; schnell has none)")
    p.add_argument("--sampler", help="Euler, Euler a (default), DPM++ 2M, DPM++ 2M Karras, DDIM, UniPC, LCM; FLUX.1: "
                                     "Euler (flow matching, the model's own schedule)")
    p.add_argument("--seed", type=int, help="seed (default random; image i of a batch uses seed+i)")
    p.add_argument("-W", "--width", type=int, help="default: the model's native size (demo 64, SD1/SD2 512, SDXL 1024)")
    p.add_argument("-H", "--height", type=int, help="default: the model's native size")
    p.add_argument("--batch", type=int, default=1, help="images per prompt")
    p.add_argument("--clip-skip", type=int, help="text-encoder layer from the end (default 1, or the LoRA's "
                                                 "ss_clip_skip)")
    p.add_argument("--prompts-file", help="one prompt per line, each with its own LoRAs; # starts a comment")
    p.add_argument("--auto-triggers", action="store_true", help="add each LoRA's declared trigger words that the "
                                                                "prompt lacks (off by default)")
    p.add_argument("-o", "--output", default="lorakit.png", help="PNG path; numbered when there are several")
    p.add_argument("--control-image", metavar="PNG", help="FLUX.1 control LoRAs (Canny, Depth): the control image "
                                                          "(edges, a depth map), resized to the output size")
    g = p.add_argument_group("img2img", "start from an image (A1111's img2img); a mask makes it inpainting")
    g.add_argument("--init-image", metavar="PNG", help="the image to start from")
    g.add_argument("--strength", type=float, default=0.75, help="denoising strength, 0 (keep) to 1 (default 0.75)")
    g.add_argument("--resize-mode", type=int, default=0, choices=range(4), help="0 just resize (default), 1 crop "
                   "and resize, 2 resize and fill, 3 just resize (latent upscale)")
    g.add_argument("--mask", metavar="PNG", help="white = repaint (or the drawn pixels of a transparent image)")
    g.add_argument("--mask-blur", type=int, default=4, help="px (default 4)")
    g.add_argument("--masked-content", type=int, default=1, choices=range(4), help="0 fill, 1 original (default), "
                   "2 latent noise, 3 latent nothing")
    g.add_argument("--invert-mask", action="store_true", help="repaint what the mask leaves black")
    g.add_argument("--only-masked", type=int, metavar="PADDING", help="repaint only the mask's region, at full "
                   "size, with PADDING px around it (A1111's inpaint area 'Only masked')")
    p.add_argument("--config", help="settings file (default ./lorakit.toml, then ~/.config/lorakit/config.toml)")
    _add_device_args(p)
    p.set_defaults(func=_generate, verbose_default=True)


def _add_device_args(p: argparse.ArgumentParser) -> None:
    """Where the model runs (every command that runs a model); flags win over $LORAKIT_* and lorakit.toml."""
    from .settings import DTYPE_CHOICES, ORIGINALS, VRAM_MODES

    g = p.add_argument_group("device", "where the model runs (also $LORAKIT_DEVICE, $LORAKIT_DTYPE, $LORAKIT_VRAM, "
                                       "$LORAKIT_LORA_ORIGINALS, or the same keys in lorakit.toml)")
    g.add_argument("--device", help="auto (default: CUDA, else MPS, else CPU), cpu, cuda, cuda:N or mps")
    g.add_argument("--dtype", choices=DTYPE_CHOICES, help="weights' dtype; auto (default): fp16 on CUDA/MPS (bf16 "
                                                          "for FLUX.1), fp32 on the CPU")
    g.add_argument("--vram", choices=VRAM_MODES, help="low: model CPU offload (CUDA) + VAE tiling, for 8 GB cards; "
                                                      "normal (default): VAE tiles from 1536 px; high: never tiles")
    g.add_argument("--lora-originals", choices=ORIGINALS, help="where the weights LoRAs replace are kept for exact "
                                                               "restore; auto (default): on the device while free "
                                                               "memory allows, else in pinned host memory")
    g.add_argument("--components", metavar="DIR", help="a diffusers folder of the family (FLUX.1, SD3, Chroma, "
                                                       "Qwen-Image, SD/SDXL): a single file of that family takes its "
                                                       "tokenizers (transformer-only or a GGUF UNet: also text "
                                                       "encoders, VAE) from it ($LORAKIT_COMPONENTS)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", description="LoRA support for Stable Diffusion.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    # -v also after the subcommand: SUPPRESS keeps a subcommand's absent -v from resetting a given one.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log details")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_SubParser(common))
    p = sub.add_parser("inspect", help="show what a LoRA file is: format, type, base, rank, trigger words, hashes")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--json", action="store_true", help="machine-readable output (schema lorakit.inspect/1)")
    p.add_argument("--strict", action="store_true", help="fail on keys lorakit does not understand")
    p.set_defaults(func=_inspect)
    _add_generate(sub)
    p = sub.add_parser("list", help="the LoRAs in your folders: name, base, type, rank, size, trigger words")
    p.add_argument("-l", "--lora-dir", action="append", help="LoRA folder (repeatable); default: lorakit.toml / "
                                                             "$LORAKIT_LORA_DIRS")
    p.add_argument("--base", choices=[a.value for a in (*LORA_BASES, Arch.DEMO)] + list(FLUX1_VARIANTS),
                   help="only LoRAs for this base model (or FLUX.1 variant)")
    p.add_argument("--search", help="only names, aliases, trigger words or descriptions containing this text")
    p.add_argument("--json", action="store_true", help="machine-readable output (schema lorakit.list/1)")
    p.add_argument("--config", help="settings file (default ./lorakit.toml, then ~/.config/lorakit/config.toml)")
    p.set_defaults(func=_list)
    from .server.cli import add_serve_command

    add_serve_command(sub, _add_device_args)
    from .tools.cli import add_tool_commands  # merge, bake, extract, resize, convert

    add_tool_commands(sub)
    from .batch.cli import add_batch_commands  # grid, batch

    add_batch_commands(sub)
    from .train.cli import add_train_command

    add_train_command(sub, _add_device_args)
    return parser


def _SubParser(common: argparse.ArgumentParser) -> type[argparse.ArgumentParser]:
    """Sub-parsers that all take the options of ``common``."""
    class SubParser(argparse.ArgumentParser):
        def __init__(self, *args: object, **kwargs: object) -> None:
            kwargs.setdefault("parents", [common])
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
    return SubParser


def main(argv: list[str] | None = None) -> int:
    # transformers warns on import that torchvision is missing (lorakit never needs it): quiet unless asked.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
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
    except BrokenPipeError:  # the reader went away (`lorakit inspect … | head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        return 141  # what a shell reports for a tool ended by SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
