"""Write ``tests/fixtures/flux_listings/*.json``: key → shape listings of real FLUX.1 LoRA files, one per dialect.

Where they come from: InvokeAI (Apache-2.0) keeps such listings as test data in
``tests/backend/patches/lora_conversions/lora_state_dicts/*.py`` — a module-level dict ``state_dict_keys =
{key: [dims]}`` each, mostly taken from real files (the file's comment names it). This script reads those dicts as
data (``ast.literal_eval`` of the one assignment; no InvokeAI code is run or copied) from a local dump of that
folder and writes one JSON per dialect::

    {"source": "invoke-ai/InvokeAI/<path>@<commit>", "origin": "<what the listing was taken from>",
     "dialect": "...", "note": "...", "metadata": {}, "shapes": {key: [dims]}}

The listings carry no safetensors metadata (``metadata`` stays empty). The dump used for the committed JSONs:
InvokeAI main @8e71a8a (2026-08-19), plus ``flux_lora_diffusers_with_norm_out_format.py`` (Hyper-FLUX, only on
a PR branch: commit 934300a). To make a dump: ``git show <commit>:<path> > dump/<file>`` for each file below.

The LoKr listing's shapes are synthetic in InvokeAI (they test key detection only: ``kron(w1, w2)`` is not the
layer's shape); it is written as ``lokr_bfl_invokeai.json`` unchanged, and ``lokr_bfl.json`` has the same keys with
factor shapes chosen here so that ``kron(w1, w2)`` is each FLUX.1 layer's (out, in).

Usage: ``python scripts/flux_listings.py DUMP_DIR [--out tests/fixtures/flux_listings]``
"""
from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path
from typing import Any

FOLDER = "tests/backend/patches/lora_conversions/lora_state_dicts"
MAIN = "8e71a8a519399d6db32054ae9afc7c6c4e2355af"
HYPER_BRANCH = "934300a45566b57ed12e48564c4e68b2e964a108"

# output name → (InvokeAI file, commit, dialect (ROUND3_NOTES §1.2), note)
LISTINGS: dict[str, tuple[str, str, str, str]] = {
    "kohya": ("flux_lora_kohya_format.py", MAIN, "F1 kohya sd-scripts", ""),
    "kohya_te1": ("flux_lora_kohya_with_te1_format.py", MAIN, "F1 kohya with CLIP-L (lora_te1_)", ""),
    "diffusers": ("flux_lora_diffusers_format.py", MAIN, "F4 diffusers/PEFT (transformer.)", ""),
    "diffusers_no_proj_mlp": ("flux_lora_diffusers_no_proj_mlp_format.py", MAIN,
                              "F4 diffusers/PEFT without proj_mlp", ""),
    "diffusers_base_model": ("flux_lora_diffusers_base_model_format.py", MAIN, "F4v PEFT base_model.model.", ""),
    "diffusers_norm_out": ("flux_lora_diffusers_with_norm_out_format.py", HYPER_BRANCH,
                           "F4 diffusers/PEFT with embedders and norm_out (Hyper-FLUX)",
                           "on an InvokeAI PR branch, not on main"),
    "aitoolkit": ("flux_lora_aitoolkit_format.py", MAIN, "F3 BFL-PEFT (ai-toolkit, diffusion_model.)", ""),
    "onetrainer_dora": ("flux_dora_onetrainer_format.py", MAIN,
                        "F5 OneTrainer DoRA (lora_transformer_, CLIP lora_te1_, T5 lora_te2_)", ""),
    "xlabs": ("flux_lora_xlabs_format.py", MAIN, "F7 XLabs (double blocks only)", ""),
    "control": ("flux_control_lora_format.py", MAIN, "F8 BFL control LoRA (Depth)",
                "img_in has 128 inputs: a control model's x_embedder"),
    "lokr_bfl_invokeai": ("flux_lokr_bfl_format.py", MAIN, "F3 BFL LyCORIS LoKr",
                          "synthetic shapes in InvokeAI: kron(w1, w2) is not the layer's shape"),
    "qwen_kohya": ("qwen_image_lora_kohya_format.py", MAIN, "Qwen-Image kohya LoKr (not FLUX.1)", ""),
    "qwen_diffusers": ("qwen_image_lora_diffusers_format.py", MAIN, "Qwen-Image diffusers (not FLUX.1)",
                       "two blocks of to_q/to_k only: no key or shape tells it from FLUX.1"),
}
# FLUX.1 (out, in) of the BFL modules the LoKr listing names; its factors here: w1 (16, 16), w2 the rest.
LOKR_SHAPES = {"img_attn.proj": (3072, 3072), "img_attn.qkv": (9216, 3072), "img_mlp.0": (12288, 3072),
               "img_mlp.2": (3072, 12288), "linear1": (21504, 3072), "linear2": (3072, 15360)}
LOKR_FACTOR = 16


def read_listing(path: Path) -> tuple[dict[str, list[int]], str]:
    """The ``state_dict_keys`` dict of an InvokeAI listing module and its leading comment (where it came from)."""
    text = path.read_text()
    tree = ast.parse(text)
    values = [n.value for n in tree.body if isinstance(n, ast.Assign) and _names(n.targets)]
    values += [n.value for n in tree.body if isinstance(n, ast.AnnAssign) and n.value and _names([n.target])]
    if not values:
        raise SystemExit(f"{path}: no state_dict_keys assignment")
    shapes = ast.literal_eval(values[0])
    comment = " ".join(line.lstrip("# ").strip() for line in text.splitlines() if line.startswith("#"))
    doc = ast.get_docstring(tree) or ""
    return {str(k): [int(d) for d in v] for k, v in shapes.items()}, (comment or doc.split("\n\n")[0]).strip()


def _names(targets: list[ast.expr]) -> bool:
    return any(isinstance(t, ast.Name) and t.id == "state_dict_keys" for t in targets)


def consistent_lokr(shapes: dict[str, list[int]]) -> dict[str, list[int]]:
    """The LoKr listing's keys with factors whose Kronecker product is the FLUX.1 layer's (out, in)."""
    out: dict[str, list[int]] = {}
    for key, dims in shapes.items():
        module, _, leaf = key.rpartition(".")
        layer = next(v for k, v in LOKR_SHAPES.items() if module.endswith("." + k))
        if leaf == "lokr_w1":
            out[key] = [LOKR_FACTOR, LOKR_FACTOR]
        elif leaf == "lokr_w2":
            out[key] = [layer[0] // LOKR_FACTOR, layer[1] // LOKR_FACTOR]
        else:
            out[key] = dims
    return out


def write(out_dir: Path, name: str, record: dict[str, Any]) -> None:
    lines = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in record["shapes"].items()]
    head = {k: v for k, v in record.items() if k != "shapes"}
    body = json.dumps(head, indent=2)[:-2] + ',\n  "shapes": {\n  ' + ",\n  ".join(lines) + "\n  }\n}\n"
    (out_dir / f"{name}.json").write_text(body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dump", type=Path, help="folder holding the InvokeAI listing files")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "tests/fixtures/flux_listings")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, (file, commit, dialect, note) in LISTINGS.items():
        shapes, origin = read_listing(args.dump / file)
        record: dict[str, Any] = {"source": f"invoke-ai/InvokeAI/{FOLDER}/{file}@{commit}", "origin": origin,
                                  "dialect": dialect, "note": note, "metadata": {}, "shapes": shapes}
        write(args.out, name, record)
        if name == "lokr_bfl_invokeai":
            write(args.out, "lokr_bfl", {**record, "note": f"same keys as {name}.json, factor shapes made consistent "
                                         f"by scripts/flux_listings.py: w1 ({LOKR_FACTOR}, {LOKR_FACTOR}), kron(w1, "
                                         "w2) = the FLUX.1 layer's (out, in)", "shapes": consistent_lokr(shapes)})
        print(f"{name}: {len(shapes)} keys from {file}")


if __name__ == "__main__":
    main()
