"""The CLI fuzz harness's rows for the families and features that came after SD1 and FLUX.1 (``cli_fuzz_table``
holds those, and ``Slot``): ``NAME@sd3``, ``NAME@chroma``, ``NAME@qwen`` (tiny folders, SD3's SAI single files,
each family's LoRA dialects, mutated LoRAs, another family's LoRA as ``<lora:wrong:1>``), ``NAME@quant`` (fp8 and
GGUF FLUX.1 files as ``--model`` and inputs; broken ones from ``QUANT_BAD``) and ``serve@ray`` (the Ray flags; the
harness stands in for Ray — ``cli_fuzz.ray_once`` — so no cluster starts)."""
from __future__ import annotations

import random
from collections.abc import Callable

from .cli_fuzz_inputs import Workspace
from .cli_fuzz_table import DRY, POOLS, Slot, _bad_paths, _rank_slots

QUANT_BAD = ("fp8_scale_shape", "fp8_scale_nan", "fp8_scale_zero", "fp8_nvfp4", "fp8_orphan", "gguf_type99",
             "gguf_wrong_type", "gguf_odd_shape", "gguf_huge_count", "flux_cut_gguf", "flux_tq_gguf", "sd3_bad_shape",
             "flux_bad_shape")
QUANT_GOOD = ("{model:fp8}", "{model:fp8_legacy}", "{model:fp8_new}", "{model:flux_gguf}")


def _quant_model(rng: random.Random, ws: Workspace) -> str:
    return str(rng.choice([ws.models[k] for k in QUANT_BAD] + _bad_paths(ws)))


def _pick(values: tuple[str, ...]) -> Callable[[random.Random, Workspace], str]:
    return lambda rng, ws: rng.choice(values)


DIT_POOLS: dict[str, Callable[[random.Random, Workspace], str]] = {
    "quant_model": _quant_model,
    "gpus": _pick(("nan", "inf", "-inf", "-1", "1e308", "1e400", "", "abc", "-0.0", "1e-320", "0x1")),
    "autoscale": _pick(("0:0", "4:1", "-1:2", "1:99999999999999999999", "a:b", ":", "1:1000", "", "1:2:3", "nan:1")),
    "address": _pick(("nope", "127.0.0.1:1", "ray://", "127.0.0.1:99999", ":", "ray://127.0.0.1:0", "", "[::1]:1",
                      "127.0.0.1:-5", "x" * 5000)),
}
POOLS_ALL = POOLS | DIT_POOLS


def _small() -> tuple[Slot, ...]:
    return (Slot("--steps", "int", ("1",)), Slot("-W", "int", ("64",)), Slot("-H", "int", ("64",)),
            Slot("--seed", "int", ("1",)))


def _family_rows(family: str, models: tuple[str, ...], components: str | None, loras: tuple[str, ...],
                 tools: bool) -> dict[str, tuple[Slot, ...]]:
    """The rows of one DiT family: LoRA tools on its dialects, generation on its model(s)."""
    lora = Slot(None, "lora", loras)
    run = (Slot("-m", "model", models), Slot("--device", "device", ("cpu",), present=0.1),
           Slot("--dtype", "choice", ("fp32", "bf16"), present=0.1),
           *((Slot("--components", "dir", (components,), present=0.5),) if components else ()))
    folder = Slot("-l", "dir", (f"{{folder:{family}_loras}}",))
    prompts = (f"a cat <lora:{family}_style:0.8>", "a cat", "a dog <lora:wrong:1>", f"<lora:{family}_style:nan> x")
    rows: dict[str, tuple[Slot, ...]] = {
        "inspect": (Slot(None, "lora", (*loras, *(m for m in models if m.endswith("_sai}"))), many=True),
                    Slot("--json", "flag", present=0.3)),  # LoRAs and single-file models (not folders)
        "convert": (lora, Slot("-o", "out", ("{fresh:.safetensors}",), output="lora"),
                    Slot("--to", "choice", ("kohya", "peft", "diffusers", "comfy")),
                    Slot("--drop-unsupported", "flag", present=0.5), DRY),
        "merge": (Slot(None, "lora_spec", (loras[0], f"{loras[0]}:0.5", f"{loras[-1]}:unet=0.7"), many=True),
                  Slot("-o", "out", ("{fresh:.safetensors}",), output="lora"),
                  Slot("--method", "choice", ("concat", "svd"), present=0.3), *_rank_slots("2", 0.2), DRY),
        "resize": (lora, Slot("-o", "out", ("{fresh:.safetensors}",), output="lora"), *_rank_slots("1", 1.0), DRY),
        "generate": (Slot(None, "text", prompts), *_small(), folder, *run,
                     Slot("-o", "out", ("{fresh:.png}",), output="png"), Slot("--cfg", "num", ("2",), present=0.3),
                     Slot("--negative", "text", ("blurry",), present=0.2),
                     Slot("--init-image", "image", ("{text:image}",), present=0.05),
                     Slot("--strength", "num", ("0.5",), present=0.05)),
        "batch": (Slot(None, "jobs", (f"{{text:jobs_{family}}}",)), Slot("-o", "outdir", ("{fresh:}",), output="batch"),
                  folder, *run),
        "serve": (Slot("--port", "port", ("0",)), Slot("--options-file", "options", ("{fresh:.json}",)), *run,
                  folder),
        "train": (Slot(None, "data", ("{data:good}",)), Slot("-o", "out", ("{fresh:.safetensors}",), output="lora"),
                  Slot("--steps", "int", ("1",)), Slot("--resolution", "int", ("64",)), Slot("--rank", "int", ("2",)),
                  Slot("--max-sequence-length", "int", ("16",), present=0.5), *run,
                  Slot("--network", "choice", ("lora", "lokr"), present=0.2),
                  Slot("--train", "choice", ("unet", "both"), present=0.1)),
    }
    if tools:  # SD3: bake (with --dry-run), extract from a tuned copy, grids; Chroma and Qwen-Image: bake
        rows["bake"] = (Slot(None, "model", (models[0],)), Slot(None, "lora_spec", (loras[0], f"{loras[0]}:0.5")),
                        Slot("-o", "out", ("{fresh:}",), output="model"), DRY)
        rows["extract"] = (Slot(None, "model", (models[0],)), Slot(None, "model", (f"{{model:{family}_tuned}}",)),
                           Slot("-o", "out", ("{fresh:.safetensors}",), output="lora"), *_rank_slots("2", 1.0),
                           Slot("--components", "components", ("transformer", "unet,te"), present=0.2), DRY)
        rows["grid"] = (Slot(None, "text", (f"a cat <lora:{family}_style:1>",)),
                        Slot("--x", "axis", ("seed=1,2", f"lora:{family}_style=0,1")), *_small(), folder, *run,
                        Slot("-o", "out", ("{fresh:.png}",), output="png"))
    else:
        rows["bake"] = (Slot(None, "model", (models[0],)), Slot(None, "lora_spec", (loras[0],)),
                        Slot("-o", "out", ("{fresh:}",), output="model"))
    return {f"{name}@{family}": slots for name, slots in rows.items()}


def _quant_rows() -> dict[str, tuple[Slot, ...]]:
    """Quantized FLUX.1 files (fp8 unscaled / legacy / new, GGUF Q8_0) where commands take models."""
    run = (Slot("-m", "quant_model", QUANT_GOOD), Slot("--components", "dir", ("{model:flux}",)),
           Slot("--device", "device", ("cpu",), present=0.1), Slot("--dtype", "choice", ("bf16", "fp32"), present=0.1))
    folder = Slot("-l", "dir", ("{folder:flux_loras}",))
    fp8 = ("{model:fp8}", "{model:fp8_legacy}", "{model:fp8_new}")
    rows: dict[str, tuple[Slot, ...]] = {
        "inspect": (Slot(None, "quant_model", QUANT_GOOD, many=True), Slot("--json", "flag", present=0.3)),
        "generate": (Slot(None, "text", ("a cat", "a cat <lora:flux_style:0.8>")), *_small(), folder, *run,
                     Slot("-o", "out", ("{fresh:.png}",), output="png")),
        "bake": (Slot(None, "quant_model", fp8), Slot(None, "lora_spec", ("{lora:flux}", "{lora:flux}:0.5")),
                 Slot("-o", "out", ("{fresh:.safetensors}",), output="model"), DRY),
        "extract": (Slot(None, "quant_model", fp8), Slot(None, "model", ("{model:flux_tuned}",)),
                    Slot("-o", "out", ("{fresh:.safetensors}",), output="lora"), *_rank_slots("2", 1.0),
                    Slot("--components", "components", ("transformer",), present=0.5), DRY),
        "train": (Slot(None, "data", ("{data:good}",)), Slot("-o", "out", ("{fresh:.safetensors}",), output="lora"),
                  Slot("--steps", "int", ("1",)), Slot("--resolution", "int", ("64",)), Slot("--rank", "int", ("2",)),
                  Slot("--max-sequence-length", "int", ("16",)), *run,
                  Slot("--network", "choice", ("lora", "dora"), present=0.2)),
        "serve": (Slot("--port", "port", ("0",)), Slot("--options-file", "options", ("{fresh:.json}",)), *run, folder),
    }
    return {f"{name}@quant": slots for name, slots in rows.items()}


RAY = (Slot("--ray", "flag", present=0.9), Slot("--port", "port", ("0",)),
       Slot("--options-file", "options", ("{fresh:.json}",)), Slot("--replicas", "int", ("1", "2"), present=0.3),
       Slot("--autoscale", "autoscale", ("1:2", "0:3"), present=0.2), Slot("--address", "address", present=0.0),
       Slot("--replica-gpus", "gpus", ("0", "0.5"), present=0.2),
       Slot("--sets-per-replica", "int", ("2",), present=0.2), Slot("--max-ongoing", "int", ("4",), present=0.2),
       Slot("--max-batch", "int", ("2",), present=0.2), Slot("-l", "dir", ("{folder:loras}",), present=0.3),
       Slot("--write-serve-config", "out", ("{fresh:.yaml}",), present=0.3, output="serve_config"),
       Slot("-m", "model", ("{model:folder}",), present=0.1))

DIT_ROWS: dict[str, tuple[Slot, ...]] = {
    **_family_rows("sd3", ("{model:sd3}", "{model:sd3_sai}"), "{model:sd3}",
                   ("{lora:sd3}", "{lora:sd3_diffusers}"), tools=True),
    **_family_rows("chroma", ("{model:chroma}",), None, ("{lora:chroma}", "{lora:chroma_comfy}", "{lora:flux}"),
                   tools=False),
    **_family_rows("qwen", ("{model:qwen}",), None, ("{lora:qwen}", "{lora:qwen_diffusers}"), tools=False),
    **_quant_rows(),
    "serve@ray": RAY,
}
