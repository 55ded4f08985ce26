"""Each class of bad file the fuzzing of issue 8 found is a ``LorakitError`` naming the file and what is wrong:
safetensors header schema, pickles, dialect readers, NaN/inf values, properties, and the two memory bombs."""
from __future__ import annotations

import json
import struct
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import lorakit
from lorakit.files.header import MAX_JSON_DEPTH, loads_bounded

from .factories import adapter_tensors, kohya_name, make_kohya_lora, tiny_components
from .test_fuzz_files import cloneofsimo_bomb, loha_tucker_bomb

Q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"  # (32, 32) in the tiny model


def _header_file(tmp_path: Path, header: str, payload: bytes = b"\0" * 16) -> Path:
    p = tmp_path / "h.safetensors"
    raw = header.encode()
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + payload)
    return p


def _entry(dtype: str = '"F32"', shape: str = "[2, 2]", offsets: str = "[0, 16]") -> str:
    return f'{{"t": {{"dtype": {dtype}, "shape": {shape}, "data_offsets": {offsets}}}}}'


@pytest.mark.parametrize("header,match", [
    ("[" * 100_000 + "]" * 100_000, "nested deeper than"),  # was RecursionError
    ('{"t": ' + "[" * 50 + "]" * 50 + "}", "nested deeper than"),
    (_entry(offsets='"abc"'), "data_offsets must be two whole numbers"),  # was TypeError
    (_entry(offsets="[0]"), "data_offsets must be two whole numbers"),
    (_entry(offsets="[16, 0]"), "data_offsets must be two whole numbers"),
    (_entry(offsets="[0.0, 16]"), "data_offsets must be two whole numbers"),
    (_entry(dtype='["F32"]'), "unknown dtype"),  # was TypeError
    (_entry(dtype="null"), "unknown dtype"),
    (_entry(shape="[Infinity, 1]"), "shape must be a list"),  # was OverflowError
    (_entry(shape="[1e400]"), "shape must be a list"),
    (_entry(shape="[NaN]"), "shape must be a list"),
    (_entry(shape="[2, -2]"), "shape must be a list"),
    (_entry(shape="[true, 4]"), "shape must be a list"),
    (_entry(shape="[" + "9" * 5000 + "]"), "not valid JSON"),  # int() digit limit: was ValueError
    (_entry(shape="[4, 2]"), "shape \\[4, 2\\] of F32 needs 32 bytes, data_offsets span 16"),
    (_entry(shape="[2, 3]"), "needs 24 bytes, data_offsets span 16"),
    ('{"t": 5}', "malformed safetensors entry for tensor 't'"),
    ('{"__metadata__": {"a": 1}}', "__metadata__ value of 'a' is a number"),
    ('{"__metadata__": {"a": {"b": "c"}}}', "__metadata__ value of 'a' is a object"),
    ('{"__metadata__": [1]}', "__metadata__ is not an object"),
    (_entry(offsets="[0, 8]", shape="[2]"), "extra bytes after the last tensor"),
    ('{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '  # noqa: ISC004
     '"b": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}', "overlaps the previous tensor"),
    ('{"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}', "leaves a gap at byte 0"),
], ids=lambda v: v[:40] if isinstance(v, str) else None)
def test_header_schema(tmp_path: Path, header: str, match: str) -> None:
    with pytest.raises(lorakit.UnreadableFile, match=match):
        lorakit.load_lora(_header_file(tmp_path, header))


def test_header_not_utf8(tmp_path: Path) -> None:
    p = tmp_path / "u.safetensors"
    p.write_bytes(struct.pack("<Q", 4) + b"{\xff}\n")
    with pytest.raises(lorakit.UnreadableFile, match="not UTF-8"):
        lorakit.load_lora(p)


def test_bounded_json_depth_and_strings() -> None:
    ok = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    assert loads_bounded(ok) == json.loads(ok)
    assert loads_bounded('{"a": "[[[[[[[[[[[[[[[[[[[\\"]]"}') == {"a": '[[[[[[[[[[[[[[[[[[["]]'}  # brackets in strings
    for bad in ["[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1), "[]]", '"\\' * 100_000, "9" * 5000]:
        with pytest.raises(ValueError):
            loads_bounded(bad)


# --- pickles ---------------------------------------------------------------------------------------------------------

def test_empty_pickle(tmp_path: Path) -> None:
    (tmp_path / "e.bin").write_bytes(b"")
    with pytest.raises(lorakit.UnreadableFile, match="e.bin: file is empty"):  # was IndexError in the error mapper
        lorakit.load_lora(tmp_path / "e.bin")


def test_pickle_of_parameters_applies(tmp_path: Path) -> None:
    """nn.Parameters in a .pt are detached on load: applying does not hit requires-grad errors."""
    c = tiny_components("sd1")
    sd = make_kohya_lora({"unet": c["unet"]}, "lora", convs=False)
    torch.save({k: torch.nn.Parameter(v) for k, v in sd.items()}, str(tmp_path / "p.pt"))
    lora = lorakit.load_lora(tmp_path / "p.pt")
    assert not any(t.requires_grad for a in lora.layers.values() for t in a.leaves().values())
    weight = c["unet"].get_submodule(Q.split(".", 1)[1]).weight
    before = weight.detach().clone()
    with lorakit.apply_loras(c, [lora]):
        assert not torch.equal(weight.detach(), before)
    assert torch.equal(weight.detach(), before)


@pytest.mark.parametrize("make,what", [
    (lambda t: t.to_sparse(), "sparse_coo"), (lambda t: torch.empty(t.shape, device="meta"), "meta tensor"),
    (lambda t: torch.quantize_per_tensor(t, 0.1, 0, torch.qint8), "quantized"),
    (lambda t: t.to(torch.complex64), "complex64"), (lambda t: torch.zeros(()).expand(t.shape), "stored bytes"),
])
@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated")
def test_unsupported_pickled_tensors(tmp_path: Path, make: object, what: str) -> None:
    sd = {f"{kohya_name(Q)}.{k}": v for k, v in adapter_tensors("lora", (32, 32)).items()}
    key = f"{kohya_name(Q)}.lora_up.weight"
    with warnings.catch_warnings():  # torch warns that quantized and sparse tensors are deprecated or beta
        warnings.simplefilter("ignore")
        sd[key] = make(sd[key])  # type: ignore[operator]
    torch.save(sd, str(tmp_path / "x.pt"))
    with pytest.raises(lorakit.UnreadableFile, match=f"x.pt: unsupported tensor '{key}': .*{what}"):
        lorakit.load_lora(tmp_path / "x.pt")



# --- dialect readers -------------------------------------------------------------------------------------------------

def _load(tmp_path: Path, sd: dict[str, torch.Tensor], meta: dict[str, str] | None = None,
          name: str = "d.safetensors") -> lorakit.LoraModel:
    save_file(sd, str(tmp_path / name), metadata=meta)
    return lorakit.load_lora(tmp_path / name)


@pytest.mark.parametrize("keys,match", [
    ({"unet:4:up": (320, 1)}, "d.safetensors: key 'unet:4:up' has no partner 'unet:4:down'"),  # was KeyError
    ({"unet:0:down": (1, 320)}, "key 'unet:0:down' has no partner 'unet:0:up'"),
    ({"unet:4:up": (320,), "unet:4:down": (1, 320)}, "'unet:4:up' \\(320,\\) .* must be matrices"),  # IndexError
    ({"unet:144:up": (1, 1), "unet:144:down": (1, 1)}, "index 144 beyond the 144 unet layers"),
    ({"text_encoder:96:up": (1, 1), "text_encoder:96:down": (1, 1)}, "index 96 beyond the 96 text_encoder"),
    ({"unet:0:up": (320, 1), "unet:0:down": ()}, "lora_down.weight must be \\(r, in\\)"),
])
def test_cloneofsimo_broken(tmp_path: Path, keys: dict[str, tuple[int, ...]], match: str) -> None:
    with pytest.raises(lorakit.InvalidLora, match=match):
        _load(tmp_path, {k: torch.zeros(s) for k, s in keys.items()})


@pytest.mark.parametrize("down,meta,match", [
    ((0, 32), None, "key 'unet.x.to_q.lora_A.weight': lora_A must be .* r ≥ 1, got shape \\(0, 32\\)"),  # 1/0
    ((), None, "key 'unet.x.to_q.lora_A.weight': lora_A must be .* got shape \\(\\)"),  # was IndexError
    ((4, 32), "not json", "'lora_adapter_metadata' is not valid JSON"),
    ((4, 32), "[1]", "'lora_adapter_metadata' must be a JSON object"),
    ((4, 32), '{"unet.lora_alpha": "8"}', "'lora_adapter_metadata': unet.lora_alpha must be a finite number"),
    ((4, 32), '{"unet.lora_alpha": 1e400}', "'lora_adapter_metadata': unet.lora_alpha must be a finite number"),
    ((4, 32), '{"unet.alpha_pattern": [1], "unet.lora_alpha": 8}', "'lora_adapter_metadata': unet.alpha_pattern"),
    ((4, 32), "[" * 100_000, "'lora_adapter_metadata' is not valid JSON"),  # was RecursionError
], ids=lambda v: v[:30] if isinstance(v, str) else None)
def test_peft_broken(tmp_path: Path, down: tuple[int, ...], meta: str | None, match: str) -> None:
    sd = {"unet.x.to_q.lora_A.weight": torch.zeros(down), "unet.x.to_q.lora_B.weight": torch.zeros(32, 4)}
    prefix = "" if meta is None else "metadata "
    with pytest.raises(lorakit.InvalidLora, match=f"d.safetensors: {prefix}{match}"):
        _load(tmp_path, sd, None if meta is None else {"lora_adapter_metadata": meta})


@pytest.mark.parametrize("kind,leaf", [("lora", "lora_down.weight"), ("lora", "lora_up.weight"),
                                       ("loha", "hada_w1_a"), ("loha", "hada_w2_b"), ("lokr", "lokr_w1"),
                                       ("lokr-decomposed", "lokr_w2_a"), ("glora", "a1.weight"), ("oft", "oft_blocks")])
def test_zero_d_factors(tmp_path: Path, kind: str, leaf: str) -> None:
    t = adapter_tensors(kind, (32, 32))
    t[leaf] = torch.tensor(0.5)
    with pytest.raises(lorakit.InvalidLora, match=f"d.safetensors: layer {Q}: {leaf} must be"):
        _load(tmp_path, {f"{kohya_name(Q)}.{k}": v for k, v in t.items()})


@pytest.mark.parametrize("kind,leaf,value,match", [
    ("lora", "alpha", torch.ones(3), "alpha must be a single number, got shape \\(3,\\)"),  # .alpha raised
    ("ia3", "on_input", torch.ones(2), "on_input must be a single number"),  # bool() raised at apply
    ("loha", "hada_w1_b", torch.zeros(5, 32), "hada_w1_a \\(32, 4\\) and hada_w1_b \\(5, 32\\) ranks differ"),
    ("loha", "hada_w1_a", torch.zeros(32, 0), "hada_w1_a has no values"),  # rank-0 LoHa
    ("loha-tucker", "hada_t1", torch.ones(4, 4), "hada_t1 must be a 4-d Tucker core"),
    ("lokr", "lokr_w2", torch.zeros(2), "lokr_w2 must be"),
])
def test_contradicting_leaves(tmp_path: Path, kind: str, leaf: str, value: torch.Tensor, match: str) -> None:
    t = adapter_tensors(kind, (32, 32) if kind != "loha-tucker" else (32, 32, 3, 3))
    t[leaf] = value
    with pytest.raises(lorakit.InvalidLora, match=match):
        _load(tmp_path, {f"{kohya_name(Q)}.{k}": v for k, v in t.items()})


def test_properties_are_defined(tmp_path: Path) -> None:
    t = adapter_tensors("lora", (32, 32), rank=4, alpha=2.0)
    t["alpha"] = t["alpha"].reshape(1)  # a one-value vector is a number
    lora = _load(tmp_path, {f"{kohya_name(Q)}.{k}": v for k, v in t.items()})
    assert (lora.rank, lora.alpha, lora.ranks, lora.alphas) == (4, 2.0, [4], [2.0])


# --- NaN / inf, memory bombs ---------------------------------------------------------------------------------------

def test_non_finite_values_are_refused_naming_the_layers(tmp_path: Path) -> None:
    c = tiny_components("sd1")
    sd = make_kohya_lora({"unet": c["unet"]}, "lora", convs=False)
    ups = sorted(k for k in sd if k.endswith("lora_up.weight"))[:7]
    for i, k in enumerate(ups):
        sd[k] = sd[k].clone()
        sd[k][0, 0] = float("nan") if i % 2 else float("inf")
    with pytest.raises(lorakit.InvalidLora, match="d.safetensors: NaN or inf values in 7 layers: unet.[^,]+, "
                                                  "[^;]* and 2 more; a LoRA carrying them"):
        _load(tmp_path, sd)


def test_non_finite_embedding(tmp_path: Path) -> None:
    sd = {f"{kohya_name(Q)}.{k}": v for k, v in adapter_tensors("lora", (32, 32)).items()}
    sd["bundle_emb.star.string_to_param.*"] = torch.full((1, 32), float("nan"))
    with pytest.raises(lorakit.InvalidLora, match="NaN or inf values in 1 layers: embedding star"):
        _load(tmp_path, sd)


def test_memory_bombs_are_refused_before_any_allocation(tmp_path: Path) -> None:
    with pytest.raises(lorakit.InvalidLora, match="index 4000000000 beyond the 96 text_encoder layers"):
        lorakit.load_lora(cloneofsimo_bomb(tmp_path / "a.safetensors"))
    with pytest.raises(lorakit.InvalidLora, match="hada_t1 must be a 4-d Tucker core"):
        lorakit.load_lora(loha_tucker_bomb(tmp_path / "b.safetensors"))


def test_huge_finite_values_are_not_taken_for_inf(tmp_path: Path) -> None:
    """The NaN/inf check sums in float64; a sum that overflows is checked value by value, so this file loads."""
    t = adapter_tensors("lora", (32, 32))
    t["lora_up.weight"] = torch.full((32, 4), 3e38)
    assert _load(tmp_path, {f"{kohya_name(Q)}.{k}": v for k, v in t.items()}).layers
