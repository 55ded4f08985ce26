"""Malformed LoRA files for the fuzz tests: seed files (factory-made for the tiny model, and real ones) and
mutations at every level a file can be wrong — tensors (shape, dtype, NaN/inf, keys), containers (safetensors,
pickles of parameters, sparse, ``meta`` and broadcast tensors), header JSON (fields, metadata, raw text such as deep
nesting, ``Infinity``, 5,000-digit numbers) and bytes (flips, truncation, the length prefix)."""
from __future__ import annotations

import json
import random
import struct
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save as st_save

from .conftest import REAL_LORAS
from .factories import adapter_tensors, kohya_name

StateDict = dict[str, torch.Tensor]
TINY_LAYERS = {  # canonical path → weight shape in tests.factories.tiny_components("sd1")
    "unet.conv_in": (32, 4, 3, 3),
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (32, 32),
    "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k": (64, 32),
    "unet.down_blocks.1.resnets.0.conv1": (64, 32, 3, 3),
    "unet.down_blocks.1.resnets.0.conv_shortcut": (64, 32, 1, 1),
    "unet.mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj": (512, 64),
}
SEED_KINDS = ["lora", "locon-tucker", "loha", "loha-tucker", "lokr", "lokr-tucker", "ia3-input", "glora", "oft",
              "boft", "full", "dora-out", "dora-in", "doha", "dokr", "glora-old", "oft-diag-old", "lokr-decomposed"]
REAL_FILES = ["cloneofsimo_sd15_disney.safetensors", "diffusers_attnprocs_sd15_pokemon.safetensors",
              "diffusers_attnprocs_sd15_catundchat.bin"]
LEAVES = ["lora_up.weight", "lora_down.weight", "lora_mid.weight", "alpha", "scale", "hada_w1_a", "hada_t1",
          "lokr_w1", "lokr_w2_b", "lokr_t2", "oft_blocks", "oft_diag", "rescale", "a1.weight", "b2.weight", "diff",
          "diff_b", "w_norm", "on_input", "weight", "dora_scale", "lora_A.weight", "lora_B.weight"]
RAW_JSON = ["[" * 100_000 + "]" * 100_000, "{\"a\":" * 50_000 + "1" + "}" * 50_000, "Infinity", "-Infinity", "NaN",
            "1e400", "9" * 5000, "-1", "1.5", "true", "null", "\"F32\"", "[1e400]", "[Infinity, 1]", "[true, 2]",
            "[0, 18446744073709551616]", "[-4, 0]", "[[1, 2]]", "[\"1\"]", "{}", "[]", "[4, 0]", "[0]"]


def seed_kohya(kinds: list[str], rank: int = 4, seed: int = 0) -> StateDict:
    """A kohya-named file for the tiny model: one layer per entry of ``TINY_LAYERS``, types taken in turn."""
    gen = torch.Generator().manual_seed(seed)
    sd: StateDict = {}
    for i, (path, shape) in enumerate(TINY_LAYERS.items()):
        for leaf, t in adapter_tensors(kinds[i % len(kinds)], shape, rank, gen).items():
            sd[f"{kohya_name(path)}.{leaf}"] = t
    return sd


def seed_peft() -> tuple[StateDict, dict[str, str]]:
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    t = adapter_tensors("lora", (32, 32))
    sd = {f"unet.{path}.lora_A.weight": t["lora_down.weight"], f"unet.{path}.lora_B.weight": t["lora_up.weight"],
          f"unet.{path}.lora_magnitude_vector": 1 + torch.rand(32)}
    return sd, {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 8})}


def seed_cloneofsimo() -> tuple[StateDict, dict[str, str]]:
    """Indices 0–3: attn1 q/k/v/out of the first transformer block, which the tiny model has (32×32)."""
    gen = torch.Generator().manual_seed(1)
    sd = {f"unet:{i}:{leaf}": torch.randn(shape, generator=gen) * 0.1 for i in range(4)
          for leaf, shape in (("up", (32, 2)), ("down", (2, 32)))}
    sd["<s1>"] = torch.randn(32, generator=gen)
    return sd, {"unet": json.dumps(["CrossAttention", "Attention", "GEGLU"]), "<s1>": "<embed>"}


def seeds() -> list[tuple[str, StateDict, dict[str, str]]]:
    peft, peft_meta = seed_peft()
    clone, clone_meta = seed_cloneofsimo()
    return [("kohya-a", seed_kohya(SEED_KINDS[0::2]), {"ss_network_dim": "4", "ss_network_alpha": "2"}),
            ("kohya-b", seed_kohya(SEED_KINDS[1::2], seed=1), {}),
            ("peft", peft, peft_meta), ("cloneofsimo", clone, clone_meta)]


# --- tensor-level mutations (the file stays well-formed) -----------------------------------------------------------

def mutate_tensors(sd: StateDict, meta: dict[str, str], rng: random.Random) -> None:
    """One change to the tensors, keys or metadata of a state dict, in place."""
    if not sd:
        return
    key = rng.choice(sorted(sd))
    t = sd[key]
    op = rng.choice(["shape", "shape", "value", "dtype", "drop", "rename", "scalar", "meta", "add"])
    if op == "shape":
        dims = [rng.choice([0, 1, 2, 3, 4, 8, 32, 64, 65]) for _ in range(rng.choice([0, 1, 2, 2, 3, 4, 4, 5]))]
        sd[key] = torch.randn(dims) * 0.1
    elif op == "value" and t.numel():
        flat = t.float().flatten().clone()
        flat[rng.randrange(flat.numel())] = rng.choice([float("nan"), float("inf"), -float("inf"), 0.0, 1e30])
        sd[key] = flat.reshape(t.shape)
    elif op == "dtype":
        sd[key] = t.to(rng.choice([torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int8, torch.bool,
                                   torch.uint8]))
    elif op == "drop":
        del sd[key]
    elif op in ("rename", "add"):
        sd[_renamed(key, rng)] = sd[key].clone() if op == "add" else sd.pop(key)
    elif op == "scalar":
        sd[key] = torch.tensor(rng.choice([0.0, 4.0, -1.0, float("nan")]))
    elif op == "meta":
        meta[rng.choice(["lora_adapter_metadata", "unet", "text_encoder", "ss_tag_frequency", "ss_network_alpha",
                         "modelspec.architecture", "ss_base_model_version", key])] = rng.choice(META_VALUES)


META_VALUES = ["", "null", "[]", "{}", "{\"unet.lora_alpha\": 1e400}", "{\"unet.lora_alpha\": \"8\"}",
               "{\"unet.alpha_pattern\": [1]}", "{\"unet.use_rslora\": true, \"unet.lora_alpha\": 4}", "[1, 2]",
               "[" * 10_000, "[" * 3000 + "]" * 3000, "{\"a\": {\"b\": 1}}", "<embed>", "sdxl", "flux1", "sd_v1",
               "9" * 5000, "{\"x\": \"" + "9" * 5000 + "\"}", "not json", "[\"GEGLU\"]", "\"CrossAttention\""]


def _renamed(key: str, rng: random.Random) -> str:
    module, dot, _ = key.rpartition(".")
    choice = rng.randrange(4)
    if ":" in key:  # cloneofsimo: another index, another leaf, or an absurd index
        comp = key.partition(":")[0]
        index = rng.choice(["0", "4", "143", "144", "1000000000", "9" * 40, "-1"])
        return f"{rng.choice([comp, 'text_encoder', 'unet'])}:{index}:{rng.choice(['up', 'down', 'alpha', 'rank'])}"
    if choice == 0:
        return f"{module}.{rng.choice(LEAVES)}" if dot else f"{key}.{rng.choice(LEAVES)}"
    if choice == 1:
        return key.replace("lora_unet_", rng.choice(["lora_te_", "lora_te2_", "lycoris_", "lora_unet_x", ""]), 1)
    if choice == 2:
        return key + rng.choice([".weight", "_x", ".default", ""])
    return rng.choice(["unet:1000000000:up", "text_encoder:4000000000:down", "bundle_emb.x.string_to_param.*",
                       "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight", "a", ""])


# --- containers ------------------------------------------------------------------------------------------------------

def as_safetensors(sd: StateDict, meta: dict[str, str]) -> bytes:
    return st_save({k: v.contiguous() for k, v in sd.items()}, metadata=meta or None)


def as_pickle(sd: StateDict, path: Path, rng: random.Random) -> None:
    """``torch.save`` of ``sd``, sometimes with one tensor made a Parameter, sparse, ``meta``, complex or a
    broadcast view, or nested under ``state_dict``."""
    out: dict[str, object] = dict(sd)
    if sd:
        key = rng.choice(sorted(sd))
        t = sd[key].float()
        out[key] = rng.choice([lambda: torch.nn.Parameter(t), lambda: t.to_sparse(), lambda: torch.empty(
            t.shape, device="meta"), lambda: t.to(torch.complex64), lambda: torch.zeros(()).expand(t.shape),
            lambda: t])()
    torch.save(rng.choice([out, {"state_dict": out, "epoch": 1}, list(out.values()), {}]), str(path))


# --- header and byte mutations (safetensors) --------------------------------------------------------------------

def mutate_header(raw: bytes, rng: random.Random) -> bytes:
    """Change one field of the header JSON (a random value or raw text), then re-frame the file."""
    (n,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8:8 + n]), raw[8 + n:]
    entries = [k for k in header if k != "__metadata__"] or ["__metadata__"]
    key = rng.choice(entries)
    marker = "\u2603RAW\u2603"
    field = rng.choice(["dtype", "shape", "data_offsets", "entry", "metadata"])
    value: object = rng.choice([marker, marker, None, True, 3, -1, 2.5, "F32", "x", [], {}, [1, 2, 3], {"a": 1}])
    if field == "entry":
        header[key] = value
    elif field == "metadata":
        header["__metadata__"] = rng.choice([value, {"a": value}, {"lora_adapter_metadata": marker}])
    elif isinstance(header.get(key), dict):
        header[key][field] = value
    text = json.dumps(header).replace(json.dumps(marker), rng.choice(RAW_JSON))
    return struct.pack("<Q", len(text.encode())) + text.encode() + data


def mutate_bytes(raw: bytes, rng: random.Random) -> bytes:
    """Flip bytes (mostly in the header), truncate, or rewrite the length prefix."""
    op = rng.choice(["flip", "flip", "truncate", "prefix", "append"])
    (n,) = struct.unpack("<Q", raw[:8]) if len(raw) >= 8 else (0,)
    if op == "flip" and raw:
        b = bytearray(raw)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(min(len(b), 8 + n + 64))] = rng.randrange(256)
        return bytes(b)
    if op == "truncate":
        return raw[:rng.randrange(len(raw) + 1)]
    if op == "prefix":
        return struct.pack("<Q", rng.choice([0, 1, n - 1, n + 1, 2 ** 63, len(raw), 100 * 2 ** 20])) + raw[8:]
    return raw + bytes(rng.randrange(1, 9))


def make_case(rng: random.Random, folder: Path, name: str) -> Path:
    """A mutated file ``folder/name.<suffix>``, every choice drawn from ``rng`` (hypothesis' shrinkable ``randoms()``
    in the fuzz tests): a seed file, 0–3 tensor mutations, a container, then for safetensors sometimes a header or
    byte mutation."""
    real = rng.random() < 0.1
    if real:
        name = rng.choice(REAL_FILES)
        raw = (REAL_LORAS / name).read_bytes()
        suffix = Path(name).suffix
    else:
        _, sd, meta = rng.choice(seeds_cached())
        sd, meta = dict(sd), dict(meta)
        for _ in range(rng.choice([0, 1, 1, 2, 3])):
            mutate_tensors(sd, meta, rng)
        suffix = rng.choice([".safetensors"] * 5 + [".pt", ".bin"])
        if suffix != ".safetensors":
            path = folder / f"{name}{suffix}"
            as_pickle(sd, path, rng)
            return path
        raw = as_safetensors(sd, meta)
    mutations: list[Callable[[bytes, random.Random], bytes]] = [mutate_header, mutate_bytes]
    if suffix == ".safetensors" and rng.random() < (0.9 if real else 0.4):
        raw = rng.choice(mutations)(raw, rng)
    elif real and suffix == ".bin":
        raw = mutate_bytes(raw, rng)
    path = folder / f"{name}{suffix}"
    path.write_bytes(raw)
    return path


_SEEDS: list[tuple[str, StateDict, dict[str, str]]] = []


def seeds_cached() -> list[tuple[str, StateDict, dict[str, str]]]:
    if not _SEEDS:
        _SEEDS.extend(seeds())
    return _SEEDS
