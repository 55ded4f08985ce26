"""LoRAs on quantized bases: a tiny FLUX.1 whose Linears are GGUF blocks (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, BF16) or fp8
(e4m3fn, e5m2, per-tensor and per-row scales), and K-quant layers from valid random blocks. Each patched layer's
output is bit for bit ``F.linear(x, round_c(fp32(dq(Wq)) + Σ ΔWᵢ), b)`` (summed as the fused path sums: ``fused_sum``), strength 0 (a zero ΔW) is the unpatched layer,
the stored bytes never change, and restore is exact."""
from __future__ import annotations

import hashlib
import random

import pytest
import torch
import torch.nn.functional as F

from lorakit import apply_loras, restore
from lorakit.lora_model import lora_from_state_dict
from lorakit.patch.quantized import MergedForward
from lorakit.quant.layers import compute_dtype, dq, is_quantized, weight_values
from lorakit.quant.make import fp8_linear, gguf_linear, gguf_param, quantize_linears, random_kquant
from tests.factories import adapter_tensors, fused_sum
from tests.flux_factories import H, bfl_lora, kohya_keys, tiny_flux_components

C = torch.bfloat16
QUANTS = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "BF16", "fp8_e4m3fn", "fp8_e5m2", "fp8_scaled", "fp8_rows"]
KINDS = ["lora", "lokr", "loha", "dora-in", "dora-out", "full", "oft", "glora", "ia3"]


def quantizer(kind: str):  # type: ignore[no-untyped-def]
    def make(name: str, lin: torch.nn.Linear) -> torch.nn.Module | None:
        if kind.startswith("fp8"):
            dtype = torch.float8_e5m2 if kind == "fp8_e5m2" else torch.float8_e4m3fn
            scale = {"fp8_scaled": lin.weight.detach().abs().max().float() / 200,
                     "fp8_rows": lin.weight.detach().abs().amax(1).float() / 200 + 1e-6}.get(kind)
            return fp8_linear(lin, dtype, C, scale)
        if lin.in_features % 32:
            return None  # GGUF blocks run along rows of 32 values: x_embedder (4 inputs) stays dense
        return gguf_linear(lin, gguf_param(lin.weight.float(), kind), C)
    return make


def _model(kind: str, seed: int = 0) -> tuple[dict[str, torch.nn.Module], list[object]]:
    comps = tiny_flux_components(seed=seed, dtype=C)
    tr = comps["transformer"]
    loras = [lora_from_state_dict(kohya_keys(bfl_lora(tr, k, seed=i)), {}, name=k) for i, k in enumerate(KINDS)]
    quantize_linears(tr, quantizer(kind))
    return comps, loras


def _stored(module: torch.nn.Module) -> bytes:
    w = module.weight
    raw = w.as_tensor() if hasattr(w, "as_tensor") else w.detach()
    return hashlib.sha256(raw.contiguous().view(torch.uint8).numpy().tobytes()).digest()


def _reference(module: torch.nn.Module, adapters: list[tuple[object, float]], x: torch.Tensor) -> torch.Tensor:
    """F.linear(x, round_c(fp32(dq(Wq)) + Σ ΔWᵢ), round_c(fp32(b) + Σ Δbᵢ)) (F.conv2d for a convolution), written
    out."""
    acc = fused_sum(dq(module).float(), adapters)
    b32 = None if module.bias is None else module.bias.float()
    for adapter, m in adapters:
        db = adapter.bias_delta(m) if adapter.changes_bias else None  # type: ignore[attr-defined]
        if b32 is not None and db is not None:
            b32 = b32 + db.reshape(b32.shape)
    w, b = acc.to(compute_dtype(module)), None if b32 is None else b32.to(compute_dtype(module))
    if isinstance(module, torch.nn.Conv2d):
        return F.conv2d(x, w, b, module.stride, module.padding, module.dilation, module.groups)
    return F.linear(x, w, b)


@pytest.mark.parametrize("quant", QUANTS)
def test_every_type_on_every_quant_type_is_the_exact_merge(quant: str) -> None:
    comps, loras = _model(quant)
    tr = comps["transformer"]
    quantized = {n: m for n, m in tr.named_modules() if is_quantized(m)}
    assert quantized, quant
    stored = {n: _stored(m) for n, m in quantized.items()}
    x = torch.randn(2, 3, H, generator=torch.Generator().manual_seed(1)).to(C)
    for lora, m in zip(loras, (0.7, -0.4, 1.0, 0.9, 0.6, 1.2, 1.0, 0.8, 0.5)):
        with apply_loras(comps, [(lora, m)]):
            for name, module in quantized.items():
                if module.in_features != H:
                    continue
                adapter = lora.layers.get(f"transformer.{name}")  # type: ignore[attr-defined]
                if adapter is None:
                    continue
                if getattr(adapter, "originals", "unbound") is None:  # a fused part reading the fused weight
                    adapter = adapter.bind(lambda p: weight_values(tr.get_submodule(p.split(".", 1)[1])))
                assert torch.equal(module(x), _reference(module, [(adapter, m)], x)), f"{lora.name} {name}"  # type: ignore[attr-defined]
        assert all(_stored(mod) == stored[n] for n, mod in quantized.items())


@pytest.mark.parametrize("quant", ["Q8_0", "fp8_e4m3fn", "fp8_scaled"])
def test_zero_change_is_the_unpatched_layer_and_restore_keeps_every_byte(quant: str) -> None:
    comps, loras = _model(quant, seed=4)
    tr = comps["transformer"]
    quantized = {n: m for n, m in tr.named_modules() if is_quantized(m)}
    x = torch.randn(2, 3, H, generator=torch.Generator().manual_seed(2)).to(C)
    before = {n: m(x) for n, m in quantized.items() if m.in_features == H}
    t = adapter_tensors("lora", (3 * H, H))
    zero = lora_from_state_dict({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": t["lora_down.weight"],
                                 "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight":
                                     torch.zeros_like(t["lora_up.weight"])}, {})
    with apply_loras(comps, [(zero, 1.0)]):
        assert "forward" in vars(tr.transformer_blocks[0].attn.to_q)  # merged per forward, with ΔW = 0
        assert all(torch.equal(quantized[n](x), y) for n, y in before.items())
    stored = {n: _stored(m) for n, m in quantized.items()}
    rng = random.Random(0)
    for _ in range(1000 if quant == "Q8_0" else 200):
        chosen = rng.sample(loras, rng.randint(1, 2))
        apply_loras(comps, [(lora, rng.choice([1.0, 0.5, -0.3])) for lora in chosen],
                    mode=rng.choice(["fused", "fused", "hooks"]))
        if rng.random() < 0.2:
            restore(comps)
    restore(comps)
    assert all(_stored(m) == stored[n] for n, m in quantized.items())
    assert all(torch.equal(quantized[n](x), y) for n, y in before.items())
    assert not any("forward" in vars(m) for m in quantized.values())


def test_side_branch_for_lora_merge_for_the_rest_in_hooks_mode() -> None:
    comps, loras = _model("Q8_0", seed=5)
    tr = comps["transformer"]
    x = torch.randn(2, 3, H, generator=torch.Generator().manual_seed(3)).to(C)
    layer = tr.transformer_blocks[1].attn.to_v
    lora, lokr = loras[0], loras[1]
    with apply_loras(comps, [(lora, 1.0)]):
        merged = layer(x)
    with apply_loras(comps, [(lora, 1.0)], mode="hooks"):
        assert "forward" not in vars(layer) and layer._forward_hooks  # q(x) + s·up(down(x))
        side = layer(x)
    assert (side.float() - merged.float()).abs().max() <= 0.05 * merged.float().abs().max()
    with apply_loras(comps, [(lokr, 1.0)], mode="hooks"):
        assert "forward" in vars(layer) and not layer._forward_hooks  # no dense ΔW cached per layer


@pytest.mark.parametrize("qtype", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_k_quants_on_one_layer(qtype: str) -> None:
    lin = torch.nn.Linear(256, 64)
    layer = gguf_linear(lin, random_kquant(64, 256, qtype, seed=1), C)
    stored = _stored(layer)
    blocks = torch.nn.ModuleDict({"0": torch.nn.ModuleDict({"proj_mlp": layer})})
    comps = {"transformer": torch.nn.ModuleDict({"single_transformer_blocks": blocks})}
    path = "single_transformer_blocks.0.proj_mlp"
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(4)).to(C)
    plain = layer(x)
    for kind in ("lora", "lokr", "dora-out", "glora"):
        t = adapter_tensors(kind, (64, 256), 4, torch.Generator().manual_seed(5))
        lora = lora_from_state_dict({f"lora_transformer_{path.replace('.', '_')}.{k}": v for k, v in t.items()}, {})
        with apply_loras(comps, [(lora, 0.8)]):
            assert torch.equal(layer(x), _reference(layer, [(lora.layers[f"transformer.{path}"], 0.8)], x))
    assert torch.equal(layer(x), plain) and _stored(layer) == stored


@pytest.mark.parametrize("quant", ["Q8_0", "Q4_0", "fp8_e4m3fn", "fp8_scaled"])
def test_requant_opt_in_reports_the_loss_it_measures_and_restores_exactly(quant: str) -> None:
    comps, loras = _model(quant, seed=6)
    tr = comps["transformer"]
    quantized = {n: m for n, m in tr.named_modules() if is_quantized(m)}
    params = {n: m.weight for n, m in quantized.items()}
    stored = {n: _stored(m) for n, m in quantized.items()}
    before = {n: dq(m).float() for n, m in quantized.items()}
    lora = loras[0]
    applied = apply_loras(comps, [(lora, 1.0)], mode="requant")
    report = applied.patcher.requantized.report
    assert report
    for path, (kept, error) in report.items():
        name = path.split(".", 1)[1]
        module = quantized[name]
        w32 = before[name]
        delta = (w32 + lora.layers[path].delta(w32, 1.0)).to(C).float() - w32  # the change asked, rounded once
        effective = dq(module).float() - w32
        assert kept == pytest.approx(float((effective * delta).sum() / (delta * delta).sum()), rel=1e-4, abs=1e-6)
        assert error == pytest.approx(float((effective - delta).norm() / delta.norm()), rel=1e-4, abs=1e-6)
    if quant == "Q4_0":  # lossy, and said so: 4-bit blocks cannot hold most of the change
        assert sum(e for _, e in report.values()) / len(report) > 0.1
    restore(comps)
    assert all(m.weight is params[n] and _stored(m) == stored[n] for n, m in quantized.items())


def test_requant_needs_a_quantizer() -> None:
    lin = torch.nn.Linear(256, 64)
    layer = gguf_linear(lin, random_kquant(64, 256, "Q4_K", seed=2), C)
    comps = {"transformer": torch.nn.ModuleDict({"single_transformer_blocks": torch.nn.ModuleDict(
        {"0": torch.nn.ModuleDict({"proj_mlp": layer})})})}
    t = adapter_tensors("lora", (64, 256), 4, torch.Generator().manual_seed(5))
    lora = lora_from_state_dict({f"lora_transformer_single_transformer_blocks_0_proj_mlp.{k}": v for k, v in t.items()},
                                {})
    from lorakit.errors import LorakitError

    stored = _stored(layer)
    with pytest.raises(LorakitError, match="needs a quantizer for Q4_K"):
        apply_loras(comps, [(lora, 1.0)], mode="requant")
    assert _stored(layer) == stored


@pytest.mark.parametrize("quant", ["Q8_0", "BF16", "fp8_e4m3fn", "stored"])
def test_fp32_compute_merge_is_the_fused_sum_and_never_writes_what_dq_returns(quant: str,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """In fp32 compute the order of the sum shows in the output bits: a LoRA is added as one in-place addmm into
    dq's fresh output, as the fused path adds it to a dense weight. A dequantization that returns a stored tensor
    itself ("stored": an fp8 layer whose values are kept in an fp32 buffer) is copied first, never written."""
    g = torch.Generator().manual_seed(8)
    lin = torch.nn.Linear(256, 64)
    layer = (fp8_linear(lin, torch.float8_e4m3fn, torch.float32) if quant in ("fp8_e4m3fn", "stored")
             else gguf_linear(lin, gguf_param(lin.weight.float(), quant), torch.float32))
    if quant == "stored":
        layer.register_buffer("values", layer.dequantized())
        monkeypatch.setattr(type(layer), "dequantized", lambda self: self.values)
    comps = {"transformer": torch.nn.ModuleDict({"single_transformer_blocks": torch.nn.ModuleDict(
        {"0": torch.nn.ModuleDict({"proj_mlp": layer})})})}
    path = "single_transformer_blocks.0.proj_mlp"
    x = torch.randn(3, 256, generator=g)
    plain, stored, w_before = layer(x), _stored(layer), dq(layer).clone()
    loras = [lora_from_state_dict({f"lora_transformer_{path.replace('.', '_')}.{k}": v
                                   for k, v in adapter_tensors(kind, (64, 256), 4, g).items()}, {}, name=kind)
             for kind in ("lora", "dora-out", "lora")]
    for chosen in ([loras[0]], [loras[0], loras[2]], [loras[1], loras[0]]):
        with apply_loras(comps, [(lora, 0.9) for lora in chosen]):
            adapters = [(lora.layers[f"transformer.{path}"], 0.9) for lora in chosen]  # type: ignore[attr-defined]
            assert torch.equal(layer(x), _reference(layer, adapters, x))
            assert torch.equal(layer(x), _reference(layer, adapters, x))  # the stored values did not move
        assert torch.equal(dq(layer), w_before) and _stored(layer) == stored
    assert torch.equal(layer(x), plain)


def test_requant_makes_every_part_of_a_fused_layer_from_the_original_weights() -> None:
    """A per-input DoRA on FLUX.1's fused ``linear1`` reads the whole fused weight: in requant mode every part
    (to_q, to_k, to_v, proj_mlp) is requantized from the exact merge over the original weights, not from siblings
    already requantized."""
    from lorakit.patch.quantized import requantize

    comps, loras = _model("Q8_0", seed=7)
    tr = comps["transformer"]
    lora = loras[KINDS.index("dora-in")]
    parts = [n for n, m in tr.named_modules() if is_quantized(m) and n.startswith("single_transformer_blocks.0.")
             and n.split(".")[-1] in ("to_q", "to_k", "to_v", "proj_mlp")]
    assert len(parts) == 4
    with apply_loras(comps, [(lora, 0.8)]):  # the exact merge, per forward, over the stored originals
        want = {n: requantize(tr.get_submodule(n), MergedForward(tr.get_submodule(n),  # type: ignore[arg-type]
                                                                 vars(tr.get_submodule(n))["forward"].contribs)
                              .weight().float()) for n in parts}
    with apply_loras(comps, [(lora, 0.8)], mode="requant"):
        for n in parts:
            got = tr.get_submodule(n).weight
            assert torch.equal(got.as_tensor().view(torch.uint8), want[n].as_tensor().view(torch.uint8)), n
