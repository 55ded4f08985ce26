"""LoRAs on bitsandbytes 4-bit bases (NF4 nested / plain, FP4) on the CPU: a tiny FLUX.1 whose Linears are
``bnb.nn.Linear4bit``. Each patched layer is bit for bit ``F.linear(x, round_c(fp32(W) + ΣΔWᵢ), b)`` with W from
bitsandbytes' ``dequantize_4bit`` called here, strength 0 is bitsandbytes' own forward, every stored byte (packed
nibbles, absmax, nested absmax, code books) survives 200 apply/switch/restore cycles, the requant opt-in reports
the loss it causes. bitsandbytes' CPU forward takes its dequantize path here (``support_avx512bf16_for_cpu`` off,
as on a CPU without AVX512-BF16 — its AVX512 path rewrites the weight and needs in_features ≥ the block size);
the rewritten layout is tested on its own. Without bitsandbytes these skip; CUDA cases are in test_gpu_nf4."""
from __future__ import annotations

import copy
import hashlib
import random

import pytest
import torch
import torch.nn.functional as F

from lorakit import apply_loras, restore
from lorakit.lora_model import lora_from_state_dict
from lorakit.quant.layers import compute_dtype, dq, is_quantized, quant_name, weight_shape, weight_values
from lorakit.quant.make import bnb4_linear, quantize_linears
from tests.factories import adapter_tensors, fused_sum
from tests.flux_factories import H, bfl_lora, kohya_keys, tiny_flux_components

bnb = pytest.importorskip("bitsandbytes")
bnbf = pytest.importorskip("bitsandbytes.functional")

C = torch.bfloat16
QUANTS = {"nf4_nested": ("nf4", True), "nf4": ("nf4", False), "fp4": ("fp4", False)}
KINDS = ["lora", "lokr", "loha", "dora-in", "dora-out", "full", "oft", "glora", "ia3"]


def _model(quant: str, seed: int = 0) -> tuple[dict[str, torch.nn.Module], list[object]]:
    comps = tiny_flux_components(seed=seed, dtype=C)
    tr = comps["transformer"]
    loras = [lora_from_state_dict(kohya_keys(bfl_lora(tr, k, seed=i)), {}, name=k) for i, k in enumerate(KINDS)]
    qtype, nested = QUANTS[quant]
    quantize_linears(tr, lambda name, lin: bnb4_linear(lin, C, qtype, nested))
    for m in tr.modules():
        if is_quantized(m):
            m.support_avx512bf16_for_cpu = False
    return comps, loras


def _stored(module: torch.nn.Module) -> bytes:
    """Every stored tensor of a 4-bit weight: packed data and the quant state's (nested absmax and code books)."""
    qs = module.weight.quant_state
    parts = [module.weight.data, qs.absmax, qs.code]
    if qs.nested:
        parts += [qs.state2.absmax, qs.state2.code, qs.offset]
    digest = hashlib.sha256()
    for t in parts:
        digest.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.digest()


def _w(module: torch.nn.Module) -> torch.Tensor:
    """The layer's weight as bitsandbytes dequantizes it, called directly (independent of lorakit's ``dq``)."""
    return bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state).to(C)


def _reference(module: torch.nn.Module, adapter: object, m: float, x: torch.Tensor) -> torch.Tensor:
    w32 = _w(module).float()
    w = fused_sum(w32, [(adapter, m)]).to(C)  # type: ignore[attr-defined]
    b32 = module.bias.float()
    db = adapter.bias_delta(m) if adapter.changes_bias else None  # type: ignore[attr-defined]
    return F.linear(x, w, (b32 if db is None else b32 + db.reshape(b32.shape)).to(C))


def test_a_4bit_layer_reads_as_its_own_dequantization() -> None:
    layer = bnb4_linear(torch.nn.Linear(H, 3 * H), C, "nf4", True)
    assert is_quantized(layer) and weight_shape(layer) == (3 * H, H) and quant_name(layer) == "nf4 (nested)"
    assert tuple(layer.weight.shape) != (3 * H, H)  # packed bytes
    assert compute_dtype(layer) == C and torch.equal(dq(layer), _w(layer)) and torch.equal(weight_values(layer), _w(layer))


@pytest.mark.parametrize("quant", list(QUANTS))
def test_every_type_on_4bit_layers_is_the_exact_merge(quant: str) -> None:
    comps, loras = _model(quant)
    tr = comps["transformer"]
    quantized = {n: m for n, m in tr.named_modules() if is_quantized(m)}
    stored = {n: _stored(m) for n, m in quantized.items()}
    x = torch.randn(2, 3, H, generator=torch.Generator().manual_seed(1)).to(C)
    checked = 0
    for lora, m in zip(loras, (0.7, -0.4, 1.0, 0.9, 0.6, 1.2, 1.0, 0.8, 0.5)):
        with apply_loras(comps, [(lora, m)]):
            for name, module in quantized.items():
                adapter = lora.layers.get(f"transformer.{name}")  # type: ignore[attr-defined]
                if adapter is None or module.in_features != H:
                    continue
                if getattr(adapter, "originals", "unbound") is None:  # a fused part reading the fused weight
                    adapter = adapter.bind(lambda p: _w(tr.get_submodule(p.split(".", 1)[1])))
                assert torch.equal(module(x), _reference(module, adapter, m, x)), f"{lora.name} {name}"  # type: ignore[attr-defined]
                checked += 1
        assert all(_stored(mod) == stored[n] for n, mod in quantized.items())
    assert checked > 9 * 5


@pytest.mark.parametrize("quant", ["nf4_nested", "fp4"])
def test_zero_change_is_bitsandbytes_own_forward_and_restore_keeps_every_byte(quant: str) -> None:
    comps, loras = _model(quant, seed=4)
    tr = comps["transformer"]
    quantized = {n: m for n, m in tr.named_modules() if is_quantized(m)}
    x = torch.randn(2, 3, H, generator=torch.Generator().manual_seed(2)).to(C)
    before = {n: m(x) for n, m in quantized.items() if m.in_features == H}
    t = adapter_tensors("lora", (3 * H, H))
    zero = lora_from_state_dict({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": t["lora_down.weight"],
                                 "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight":
                                     torch.zeros_like(t["lora_up.weight"])}, {})
    stored = {n: _stored(m) for n, m in quantized.items()}
    with apply_loras(comps, [(zero, 1.0)]):
        assert "forward" in vars(tr.transformer_blocks[0].attn.to_q)  # merged per forward, with ΔW = 0
        assert all(torch.equal(quantized[n](x), y) for n, y in before.items())
    rng = random.Random(0)
    for _ in range(200):
        chosen = rng.sample(loras, rng.randint(1, 2))
        apply_loras(comps, [(lora, rng.choice([1.0, 0.5, -0.3])) for lora in chosen],
                    mode=rng.choice(["fused", "fused", "hooks", "requant"]))
        if rng.random() < 0.2:
            restore(comps)
    restore(comps)
    assert all(_stored(m) == stored[n] for n, m in quantized.items())
    assert all(torch.equal(quantized[n](x), y) for n, y in before.items())
    assert not any("forward" in vars(m) for m in quantized.values())


def test_side_branch_in_hooks_mode_and_requant_reports_its_loss() -> None:
    comps, loras = _model("nf4_nested", seed=5)
    tr = comps["transformer"]
    x = torch.randn(2, 3, H, generator=torch.Generator().manual_seed(3)).to(C)
    layer = tr.transformer_blocks[1].attn.to_v
    lora = loras[0]
    with apply_loras(comps, [(lora, 1.0)]):
        merged = layer(x)
    with apply_loras(comps, [(lora, 1.0)], mode="hooks"):
        assert "forward" not in vars(layer) and layer._forward_hooks  # bitsandbytes' forward + s·up(down(x))
        side = layer(x)
    assert (side.float() - merged.float()).abs().max() <= 0.05 * merged.float().abs().max()
    quantized = {n: m for n, m in tr.named_modules() if is_quantized(m)}
    params, before = {n: m.weight for n, m in quantized.items()}, {n: _w(m).float() for n, m in quantized.items()}
    applied = apply_loras(comps, [(lora, 1.0)], mode="requant")
    report = applied.patcher.requantized.report
    assert report
    for path, (kept, error) in report.items():
        name = path.split(".", 1)[1]
        module, w32 = quantized[name], before[name]
        assert module.weight is not params[name] and module.weight.quant_state.quant_type == "nf4"
        delta = (w32 + lora.layers[path].delta(w32, 1.0)).to(C).float() - w32  # type: ignore[attr-defined]
        effective = _w(module).float() - w32
        assert kept == pytest.approx(float((effective * delta).sum() / (delta * delta).sum()), rel=1e-4, abs=1e-6)
        assert error == pytest.approx(float((effective - delta).norm() / delta.norm()), rel=1e-4, abs=1e-6)
    assert sum(e for _, e in report.values()) / len(report) > 0.1  # 4 bits cannot hold most of a LoRA
    restore(comps)
    assert all(m.weight is params[n] for n, m in quantized.items())


@pytest.mark.parametrize("nested", [True, False])
def test_a_weight_in_bitsandbytes_cpu_layout_is_read_exactly(nested: bool) -> None:
    """bitsandbytes' AVX512-BF16 CPU forward rewrites the weight (``_convert_weight_packed_for_cpu``): nibbles
    reordered, absmax unnested and rounded to bf16. ``dq`` of that layer = ``dequantize_4bit`` of the original
    bytes with those bf16 absmax values, and the layer is left as it was."""
    layer = bnb4_linear(torch.nn.Linear(128, 96), C, "nf4", nested)
    qs = layer.weight.quant_state
    data = layer.weight.data.clone()
    absmax = bnbf.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset if nested else qs.absmax
    plain = bnbf.QuantState(absmax.float().to(C).float(), shape=qs.shape, code=qs.code, blocksize=qs.blocksize,
                            quant_type=qs.quant_type, dtype=qs.dtype)
    want = bnbf.dequantize_4bit(data, plain).to(C)
    packed, packed_state = bnbf._convert_weight_packed_for_cpu(data.clone(), copy.deepcopy(qs))
    layer.weight.data, layer.weight.quant_state = packed, packed_state
    kept = (packed.clone(), packed_state.absmax.clone())
    assert not torch.equal(packed.reshape(-1), data.reshape(-1))
    assert torch.equal(dq(layer), want)
    assert torch.equal(layer.weight.data, kept[0]) and torch.equal(layer.weight.quant_state.absmax, kept[1])
    assert layer.weight.quant_state.packing_format_for_cpu and layer.weight.quant_state is packed_state


@pytest.mark.parametrize("installed", [True, False])
def test_a_bitsandbytes_folder_without_cuda_or_bitsandbytes_is_a_clear_error(
        tmp_path, monkeypatch: pytest.MonkeyPatch, installed: bool) -> None:  # type: ignore[no-untyped-def]
    import json
    import sys

    from lorakit.errors import ModelError
    from lorakit.models import load_model

    (tmp_path / "transformer").mkdir()
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    quant = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel",
                                                                      "quantization_config": quant}))
    if not installed:
        monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as when it is not installed
    elif torch.cuda.is_available():
        pytest.skip("with CUDA diffusers loads it (test_gpu_nf4)")
    want = "bitsandbytes is not installed" if not installed else "on CUDA only"
    with pytest.raises(ModelError, match=f"transformer: a bitsandbytes-quantized 4-bit model; .*{want}"):
        load_model(str(tmp_path), device="cpu")


def test_a_4bit_layer_without_a_usable_bitsandbytes_is_a_model_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from lorakit.errors import ModelError

    layer = bnb4_linear(torch.nn.Linear(H, H), C, "nf4", False)
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)  # as when bitsandbytes cannot be imported
    with pytest.raises(ModelError, match=r"bitsandbytes 4-bit \(NF4/FP4\) layers .*lorakit\[quant\]"):
        dq(layer)
