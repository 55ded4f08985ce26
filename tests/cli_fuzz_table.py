"""The CLI fuzz harness's tables: each command's slots (``COMMANDS``) and the bad values of each kind (``POOLS``).

A ``Slot`` is a flag (or a positional, ``flag=None``) with a value kind, the valid values a cheap run uses (tokens
such as ``{lora:good}`` are the workspace's files, ``{fresh:.png}`` a new output path), and how often it appears
when it is not mutated. The harness mutates a slot by drawing from ``POOLS[slot.kind]``.

To add a command or flag (FLUX and quantized models, ``serve --ray``, …): a row in ``COMMANDS``; to add an input
kind: a pool here and its files in ``cli_fuzz_inputs.Workspace``.
"""
from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .cli_fuzz_inputs import Workspace


@dataclass(frozen=True)
class Slot:
    flag: str | None  # None: a positional
    kind: str  # a key of POOLS; "flag": a switch without a value
    valid: tuple[str, ...] = ()
    present: float = 1.0  # how often the slot appears when not mutated (0: only mutated)
    many: bool = False  # a positional that takes several values
    output: str | None = None  # the output's check (cli_fuzz.CHECKS) for an exit-0 run


NUMS = ("nan", "inf", "-inf", "1e308", "-1e308", "1e400", "-1", "0", "-0.0", "1e-320", "abc", "", "0x10", "1_0")
INTS = ("-1", "0", "99999999999999999999", "-99999999999999999999", "nan", "1.5", "", "abc", "1e3", "2147483648")
TEXTS = ("", "<lora:", "<lora:demo_style:nan>", "<lora:demo_style:1e308>", "<lora:demo_style:te=inf:unet=1>",
         "<lora:no_such_lora:1>", "\0\0\0", "x" * 200_000, "( ( ( (" * 2000, "[a:b:1e308]", "\ud800 a",
         "<lora:demo_style:1:lbw=ZZZ>", "a BREAK " * 500, "<lora:../../etc/passwd:1>", "<lora:demo_style:1:dyn=-1>")
AXES = ("seed=1-100000", "seed=1-1000 [1000]", "lora:demo_style=nan,1", "cfg=inf", "steps=0,1", "steps=1e308",
        "nope=1", "=", "lora:demo_style=0-1 [0]", "seed=-5", "seed=99999999999999999999999", "clip_skip=0,100",
        "sampler=Nope", "lbw:demo_style=OUTD,ZZZ", "prompt=", "prompt=zzz,yyy", "te:no_such=1", "seed=" + ",1" * 5000,
        "steps=1-1000 (+0)", "cfg=1-2 [1000000000]")
WEIGHTS = ("", ":nan", ":1e308", ":-1e308", ":te=inf", ":1:lbw=ZZZ", ":", "::", ":0", ":1:start=5", ":unet=nan",
           ":1:dyn=1000000", ":abc")
CHOICES = ("nope", "", "x" * 1000, "\0", "KOHYA")


def _bad_paths(ws: Workspace) -> list[Path]:
    return [*ws.specials.values(), ws.root / "in" / "missing.safetensors", ws.loras["good"] / "under-a-file",
            Path("/proc/lorakit-fuzz.safetensors"), ws.specials["fifo"] / "x", ws.root / "data"]


def _pick(values: list[Path] | tuple[str, ...]) -> Callable[[random.Random, Workspace], str]:
    return lambda rng, ws: str(rng.choice(values))


def _paths(*groups: Callable[[Workspace], list[Path]]) -> Callable[[random.Random, Workspace], str]:
    return lambda rng, ws: str(rng.choice([p for g in groups for p in g(ws)]))


def _bad_outputs(ws: Workspace) -> list[Path]:
    """Bad places to write (the missing input path is left out: an output there would make it exist)."""
    return [p for p in _bad_paths(ws) if p.name != "missing.safetensors"]


def _out(rng: random.Random, ws: Workspace) -> str:
    fresh = [ws.fresh(rng.choice([".safetensors", ".png", ".txt", "", ".json"])), ws.existing_copy()]
    return str(rng.choice(_bad_outputs(ws) + fresh)) if rng.random() < 0.95 else ""  # "": the working folder


def _lora_spec(rng: random.Random, ws: Workspace) -> str:
    base = rng.choice([*ws.loras.values(), *_bad_paths(ws)]) if rng.random() < 0.6 else ws.loras["good"]
    return f"{base}{rng.choice(WEIGHTS)}"


_texts = lambda *keys: (lambda ws: [ws.texts[k] for k in keys])  # noqa: E731
POOLS: dict[str, Callable[[random.Random, Workspace], str]] = {
    "num": _pick(NUMS), "int": _pick(INTS), "text": _pick(TEXTS), "axis": _pick(AXES), "choice": _pick(CHOICES),
    "device": _pick(("cuda", "cuda:7", "mps", "nope", "", "cpu:0", "meta")),
    "dtype": _pick(("fp8", "", "int8", "FP16", "nope")),
    "port": _pick(("-1", "65536", "99999999999999", "abc", "")),
    "host": _pick(("256.256.256.256", "", "no-such-host.invalid", "0.0.0.0.0")),
    "auth": _pick(("", ":", "x" * 10_000, "a:b:c")),
    "blocks": _pick(("IN99", "", ",,,", "ZZ", "IN04," * 1000)),
    "components": _pick(("nope", ",", "", "unet,unet,te,te", "vae")),
    "name": _pick(("no_such", "", "../../etc/passwd", "x" * 5000, "demo_style")),
    "sampler": _pick(("nope", "", "Euler a" * 100)),
    "flag": lambda rng, ws: "",
    "lora": _paths(lambda ws: list(ws.loras.values()), _bad_paths),
    "lora_spec": _lora_spec,
    "model": _paths(lambda ws: list(ws.models.values()), _bad_paths,
                    lambda ws: [ws.loras["good"], ws.loras["binary"], ws.texts["huge_text"]]),
    "out": _out,
    "outdir": lambda rng, ws: str(rng.choice(_bad_outputs(ws) + [ws.existing_copy()])),
    "dir": _paths(lambda ws: list(ws.folders.values()), _bad_paths),
    "data": _paths(lambda ws: list(ws.data.values()), _bad_paths, lambda ws: [ws.loras["good"]]),
    "jobs": _paths(lambda ws: [p for k, p in ws.texts.items() if k.startswith("jobs")], _bad_paths,
                   _texts("binary_text", "nul_text", "huge_text", "options_deep")),
    "options": _paths(_texts("options_deep", "options_good", "binary_text", "nul_text", "huge_text", "jobs_deep"),
                      _bad_paths),
    "prompts": _paths(_texts("prompts_good", "prompts_tags", "binary_text", "nul_text", "huge_text"), _bad_paths),
    "image": _paths(_texts("image", "huge_image", "binary_text", "huge_text"), _bad_paths,
                    lambda ws: [ws.loras["good"]]),
}

MODEL = Slot("-m", "model", present=0.0)
LORA_DIR = Slot("-l", "dir", ("{folder:loras}",))
SMALL = (Slot("--steps", "int", ("1",)), Slot("-W", "int", ("64",)), Slot("-H", "int", ("64",)),
         Slot("--seed", "int", ("1",)))
DRY = Slot("--dry-run", "flag", present=0.1)


def _rank_slots(rank: str, present: float) -> tuple[Slot, ...]:
    return (Slot("--rank", "int", (rank,), present=present), Slot("--sv-ratio", "num", ("4",), present=0.05),
            Slot("--sv-fro", "num", ("0.9",), present=0.05), Slot("--sv-cumulative", "num", ("0.9",), present=0.05),
            Slot("--conv-rank", "int", ("1",), present=0.05), Slot("--dtype", "dtype", ("fp16", "bf16"), present=0.1),
            Slot("--device", "device", ("cpu",), present=0.05))


COMMANDS: dict[str, tuple[Slot, ...]] = {
    "inspect": (Slot(None, "lora", ("{lora:good}", "{lora:sd1}", "{lora:demo}"), many=True),
                Slot("--json", "flag", present=0.3), Slot("--strict", "flag", present=0.2)),
    "list": (LORA_DIR, Slot("--base", "choice", ("sd1", "sdxl"), present=0.2),
             Slot("--search", "text", ("style",), present=0.3), Slot("--json", "flag", present=0.3)),
    "generate": (Slot(None, "text", ("a red circle", "two small blue stars <lora:demo_style:0.5>")), *SMALL, LORA_DIR,
                 Slot("-o", "out", ("{fresh:.png}",), output="png"), MODEL,
                 Slot("--cfg", "num", ("7",), present=0.2), Slot("--batch", "int", ("1", "2"), present=0.2),
                 Slot("--clip-skip", "int", ("1",), present=0.1), Slot("--sampler", "sampler", ("DDIM",), present=0.1),
                 Slot("--prompts-file", "prompts", ("{text:prompts_good}",), present=0.1),
                 Slot("--init-image", "image", ("{text:image}",), present=0.1),
                 Slot("--strength", "num", ("0.5",), present=0.1), Slot("--mask", "image", present=0.0),
                 Slot("--mask-blur", "int", ("4",), present=0.05), Slot("--only-masked", "int", present=0.0),
                 Slot("--device", "device", ("cpu",), present=0.1), Slot("--config", "options", present=0.0)),
    "merge": (Slot(None, "lora_spec", ("{lora:good}", "{lora:good}:0.5"), many=True),
              Slot("-o", "out", ("{fresh:.safetensors}",), output="lora"),
              Slot("--method", "choice", ("concat", "svd"), present=0.2), *_rank_slots("2", 0.2),
              Slot("--base", "model", ("{model:base}",), present=0.05), DRY, Slot("--json", "flag", present=0.1)),
    "bake": (Slot(None, "model", ("{model:folder}",)),  # the tiny single file needs its config: a folder has it
             Slot(None, "lora_spec", ("{lora:fits}", "{lora:fits}:0.5")),
             Slot("-o", "out", ("{fresh:}",), output="model"), DRY),
    "extract": (Slot(None, "model", ("{model:base}",)), Slot(None, "model", ("{model:tuned}",)),
                Slot("-o", "out", ("{fresh:.safetensors}",), output="lora"), *_rank_slots("2", 1.0),
                Slot("--components", "components", ("unet", "unet,te"), present=0.2),
                Slot("--min-diff", "num", ("0", "0.001"), present=0.1), Slot("--no-norms", "flag", present=0.1), DRY),
    "resize": (Slot(None, "lora", ("{lora:good}", "{lora:demo}")),
               Slot("-o", "out", ("{fresh:.safetensors}",), output="lora"), *_rank_slots("1", 1.0), DRY),
    "convert": (Slot(None, "lora", ("{lora:good}", "{lora:sd1}", "{lora:pickle}")),
                Slot("-o", "out", ("{fresh:.safetensors}",), output="lora"),
                Slot("--to", "choice", ("kohya", "peft", "diffusers")),
                Slot("--names", "choice", ("ldm", "diffusers"), present=0.2),
                Slot("--drop-unsupported", "flag", present=0.3), DRY),
    "grid": (Slot(None, "text", ("a red circle <lora:demo_style:1>",)),
             Slot("--x", "axis", ("seed=1,2", "lora:demo_style=0,1")), Slot("--y", "axis", ("steps=1",), present=0.2),
             Slot("--z", "axis", ("cfg=5",), present=0.1), *SMALL, LORA_DIR, MODEL,
             Slot("-o", "out", ("{fresh:.png}",), output="png"), Slot("--analyze-blocks", "name", present=0.0),
             Slot("--blocks", "blocks", ("IN04",), present=0.0), Slot("--block-off", "num", ("0",), present=0.0)),
    "batch": (Slot(None, "jobs", ("{text:jobs_good}", "{text:jobs_lora}")),
              Slot("-o", "outdir", ("{fresh:}",), output="batch"), LORA_DIR, MODEL,
              Slot("--max-batch", "int", ("1", "4"), present=0.3), Slot("--workers", "int", ("1",), present=0.0),
              Slot("--threads-per-worker", "int", ("1",), present=0.0)),
    "train": (Slot(None, "data", ("{data:good}",)), Slot("-o", "out", ("{fresh:.safetensors}",), output="lora"),
              Slot("--steps", "int", ("1",)), Slot("--resolution", "int", ("64",)), Slot("--rank", "int", ("2",)),
              MODEL, Slot("--alpha", "num", ("1",), present=0.2), Slot("--lr", "num", ("1e-4",), present=0.2),
              Slot("--batch", "int", ("1", "2"), present=0.1),
              Slot("--network", "choice", ("lora", "locon", "loha", "lokr", "dora"), present=0.3),
              Slot("--trigger", "text", ("tok",), present=0.1), Slot("--save-every", "int", ("1",), present=0.05),
              Slot("--caption-dropout", "num", ("0.1",), present=0.05),
              Slot("--noise-offset", "num", ("0.05",), present=0.05),
              Slot("--min-snr-gamma", "num", ("5",), present=0.05), Slot("--conv-rank", "int", ("1",), present=0.05),
              Slot("--warmup", "int", ("1",), present=0.05), Slot("--grad-accum", "int", ("1",), present=0.05),
              Slot("--resume", "lora", present=0.0), Slot("--only-layers", "text", ("to_q,to_k",), present=0.05),
              Slot("--save-dtype", "choice", ("fp16", "fp32"), present=0.1),
              Slot("--sample-every", "int", present=0.0), Slot("--sample-prompt", "text", present=0.0)),
    "serve": (Slot("--port", "port", ("0",)), Slot("--options-file", "options", ("{fresh:.json}",)), MODEL,
              Slot("--max-batch", "int", ("1", "4"), present=0.2),
              Slot("--batch-window-ms", "num", ("50",), present=0.1), Slot("--host", "host", ("127.0.0.1",), present=0.1),
              Slot("--models-dir", "dir", ("{folder:empty}",), present=0.1), Slot("-l", "dir", ("{folder:loras}",),
                                                                                    present=0.3),
              Slot("--api-auth", "auth", ("u:p",), present=0.1)),
}

# FLUX.1 and quantized models (``cli_fuzz_flux``): the same commands on the tiny FLUX.1 — a folder, BFL single files,
# GGUF with ``--components`` — and its LoRAs; ``NAME@flux`` runs ``lorakit NAME`` (``command_of``).
FLUX_MODEL = Slot("-m", "model", ("{model:flux}", "{model:flux_bfl}", "{model:flux_gguf}"))
FLUX_RUN = (FLUX_MODEL, Slot("--components", "dir", ("{model:flux}",)),
            Slot("--device", "device", ("cpu",), present=0.1), Slot("--dtype", "choice", ("fp32", "bf16"), present=0.1))
FLUX_LORAS = Slot("-l", "dir", ("{folder:flux_loras}",))
FLUX_PROMPTS = ("a cat", "a cat <lora:flux_style:0.8>", "<lora:flux_style:te=0:unet=1> a dog")
FLUX_SMALL = (Slot("--steps", "int", ("1",)), Slot("-W", "int", ("64",)), Slot("-H", "int", ("64",)),
              Slot("--seed", "int", ("1",)))
FLUX_LORA = Slot(None, "lora", ("{lora:flux}",))
COMMANDS |= {
    "inspect@flux": (Slot(None, "lora", ("{lora:flux}", "{model:flux_gguf}", "{model:flux_bfl}", "{lora:flux_nan}"),
                          many=True), Slot("--json", "flag", present=0.3)),
    "convert@flux": (FLUX_LORA, Slot("-o", "out", ("{fresh:.safetensors}",), output="lora"),
                     Slot("--to", "choice", ("kohya", "peft", "diffusers", "comfy")),
                     Slot("--drop-unsupported", "flag", present=0.5), DRY),
    "merge@flux": (Slot(None, "lora_spec", ("{lora:flux}", "{lora:flux}:0.5", "{lora:flux}:unet=0.7"), many=True),
                   Slot("-o", "out", ("{fresh:.safetensors}",), output="lora"),
                   Slot("--method", "choice", ("concat", "svd"), present=0.3), *_rank_slots("2", 0.2),
                   Slot("--base", "model", ("{model:flux}", "{model:flux_bfl}"), present=0.1), DRY),
    "resize@flux": (FLUX_LORA, Slot("-o", "out", ("{fresh:.safetensors}",), output="lora"), *_rank_slots("1", 1.0),
                    DRY),
    "bake@flux": (Slot(None, "model", ("{model:flux}", "{model:flux_gguf}", "{model:flux_cut_gguf}")),
                  Slot(None, "lora_spec", ("{lora:flux}", "{lora:flux}:0.5")),
                  Slot("-o", "out", ("{fresh:}", "{fresh:.safetensors}", "{fresh:.gguf}"), output="model"),
                  Slot("--requant", "flag", present=0.3), DRY),
    "extract@flux": (Slot(None, "model", ("{model:flux_bfl}",)), Slot(None, "model", ("{model:flux_tuned}",)),
                     Slot("-o", "out", ("{fresh:.safetensors}",), output="lora"), *_rank_slots("2", 1.0),
                     Slot("--components", "components", ("unet", "transformer", "unet,te"), present=0.2), DRY),
    "generate@flux": (Slot(None, "text", FLUX_PROMPTS), *FLUX_SMALL, FLUX_LORAS, *FLUX_RUN,
                      Slot("-o", "out", ("{fresh:.png}",), output="png"),
                      Slot("--guidance", "num", ("3.5",), present=0.3), Slot("--cfg", "num", ("1",), present=0.1),
                      Slot("--sampler", "sampler", ("Euler",), present=0.1),
                      Slot("--control-image", "image", ("{text:image}",), present=0.05),
                      Slot("--init-image", "image", ("{text:image}",), present=0.05)),
    "grid@flux": (Slot(None, "text", ("a cat <lora:flux_style:1>",)),
                  Slot("--x", "axis", ("seed=1,2", "lora:flux_style=0,1")), *FLUX_SMALL, FLUX_LORAS, *FLUX_RUN,
                  Slot("-o", "out", ("{fresh:.png}",), output="png")),
    "batch@flux": (Slot(None, "jobs", ("{text:jobs_good}", "{text:jobs_flux}")),
                   Slot("-o", "outdir", ("{fresh:}",), output="batch"), FLUX_LORAS, *FLUX_RUN),
    "train@flux": (Slot(None, "data", ("{data:good}",)), Slot("-o", "out", ("{fresh:.safetensors}",), output="lora"),
                   Slot("--steps", "int", ("1",)), Slot("--resolution", "int", ("64",)), Slot("--rank", "int", ("2",)),
                   Slot("--max-sequence-length", "int", ("16",)), *FLUX_RUN,
                   Slot("--network", "choice", ("lora", "lokr"), present=0.2),
                   Slot("--timestep-sampling", "choice", ("sigmoid", "shift"), present=0.2),
                   Slot("--discrete-flow-shift", "num", ("3",), present=0.0),
                   Slot("--sigmoid-scale", "num", ("1",), present=0.1), Slot("--guidance", "num", ("1",), present=0.1),
                   Slot("--train", "choice", ("unet", "both"), present=0.1)),
    "serve@flux": (Slot("--port", "port", ("0",)), Slot("--options-file", "options", ("{fresh:.json}",)), *FLUX_RUN,
                   FLUX_LORAS),
}


def command_of(name: str) -> str:
    """The ``lorakit`` command a row of ``COMMANDS`` runs (``merge@flux`` → ``merge``)."""
    return name.partition("@")[0]
