"""LoRAs on a quantized FLUX.1 at full width (hidden 3072; default 1 double + 2 single blocks), CPU, compute fp32:
one transformer step at 512-px token counts (1,024 image + 512 text tokens) with a rank-16 kohya LoRA — lorakit's
merge path (fused mode: W' = round(fp32(dq(Wq)) + ΔW) per forward) and side path (hooks mode: q(x) + s·B(Ax)) — against
the quantized base alone and against diffusers + PEFT's side branch on the same model; peak RSS over the quantized
base during a step; and how much of a LoRA's ΔW each way keeps (lorakit's merge vs requantizing after the add, as
Forge's "Automatic" and ComfyUI's fp8 path do). Q8_0 blocks are quantized with gguf's own quantizer; Q4_K blocks are
valid random blocks (gguf has no K-quant quantizer), which time the same. ``nf4``: bitsandbytes ``Linear4bit`` layers
(nested absmax, quantized on the device by ``quantize_4bit``; needs the ``quant`` extra; GPU rows in gpu_session.sh).

Run with nothing else busy:  python benchmarks/quant.py [--quant Q8_0 Q4_K] [--double 1 --single 2]
"""
from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from _common import PeakRss
from flux import make_file

import lorakit
from lorakit.files.io import save_file
from lorakit.models.flux_configs import variant_config
from lorakit.quant.layers import dq
from lorakit.quant.make import bnb4_linear, fp8_linear, gguf_linear, gguf_param, quantize_linears, random_kquant

IMG, TXT = 1024, 512


def quantized_model(kind: str, double: int, single: int, compute: torch.dtype, random_blocks: bool,
                    device: str = "cpu") -> torch.nn.Module:
    """Q8_0 with gguf's quantizer (or valid random blocks with ``random_blocks``: full size), K-quants as valid random
    blocks, ``fp8`` the weights cast to e4m3fn, ``nf4`` bitsandbytes 4-bit (quantized on ``device``); the model's
    dense rest in ``compute``."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    tr = FluxTransformer2DModel(**dict(variant_config("flux-1-dev"), num_layers=double, num_single_layers=single))
    tr = tr.to(compute)  # the dense rest in the compute dtype; quantized weights are made from these below
    if kind == "nf4":
        tr = tr.to(device)  # bitsandbytes quantizes where the weight is (fast on a GPU)

    def make(name: str, lin: torch.nn.Linear) -> torch.nn.Module | None:
        if kind == "nf4":
            return bnb4_linear(lin, compute, "nf4", nested=True)
        if kind == "fp8":
            return fp8_linear(lin, torch.float8_e4m3fn, compute)
        if lin.in_features % 256:
            return None  # K-quant rows hold whole 256-value blocks: x_embedder (64 inputs) stays dense, as city96's
        w = gguf_param(lin.weight.float(), kind) if kind == "Q8_0" and not random_blocks else \
            random_kquant(lin.out_features, lin.in_features, kind)
        return gguf_linear(lin, w, compute)
    return quantize_linears(tr, make).eval().requires_grad_(False)


def step_inputs(device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.zeros(IMG, 3)
    ids[:, 1], ids[:, 2] = torch.arange(IMG) // 32, torch.arange(IMG) % 32
    out = {"hidden_states": torch.randn(1, IMG, 64, generator=g), "encoder_hidden_states": torch.randn(1, TXT, 4096,
           generator=g), "pooled_projections": torch.randn(1, 768, generator=g), "timestep": torch.tensor([0.5]),
           "img_ids": ids, "txt_ids": torch.zeros(TXT, 3), "guidance": torch.tensor([3.5])}
    return {k: v.to(device, dtype if k in ("hidden_states", "encoder_hidden_states", "pooled_projections") else
                    torch.float32) for k, v in out.items()}


def step_seconds(tr: torch.nn.Module, inputs: dict[str, torch.Tensor], runs: int = 2) -> float:
    best = float("inf")
    device = inputs["hidden_states"].device
    with torch.no_grad():
        for _ in range(runs):
            t = time.perf_counter()
            tr(**inputs)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - t)
    return best


def peft_step(tr: torch.nn.Module, lora_file: Path, inputs: dict[str, torch.Tensor]) -> float:
    """diffusers' own path: the kohya file converted and loaded by PEFT, which wraps each GGUFLinear as a side
    branch (fusing is impossible on GGUF weights)."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=tr)
    pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name, adapter_name="a")
    try:
        return step_seconds(tr, inputs)
    finally:
        pipe.unload_lora_weights()


TYPICAL_RMS = 0.013  # rms(ΔW)/rms(W) of a typical LoRA layer (ROUND3_NOTES §11.3's measured retention uses it)


def retention(tr: torch.nn.Module, lora: lorakit.LoraModel, kind: str) -> dict[str, float]:
    """The share of a typical LoRA's ΔW that reaches the weight used, ⟨ΔW_eff, ΔW⟩/‖ΔW‖², ΔW the file's change on
    one layer scaled to rms(ΔW)/rms(W) = 1.3 %. lorakit's merge: fp32 dq(W) + ΔW on the model's layer. Requantizing
    (Forge "Automatic", ComfyUI fp8): a base already stored in the type, w = deq(q(W)) with W ~ N(0, 0.02) of the
    layer's shape, ΔW_eff = deq(q(w + ΔW)) − w — Q8_0, Q5_0 and Q4_0 with gguf's quantizer (it has none for
    K-quants: Q4_0 stands for a 4-bit requant), per-tensor fp8 e4m3fn (round to nearest, the scale recomputed) and,
    for NF4, bitsandbytes' quantize_4bit."""
    import gguf

    path = next(p for p in lora.layers if p.endswith("attn.to_out.0"))
    module = tr.get_submodule(path.split(".", 1)[1])
    w_model = dq(module).float().cpu()
    base = torch.randn(w_model.shape, generator=torch.Generator().manual_seed(3)) * 0.02
    delta = lora.layers[path].delta(w_model, 1.0)
    delta = delta * (TYPICAL_RMS * base.pow(2).mean().sqrt() / delta.pow(2).mean().sqrt())

    def share(eff: torch.Tensor) -> float:
        return float((eff * delta).sum() / (delta * delta).sum())

    def requant(rnd: Callable[[torch.Tensor], torch.Tensor]) -> float:
        w = rnd(base)
        return share(rnd(w + delta) - w)

    def gguf_round(t: torch.Tensor, qtype: Any) -> torch.Tensor:
        return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(t.numpy(), qtype), qtype)).float()

    def fp8_round(t: torch.Tensor) -> torch.Tensor:
        scale = t.abs().max() / 448
        return (t / scale).to(torch.float8_e4m3fn).float() * scale

    out = {"lorakit_merge": share((w_model + delta) - w_model)}
    for name in ("Q8_0", "Q5_0", "Q4_0"):
        qtype = getattr(gguf.GGMLQuantizationType, name)
        out[f"requant_{name}"] = requant(lambda t, q=qtype: gguf_round(t, q))  # type: ignore[misc]
    out["requant_fp8_e4m3fn"] = requant(fp8_round)
    if kind == "nf4":
        from lorakit.quant.nf4 import functional

        bnbf = functional()
        dtype = module.weight.quant_state.dtype

        def nf4(t: torch.Tensor) -> torch.Tensor:
            q, state = bnbf.quantize_4bit(t.to(module.weight.device, dtype), compress_statistics=True,
                                          quant_type="nf4")
            return bnbf.dequantize_4bit(q, state).float().cpu()
        out["requant_nf4"] = requant(nf4)
    return out


def run(kind: str, args: argparse.Namespace, tmp: Path) -> dict[str, float]:
    compute = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    tr = quantized_model(kind, args.double, args.single, compute, args.random_blocks, args.device).to(args.device)
    file = tmp / f"lora_{kind}.safetensors"
    save_file(make_file(tr, "lora", args.rank, 0, args.double, args.single), file)
    lora = lorakit.load_lora(file)
    inputs = step_inputs(args.device, compute)
    comps = {"transformer": tr}
    step_seconds(tr, inputs, runs=1)  # warm-up: first-touch pages and kernels are no one's cost
    times: dict[str, list[float]] = {"base": [], "merge": [], "side": []}
    for _ in range(args.rounds):  # alternated, best of the rounds: a busy machine slows one phase, not a path
        lorakit.restore(comps)
        times["base"].append(step_seconds(tr, inputs, runs=1))
        lorakit.apply_loras(comps, [(lora, 1.0)])  # fused mode: the merge path on quantized layers
        times["merge"].append(step_seconds(tr, inputs, runs=1))
        lorakit.apply_loras(comps, [(lora, 1.0)], mode="hooks")  # the side branch
        times["side"].append(step_seconds(tr, inputs, runs=1))
    r = {name: min(ts) for name, ts in times.items()}
    lorakit.apply_loras(comps, [(lora, 1.0)])
    gc.collect()
    with PeakRss() as mem:
        step_seconds(tr, inputs, runs=1)
    r["merge_peak_over_base_gib"] = mem.peak_over / 2 ** 30
    lorakit.restore(comps)
    gc.collect()
    with PeakRss() as mem:
        step_seconds(tr, inputs, runs=1)
    r["base_peak_gib"] = mem.peak_over / 2 ** 30
    r["factors_gib"] = sum(t.numel() * 4 for a in lora.layers.values() for t in a.leaves().values()) / 2 ** 30
    if not args.skip_diffusers:
        r["peft_side"] = peft_step(tr, file, inputs)
    r.update({f"retention_{k}": v for k, v in retention(tr, lora, kind).items()})
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quant", nargs="+", default=["Q8_0", "Q4_K"], help="Q8_0, Q4_K, …, fp8 (e4m3fn) or nf4")
    ap.add_argument("--rounds", type=int, default=3, help="base/merge/side steps alternated this many times")
    ap.add_argument("--double", type=int, default=1)
    ap.add_argument("--single", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--skip-diffusers", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="compute dtype (bf16 on a GPU)")
    ap.add_argument("--random-blocks", action="store_true", help="Q8_0 as valid random blocks (full size: fast)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    results = {kind: run(kind, args, tmp) for kind in args.quant}
    print(json.dumps({k: {n: round(v, 4) for n, v in r.items()} for k, r in results.items()}, indent=1))
    for kind, r in results.items():
        print(f"\n[{kind}] step: base {r['base']:.2f} s; merge {r['merge'] / r['base']:.3f}×, side "
              f"{r['side'] / r['base']:.3f}× the base (target ≤ 1.1×)"
              + (f"; diffusers+PEFT side {r['peft_side'] / r['base']:.3f}×" if "peft_side" in r else ""))
        print(f"  peak RSS during a merged step over the base's: {r['merge_peak_over_base_gib'] - r['base_peak_gib']:.3f}"
              f" GiB (LoRA factors {r['factors_gib']:.3f} GiB)")
        kept = {k.removeprefix("retention_"): v for k, v in r.items() if k.startswith("retention_")}
        print("  share of ΔW kept: " + ", ".join(f"{k} {v:.3f}" for k, v in kept.items()))


if __name__ == "__main__":
    main()
