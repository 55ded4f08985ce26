"""Applying LoRAs to models: fused == hooks, exact restore, switching, weights per part and block, errors first."""
from __future__ import annotations

import random
import zlib

import pytest
import torch

import lorakit
from lorakit.patch import patcher_for

from .conftest import assert_original, snapshot
from .factories import KINDS, make_kohya_lora, tiny_components


def _forward(c: dict[str, torch.nn.Module], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 1000, (1, 7), generator=g)
    dtype = next(c["unet"].parameters()).dtype
    with torch.no_grad():
        h = c["text_encoder"](ids).last_hidden_state
        cross = c["unet"].config.cross_attention_dim
        ctx = torch.randn(1, 7, cross, generator=g).to(dtype) if h.shape[-1] != cross else h
        kwargs = {}
        if c["unet"].config.addition_embed_type == "text_time":
            kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 32, generator=g).to(dtype),
                                           "time_ids": torch.randn(1, 6, generator=g).to(dtype)}
        x = torch.randn(1, 4, 8, 8, generator=g).to(dtype)
        y = c["unet"](x, 10, encoder_hidden_states=ctx, **kwargs).sample
    return h, y


def _lora(c: dict[str, torch.nn.Module], kind: object, seed: int = 0, **kw: object) -> lorakit.LoraModel:
    return lorakit.lora_from_state_dict(make_kohya_lora(c, kind, seed=seed, **kw), {}, name=f"l{seed}")


def _kind_for(path: str) -> str:
    return KINDS[zlib.crc32(path.encode()) % len(KINDS)]  # stable across processes, unlike hash()


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_fused_equals_hooks_every_type(arch: str) -> None:
    c = tiny_components(arch)
    rnd = random.Random(0)
    kinds = {}

    def pick(path: str) -> str:
        return kinds.setdefault(path, rnd.choice(KINDS))

    a, b = _lora(c, pick, seed=1), _lora(c, "lora", seed=2)
    assert len(set(kinds.values())) == len(KINDS) or len(kinds) < len(KINDS)
    base = _forward(c)
    with lorakit.apply_loras(c, [(a, 0.8), (b, {"unet": 0.5, "te": 1.2})]):
        fused = _forward(c)
    with lorakit.apply_loras(c, [(a, 0.8), (b, {"unet": 0.5, "te": 1.2})], mode="hooks"):
        hooked = _forward(c)
    for f, h, o in zip(fused, hooked, base):
        assert not torch.allclose(f, o)
        torch.testing.assert_close(h, f, rtol=1e-5, atol=1e-5)


def test_norm_layers_fused_equals_hooks(tiny: dict[str, torch.nn.Module]) -> None:
    sd = {}
    for name, m in tiny["unet"].named_modules():
        if isinstance(m, torch.nn.GroupNorm):
            sd[f"lora_unet_{name.replace('.', '_')}.w_norm"] = torch.randn(m.num_channels) * 0.1
            sd[f"lora_unet_{name.replace('.', '_')}.b_norm"] = torch.randn(m.num_channels) * 0.1
    lora = lorakit.lora_from_state_dict(sd, {})
    assert lora.network_types == ["norm"]
    with lorakit.apply_loras(tiny, [lora]):
        fused = _forward(tiny)[1]
    with lorakit.apply_loras(tiny, [lora], mode="hooks"):
        torch.testing.assert_close(_forward(tiny)[1], fused, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_thousand_random_cycles_restore_exactly(dtype: torch.dtype) -> None:
    c = tiny_components("sd1", dtype=dtype)
    snap = snapshot(c)
    loras = [_lora(c, kind, seed=i, dtype=dtype) for i, kind in
             enumerate(["lora", "loha", "dora-out", "full", "oft", lambda p: _kind_for(p)])]
    rnd = random.Random(1)
    patcher = patcher_for(c)
    for _ in range(1000 if dtype == torch.float32 else 400):  # half precision: the same paths, fewer cycles (CI time)
        action = rnd.random()
        if action < 0.15:
            patcher.restore()
            assert_original(c, snap) if rnd.random() < 0.1 else None
            continue
        chosen = rnd.sample(loras, rnd.randint(1, 3))
        spec = [(l, rnd.choice([1.0, 0.5, -0.3, 0.0, {"unet": 0.7, "te": 0.0}, {"in": 0, "mid": 1, "out": 0.4}]))
                for l in chosen]
        mode = "hooks" if rnd.random() < 0.2 else "fused"
        patcher.set(spec, mode=mode)
    patcher.restore()
    assert_original(c, snap)


def test_restore_on_exception_inside_with(tiny: dict[str, torch.nn.Module]) -> None:
    snap = snapshot(tiny)
    with pytest.raises(RuntimeError):
        with lorakit.apply_loras(tiny, [_lora(tiny, "lora")]):
            assert not torch.equal(tiny["unet"].conv_in.weight, snap["unet.conv_in.weight"])
            raise RuntimeError("boom")
    assert_original(tiny, snap)


def test_weight_zero_is_bitwise_original(tiny: dict[str, torch.nn.Module]) -> None:
    base = _forward(tiny)
    with lorakit.apply_loras(tiny, [(_lora(tiny, "lora"), 0.0)]):
        out = _forward(tiny)
    assert all(torch.equal(a, b) for a, b in zip(base, out))


def test_te_only_and_unet_only_touch_only_their_part(tiny: dict[str, torch.nn.Module]) -> None:
    snap = snapshot(tiny)
    lora = _lora(tiny, "lora")
    for spec, changed in (({"unet": 0, "te": 1}, "text_encoder"), ({"unet": 1, "te": 0}, "unet")):
        with lorakit.apply_loras(tiny, [(lora, spec)]):
            for c, m in tiny.items():
                same = all(torch.equal(p, snap[f"{c}.{n}"]) for n, p in m.named_parameters())
                assert same == (c != changed), (spec, c)


def test_switch_repatches_only_changed_parameters(tiny: dict[str, torch.nn.Module]) -> None:
    unet_only = _lora(tiny, lambda p: "lora" if p.startswith("unet.down_blocks") else None, seed=1)
    te_only = _lora(tiny, lambda p: "lora" if p.startswith("text_encoder") else None, seed=2)
    patcher = patcher_for(tiny)
    patcher.set([(unet_only, 1.0), (te_only, 1.0)])
    n_te = len([k for k in patcher.fused.signatures if k[0].startswith("text_encoder")])
    ptr = tiny["unet"].down_blocks[0].resnets[0].conv1.weight.data_ptr()
    assert patcher.fused.apply(_plan(tiny, [(unet_only, 1.0), (te_only, 1.0)])) == 0  # same set: free
    changed = patcher.fused.apply(_plan(tiny, [(unet_only, 1.0), (te_only, 0.5)]))
    assert changed == n_te  # only the text encoder's parameters were recomputed
    assert tiny["unet"].down_blocks[0].resnets[0].conv1.weight.data_ptr() == ptr
    patcher.restore()


def _plan(c: dict[str, torch.nn.Module], loras: list[tuple[lorakit.LoraModel, float]]) -> object:
    from lorakit.patch.plan import build_plan

    return build_plan(c, [(l, lorakit.as_weight(w)) for l, w in loras])


def test_switching_reuses_buffers_and_matches_fresh_apply(tiny: dict[str, torch.nn.Module]) -> None:
    a, b = _lora(tiny, "lora", seed=1), _lora(tiny, "loha", seed=2)
    with lorakit.apply_loras(tiny, [(b, 0.7)]):
        fresh = _forward(tiny)
    lorakit.apply_loras(tiny, [(a, 1.0)])
    lorakit.apply_loras(tiny, [(b, 0.7)])
    switched = _forward(tiny)
    lorakit.restore(tiny)
    assert all(torch.equal(x, y) for x, y in zip(fresh, switched))


def test_block_weights_touch_only_their_blocks(tiny: dict[str, torch.nn.Module]) -> None:
    snap = snapshot(tiny)
    lora = _lora(tiny, "lora")
    with lorakit.apply_loras(tiny, [(lora, {"in": 0, "mid": 1, "out": 0, "te": 0})]):
        for n, p in tiny["unet"].named_parameters():
            if n.startswith(("down_blocks", "up_blocks", "conv_in", "conv_out")):
                assert torch.equal(p, snap[f"unet.{n}"]), n
        assert not torch.equal(tiny["unet"].mid_block.attentions[0].proj_in.weight, snap[
            "unet.mid_block.attentions.0.proj_in.weight"])


def test_lbw_vector_and_preset(tiny: dict[str, torch.nn.Module]) -> None:
    snap = snapshot(tiny)
    lora = _lora(tiny, "lora")
    vector = [1] + [0] * 6 + [1] + [0] * 9  # BASE and M00 only
    with lorakit.apply_loras(tiny, [(lora, {"lbw": vector})]):
        assert torch.equal(tiny["unet"].down_blocks[0].attentions[0].proj_in.weight,
                           snap["unet.down_blocks.0.attentions.0.proj_in.weight"])
        assert not torch.equal(tiny["text_encoder"].encoder.layers[0].self_attn.q_proj.weight,
                               snap["text_encoder.encoder.layers.0.self_attn.q_proj.weight"])
    with lorakit.apply_loras(tiny, [(lora, {"lbw": "NONE"})]):
        assert_original(tiny, snap)
    with pytest.raises(lorakit.WeightSpecError, match="SDXL"):
        lorakit.apply_loras(tiny, [(lora, {"lbw": [1] * 12})])
    lorakit.restore(tiny)


def test_dora_is_not_linear_in_strength_and_zero_is_original(tiny: dict[str, torch.nn.Module]) -> None:
    lora = _lora(tiny, "dora-out")
    base = _forward(tiny)
    with lorakit.apply_loras(tiny, [(lora, 0.0)]):
        assert all(torch.equal(a, b) for a, b in zip(base, _forward(tiny)))


@pytest.mark.parametrize("gemm", [False, True], ids=["cpu-path", "one-addmm-path"])
@pytest.mark.parametrize("where", ["device", "host"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_channels_last_models_patch_like_contiguous_ones(dtype: torch.dtype, where: str, gemm: bool,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A UNet in channels_last (a common diffusers speed-up) cannot have its conv weights viewed as rows: they are
    summed in a contiguous scratch. Every type, switches, restore bit-exact, and the patched weights equal the
    contiguous model's (bit for bit, or within one half-precision rounding on the one-addmm path)."""
    from lorakit.patch import fused
    if gemm:
        monkeypatch.setattr(fused, "GEMM_DEVICES", {"cpu", "cuda"})
    comps = tiny_components("sd1", dtype=dtype)
    plain = {k: v for k, v in tiny_components("sd1", dtype=dtype).items()}
    comps["unet"].to(memory_format=torch.channels_last)
    assert any(not p.is_contiguous() for p in comps["unet"].parameters())
    snap = snapshot(comps)
    loras = [lorakit.lora_from_state_dict(make_kohya_lora(comps, k, seed=i, dtype=torch.float16), {}, name=k)
             for i, k in enumerate(["lora", "dora-out", "loha"])]
    p, q = patcher_for(comps), patcher_for(plain)
    p.fused.originals_mode = q.fused.originals_mode = where
    for s in ([(loras[0], 1.0)], [(loras[1], 0.7)], [(loras[0], 1.0)], [(loras[0], 0.5), (loras[2], 0.8)]):
        p.set(s, log_reports=False)
        q.set(s, log_reports=False)
        for (n, x), y in zip(comps["unet"].named_parameters(), plain["unet"].parameters()):
            if gemm and dtype == torch.float16:
                torch.testing.assert_close(x, y, rtol=2 ** -10, atol=1e-4, msg=n)
            else:
                assert torch.equal(x, y), n
    p.restore()
    assert_original(comps, snap)
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in comps["unet"].parameters() if p.dim() == 4)
