"""SD3, Chroma, Qwen-Image and quantized inputs of the CLI fuzz harness, cheap: each family's tiny model as a
diffusers folder (SD3 also as SAI single files: a bare transformer, and one with a wrong shape), its LoRAs in the
dialects its trainers write (kohya/SAI, diffusers/PEFT, ComfyUI), a NaN one and mutated ones (``file_mutations``);
fp8 FLUX.1 files (unscaled, ComfyUI's legacy and new scales) and broken quantized files — fp8 scales of the wrong
shape, NaN or zero, a format lorakit does not read; GGUF files whose tensor table names a type id that does not
exist or another type than the data has, or a shape whose rows are not whole blocks."""
from __future__ import annotations

import json
import random
import shutil
import struct
from pathlib import Path

import torch

from lorakit.files.io import load_file, save_file

from .file_mutations import as_safetensors, mutate_bytes, mutate_header, mutate_tensors
from .flux_factories import fp8_state

Files = dict[str, Path]
Second = tuple[str, str, dict[str, torch.Tensor], dict[str, str]]  # key, file stem, tensors, metadata
SD3_META = {"modelspec.architecture": "stable-diffusion-3-medium/lora"}
MUTATED = 4  # mutated LoRAs of each family


FAMILIES = ("sd3", "chroma", "qwen")
WRONG = {"sd3": "chroma", "chroma": "qwen", "qwen": "sd3"}  # the wrong family's LoRA each LoRA folder holds


def dit_inputs(d: Path) -> dict[str, Files]:
    """``{"loras", "models", "folders", "texts"}`` under ``d``, keyed as the workspace's tokens name them:
    ``{lora:sd3}``, ``{model:chroma}``, ``{folder:qwen_loras}``, ``{text:jobs_sd3}``. Each family's LoRA folder
    holds its LoRAs (``<lora:sd3_style:1>``) and another family's as ``wrong`` (``<lora:wrong:1>``)."""
    out: dict[str, Files] = {"loras": {}, "models": {}, "folders": {}, "texts": {}}
    for family, make in (("sd3", _sd3), ("chroma", _chroma), ("qwen", _qwen)):
        folder = d / family / "loras"
        folder.mkdir(parents=True, exist_ok=True)
        fl, fm = make(d / family, folder)
        good = load_file(fl[family])
        out["loras"] |= fl | _mutated(family, good[0], good[1], d / family)
        out["models"] |= fm
        out["folders"][f"{family}_loras"] = folder
        for name, job in ((f"jobs_{family}", {"prompt": f"a cat <lora:{family}_style:0.5>", "cfg_scale": 2}),
                          (f"jobs_{family}_wrong", {"prompt": "a dog <lora:wrong:1>"})):
            out["texts"][name] = d / family / f"{name}.jsonl"
            out["texts"][name].write_text(json.dumps({**job, "steps": 1, "width": 64, "height": 64}) + "\n")
    for family, other in WRONG.items():
        shutil.copyfile(out["loras"][other], out["folders"][f"{family}_loras"] / "wrong.safetensors")
    return out


def _sd3(d: Path, folder: Path) -> tuple[Files, Files]:
    from .sd3_factories import kohya_keys, sai_lora, sai_state, split_to_diffusers, tiny_sd3_pipeline

    pipe = tiny_sd3_pipeline()
    tr = pipe.transformer  # type: ignore[attr-defined]
    models = {"sd3": d / "sd3", "sd3_sai": d / "sd3-tiny.safetensors", "sd3_bad_shape": d / "sd3-bad.safetensors",
              "sd3_tuned": d / "sd3-tuned"}
    pipe.save_pretrained(models["sd3"])  # type: ignore[attr-defined]
    state = sai_state(tr)
    with torch.no_grad():  # a tuned copy for extract: the joint blocks' weights moved
        for name, p in tr.named_parameters():
            if name.startswith("transformer_blocks.") and p.dim() == 2:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    pipe.save_pretrained(models["sd3_tuned"])  # type: ignore[attr-defined]
    save_file(state, models["sd3_sai"])
    save_file({**state, "joint_blocks.0.x_block.attn.proj.weight": torch.zeros(8, 32)}, models["sd3_bad_shape"])
    layers = sai_lora(tr, "lora", rank=2, seed=3)
    second: Second = ("sd3_diffusers", "sd3_peft", _peft("transformer.", split_to_diffusers(tr, layers)), {})
    return _family_loras(d, folder, "sd3", kohya_keys(layers), SD3_META, second), models


def _chroma(d: Path, folder: Path) -> tuple[Files, Files]:
    from .chroma_factories import chroma_lora, tiny_chroma_pipeline
    from .flux_factories import kohya_keys

    pipe = tiny_chroma_pipeline()
    models = {"chroma": d / "chroma"}
    pipe.save_pretrained(models["chroma"])  # type: ignore[attr-defined]
    layers = chroma_lora(pipe.transformer, "lora", rank=2, seed=4)  # type: ignore[attr-defined]
    comfy = _peft("diffusion_model.", layers)
    second: Second = ("chroma_comfy", "chroma_comfy", comfy, {"modelspec.architecture": "chroma/lora"})
    return _family_loras(d, folder, "chroma", kohya_keys(layers), {"ss_base_model_version": "chroma"}, second), models


def _qwen(d: Path, folder: Path) -> tuple[Files, Files]:
    from .qwen_factories import kohya_name, qwen_lora, tiny_qwen_pipeline

    pipe = tiny_qwen_pipeline()
    models = {"qwen": d / "qwen"}
    pipe.save_pretrained(models["qwen"])  # type: ignore[attr-defined]
    layers = qwen_lora(pipe.transformer, "lora", rank=2, seed=5)  # type: ignore[attr-defined]
    kohya = {f"{kohya_name(m)}.{leaf}": t for m, leaves in layers.items() for leaf, t in leaves.items()}
    second: Second = ("qwen_diffusers", "qwen_peft", _peft("transformer.", layers), {})
    return _family_loras(d, folder, "qwen", kohya, {}, second), models


def _family_loras(d: Path, folder: Path, family: str, kohya: dict[str, torch.Tensor], meta: dict[str, str],
                  second: Second) -> Files:
    """A family's LoRA files: its kohya file (``FAMILY_style`` in the LoRA folder), a second dialect's (``second``:
    key, file stem, tensors, metadata) beside it, and a NaN copy of the kohya file outside the folder."""
    key, stem, tensors, second_meta = second
    loras = {family: folder / f"{family}_style.safetensors", key: folder / f"{stem}.safetensors",
             f"{family}_nan": d / f"{family}_nan.safetensors"}
    save_file(kohya, loras[family], meta)
    save_file(tensors, loras[key], second_meta)
    save_file(_nan(kohya), loras[f"{family}_nan"], meta)
    return loras


def _peft(prefix: str, layers: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """diffusers/PEFT names (``lora_A``/``lora_B``, no α) of module → kohya leaves."""
    return {f"{prefix}{m}.lora_{ab}.weight": leaves[f"lora_{kind}.weight"].contiguous()
            for m, leaves in layers.items() for ab, kind in (("A", "down"), ("B", "up"))}


def _nan(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.clone().fill_(float("nan")) if "up" in k else v for k, v in sd.items()}


def _mutated(family: str, sd: dict[str, torch.Tensor], meta: dict[str, str], d: Path) -> Files:
    """``MUTATED`` copies of a family's good LoRA, each changed by ``file_mutations``: tensors, header or bytes."""
    out = {}
    for i in range(MUTATED):
        rng = random.Random(f"{family}{i}")
        sd2, meta2 = dict(sd), dict(meta)
        for _ in range(rng.choice([1, 1, 2, 3])):
            mutate_tensors(sd2, meta2, rng)
        raw = as_safetensors(sd2, meta2)
        if rng.random() < 0.4:
            raw = rng.choice([mutate_header, mutate_bytes])(raw, rng)
        out[f"{family}_mutated{i}"] = d / f"{family}_mutated{i}.safetensors"
        out[f"{family}_mutated{i}"].write_bytes(raw)
    return out


# -- quantized files --------------------------------------------------------------------------------------------
def quant_inputs(d: Path, bfl: Path, gguf: Path) -> Files:
    """fp8 files of the tiny FLUX.1 (BFL file ``bfl``), good and broken, and broken copies of the Q8_0 GGUF
    ``gguf``: tokens ``{model:fp8}``, ``{model:fp8_legacy}``, ``{model:gguf_type99}`` …"""
    d.mkdir(parents=True, exist_ok=True)
    state = load_file(bfl)[0]
    out = {name: d / f"{name}.safetensors" for name in
           ("fp8", "fp8_legacy", "fp8_new", "fp8_scale_shape", "fp8_scale_nan", "fp8_scale_zero", "fp8_nvfp4",
            "fp8_orphan")}
    for name in ("fp8", "fp8_legacy", "fp8_new"):
        save_file(fp8_state(state, name.removeprefix("fp8").lstrip("_") or "plain"), out[name])
    layer = "model.diffusion_model.double_blocks.0.img_attn.proj"
    broken = {"fp8_scale_shape": ("legacy", {f"{layer}.scale_weight": torch.ones(3)}),
              "fp8_scale_nan": ("legacy", {f"{layer}.scale_weight": torch.tensor(float("nan"))}),
              "fp8_scale_zero": ("new", {f"{layer}.weight_scale": torch.zeros(())}),
              "fp8_nvfp4": ("new", {f"{layer}.comfy_quant": torch.tensor(list(b'{"format": "nvfp4"}'),
                                                                         dtype=torch.uint8)}),
              "fp8_orphan": ("legacy", {"model.diffusion_model.nowhere.scale_weight": torch.tensor(1.0)})}
    for name, (layout, change) in broken.items():
        save_file({**fp8_state(state, layout), **change}, out[name])
    raw = gguf.read_bytes()
    first = "double_blocks.0.img_attn.qkv.weight"
    for name, patched in (("gguf_type99", _gguf_patch(raw, first, type_id=99)),
                          ("gguf_wrong_type", _gguf_patch(raw, first, type_id=2)),  # Q4_0 claimed, Q8_0 data
                          ("gguf_odd_shape", _gguf_patch(raw, first, dims=(40, 96))),  # 40: not whole 32-blocks
                          ("gguf_huge_count", raw[:8] + struct.pack("<Q", 1 << 60) + raw[16:])):
        out[name] = d / f"{name}.gguf"
        out[name].write_bytes(patched)
    return out


def _gguf_patch(raw: bytes, name: str, type_id: int | None = None, dims: tuple[int, ...] | None = None) -> bytes:
    """``raw`` with the tensor table entry of ``name`` given another type id or other dimensions (GGUF v3: name as
    u64 length + bytes, u32 n_dims, u64 dims, u32 type, u64 offset)."""
    key = struct.pack("<Q", len(name)) + name.encode()
    at = raw.index(key) + len(key)
    (n_dims,) = struct.unpack_from("<I", raw, at)
    old_dims = struct.unpack_from(f"<{n_dims}Q", raw, at + 4)
    (old_type,) = struct.unpack_from("<I", raw, at + 4 + 8 * n_dims)
    new_dims = dims if dims is not None else old_dims
    assert len(new_dims) == n_dims
    entry = struct.pack(f"<I{n_dims}QI", n_dims, *new_dims, old_type if type_id is None else type_id)
    return raw[:at] + entry + raw[at + len(entry):]
