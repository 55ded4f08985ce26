"""What ``lorakit train`` writes: a kohya-format LoRA (``lora_unet_…``/``lora_te_…``; LyCORIS leaves for LoHa/LoKr;
``dora_scale``) with kohya's ``ss_*`` training metadata, the ``sshs_*`` hashes and ``modelspec.*`` — so A1111,
ComfyUI and lorakit's library show the base, the rank and the trigger words — and the resume checkpoint."""
from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any

import torch

from ..errors import TrainingError
from ..formats.writers import to_kohya
from ..keymap.arch import Arch
from ..files.output import atomic_file
from ..lora_model import all_finite
from ..tools.output import entries_of, write_safetensors
from ..tools.sources import BASE_VERSION, MODELSPEC
from ..tools.writing import loads_back
from .network import Network

DEMO_BASE = "lorakit_demo"  # ss_base_model_version of LoRAs made for the embedded demo model
DEMO_SPEC = "lorakit-demo"
CHECKPOINT_FORMAT = "lorakit.train-state/1"


def base_metadata(arch: Arch) -> dict[str, str]:
    if arch == Arch.DEMO:
        return {"ss_base_model_version": DEMO_BASE, "ss_v2": "False", "modelspec.architecture": f"{DEMO_SPEC}/lora"}
    if arch not in BASE_VERSION:
        raise TrainingError(f"the model's architecture ({arch}) is not SD1, SD2 or SDXL: nothing to train on")
    return {"ss_base_model_version": BASE_VERSION[arch], "ss_v2": str(arch == Arch.SD2),
            "modelspec.architecture": f"{MODELSPEC[arch]}/lora"}


def network_metadata(net: Network) -> dict[str, str]:
    spec = net.spec
    lycoris = spec.kind in ("loha", "lokr", "dora")
    args = spec.args()
    if spec.kind == "dora":
        args.update(algo="lora", dora_wd="True")
    return {"ss_network_module": "lycoris.kohya" if lycoris else "networks.lora",
            "ss_network_dim": str(spec.rank), "ss_network_alpha": f"{spec.alpha:g}",
            "ss_network_args": json.dumps(args)}


def write_lora(path: Path, net: Network, arch: Arch, metadata: dict[str, str], dtype: torch.dtype) -> dict[str, str]:
    """The network's current values as a kohya file at ``path`` (atomic); returns the metadata written."""
    names_arch = Arch.SD1 if arch in (Arch.DEMO, Arch.UNKNOWN) else arch
    groups = net.groups(dtype)
    bad = sorted(p for p, leaves in groups.items() if not all(all_finite(t) for t in leaves.values()))
    if bad:
        raise TrainingError(f"{path}: {len(bad)} layers (first {bad[0]}) are not finite in {str(dtype)[6:]}: the "
                            "values overflow it (lower --lr, or --save-dtype fp32); nothing was written")
    sd = to_kohya(groups, names_arch)
    meta = {"modelspec.implementation": "lorakit", **metadata, "modelspec.sai_model_spec": "1.0.0",
            "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S")}
    return write_safetensors(path, entries_of(sd), meta, sshs=True, desc="saving", verify=loads_back(path))


def save_state(path: Path, state: dict[str, Any]) -> None:
    """The resume checkpoint (network values, optimizer, LR schedule, step, random state): written to a temporary
    name and renamed, so an interrupted run keeps its last checkpoint whole."""
    buf = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, **state}, buf)
    with atomic_file(path) as f:
        f.write(buf.getvalue())


def load_state(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise TrainingError(f"{path}: no such checkpoint") from None
    except Exception as e:  # noqa: BLE001 — torch raises many types for a broken file
        raise TrainingError(f"{path}: not a lorakit training checkpoint ({type(e).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise TrainingError(f"{path}: not a lorakit training checkpoint (expected format {CHECKPOINT_FORMAT})")
    return state
