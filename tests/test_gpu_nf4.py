"""On CUDA (skipped without it, or without bitsandbytes): a tiny FLUX.1 folder whose transformer diffusers
quantized to NF4 (``BitsAndBytesConfig``, nested absmax) and saved, loaded back by ``load_model``. Every LoRA type is
bit for bit ``F.linear(x, round_c(fp32(dequantize_4bit(W)) + ΔW), b)``; strength 0 is bitsandbytes' own forward —
bit for bit where it takes its dequantize path (more than 1,536 tokens), within rounding where it picks its fused
4-bit kernel; restore keeps every stored byte; generation with a LoRA runs and restore gives the same image."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lorakit import apply_loras, restore
from lorakit.generate.pipeline import Generator, Request
from lorakit.lora_model import lora_from_state_dict
from lorakit.models.loading import load_model
from lorakit.quant.layers import is_quantized, quant_name
from tests.factories import fused_sum
from tests.flux_factories import H, bfl_lora, kohya_keys, tiny_flux_components

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
C = torch.bfloat16
KINDS = ["lora", "lokr", "loha", "dora-in", "dora-out", "full", "oft", "glora", "ia3"]


@pytest.fixture(scope="module")
def nf4_dir(tiny_flux_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("bitsandbytes")
    from diffusers import BitsAndBytesConfig, FluxTransformer2DModel

    path = tmp_path_factory.mktemp("nf4") / "tinyflux-nf4"
    shutil.copytree(tiny_flux_dir, path)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=C)
    tr = FluxTransformer2DModel.from_pretrained(str(tiny_flux_dir / "transformer"), quantization_config=config,
                                                torch_dtype=C, local_files_only=True)
    shutil.rmtree(path / "transformer")
    tr.save_pretrained(path / "transformer")
    return path


def _stored(module: torch.nn.Module) -> bytes:
    qs = module.weight.quant_state
    parts = [module.weight.data, qs.absmax, qs.code] + ([qs.state2.absmax, qs.state2.code] if qs.nested else [])
    digest = hashlib.sha256()
    for t in parts:
        digest.update(t.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy().tobytes())
    return digest.digest()


def _w(module: torch.nn.Module) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state).to(C)


def test_nf4_folder_every_type_exact_and_restore_keeps_every_byte(nf4_dir: Path) -> None:
    model = load_model(str(nf4_dir), device="cuda", dtype="bf16")
    tr = model.pipe.transformer
    quantized = {n: m for n, m in tr.named_modules() if is_quantized(m)}
    assert quantized and all(quant_name(m) == "nf4 (nested)" for m in quantized.values())
    dense = tiny_flux_components(seed=0)["transformer"]  # the same shapes, dense: the LoRAs' sizes
    loras = [lora_from_state_dict(kohya_keys(bfl_lora(dense, k, seed=i)), {}, name=k) for i, k in enumerate(KINDS)]
    stored = {n: _stored(m) for n, m in quantized.items()}
    comps = {"transformer": tr}
    x = torch.randn(2, 3, H, device="cuda", generator=torch.Generator("cuda").manual_seed(1)).to(C)
    many = torch.randn(1600, H, device="cuda", generator=torch.Generator("cuda").manual_seed(2)).to(C)
    own = {n: (m(x), m(many)) for n, m in quantized.items() if m.in_features == H}
    for lora in loras:
        with apply_loras(comps, [(lora, 0.8)]):
            for name, module in quantized.items():
                adapter = lora.layers.get(f"transformer.{name}")  # type: ignore[attr-defined]
                if adapter is None or module.in_features != H:
                    continue
                if getattr(adapter, "originals", "unbound") is None:
                    adapter = adapter.bind(lambda p: _w(tr.get_submodule(p.split(".", 1)[1])))
                w32 = _w(module).float()
                w = fused_sum(w32, [(adapter, 0.8)]).to(C)
                db = adapter.bias_delta(0.8) if adapter.changes_bias else None
                b = module.bias.float() if db is None else module.bias.float() + db.reshape(-1)
                assert torch.equal(module(x), F.linear(x, w, b.to(C))), f"{lora.name} {name}"  # type: ignore[attr-defined]
    t = {k: v for k, v in kohya_keys(bfl_lora(dense, "lora", seed=9)).items()}
    zero = lora_from_state_dict({k: torch.zeros_like(v) if "lora_up" in k else v for k, v in t.items()}, {})
    with apply_loras(comps, [(zero, 1.0)]):
        for name, (small, big) in own.items():
            assert torch.equal(quantized[name](many), big), name  # bitsandbytes' dequantize path
            assert (quantized[name](x).float() - small.float()).abs().max() <= 2e-2 * small.float().abs().max()
    restore(comps)
    assert all(_stored(m) == stored[n] for n, m in quantized.items())


def test_nf4_generation_with_a_lora_and_restore(nf4_dir: Path, tmp_path: Path) -> None:
    from lorakit.files.io import save_file
    from lorakit.library import Library

    dense = tiny_flux_components(seed=0)["transformer"]
    big = {b: {k: v * 20 if k == "lora_up.weight" else v for k, v in ls.items()}
           for b, ls in bfl_lora(dense, "lora", seed=1).items()}
    (tmp_path / "loras").mkdir()
    save_file(kohya_keys(big), tmp_path / "loras" / "style.safetensors", {"ss_base_model_version": "flux1"})
    gen = Generator(load_model(str(nf4_dir), device="cuda", dtype="bf16"),
                    Library([tmp_path / "loras"], index=tmp_path / "i.sqlite3"))

    def image(prompt: str) -> np.ndarray:
        result = gen(Request(prompt, steps=2, width=64, height=64, seed=1))
        return np.asarray(result.images[0], dtype=np.int16)

    plain = image("a red circle")
    styled = image("a red circle <lora:style:1>")
    assert np.abs(styled - plain).mean() > 0.5
    assert np.array_equal(image("a red circle"), plain)
