"""Every bad input gives a lorakit error that names the file and the problem, never a deep traceback."""
from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import lorakit
from lorakit.files.io import read_header

from .conftest import assert_original, snapshot
from .factories import adapter_tensors, make_kohya_lora, tiny_components


def _write_header(path: Path, header: bytes, payload: bytes = b"") -> Path:
    path.write_bytes(struct.pack("<Q", len(header)) + header + payload)
    return path


def _good(tmp_path: Path) -> Path:
    t = adapter_tensors("lora", (32, 32))
    p = tmp_path / "good.safetensors"
    save_file({f"lora_unet_down_blocks_0_attentions_0_proj_in.{k}": v for k, v in t.items()}, str(p))
    return p


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(lorakit.UnreadableFile, match="nope.safetensors: no such file"):
        lorakit.load_lora(tmp_path / "nope.safetensors")


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(lorakit.UnreadableFile, match="not a regular file"):
        lorakit.load_lora(tmp_path)


def test_empty_and_tiny_file(tmp_path: Path) -> None:
    p = tmp_path / "e.safetensors"
    p.write_bytes(b"abc")
    with pytest.raises(lorakit.UnreadableFile, match="e.safetensors: file is 3 bytes long"):
        lorakit.load_lora(p)


def test_absurd_header_size(tmp_path: Path) -> None:
    p = tmp_path / "h.safetensors"
    p.write_bytes(struct.pack("<Q", 2 ** 60) + b"{}")
    with pytest.raises(lorakit.UnreadableFile, match="header claims"):
        lorakit.load_lora(p)


def test_header_not_json(tmp_path: Path) -> None:
    with pytest.raises(lorakit.UnreadableFile, match="not valid JSON"):
        lorakit.load_lora(_write_header(tmp_path / "j.safetensors", b"{not json"))


def test_header_not_object(tmp_path: Path) -> None:
    with pytest.raises(lorakit.UnreadableFile, match="not a JSON object"):
        lorakit.load_lora(_write_header(tmp_path / "j.safetensors", b"[1, 2]"))


def test_malformed_entry(tmp_path: Path) -> None:
    with pytest.raises(lorakit.UnreadableFile, match="malformed safetensors entry for tensor 'a'"):
        lorakit.load_lora(_write_header(tmp_path / "m.safetensors", json.dumps({"a": {"dtype": "F32"}}).encode()))


def test_unknown_dtype(tmp_path: Path) -> None:
    h = json.dumps({"a": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}).encode()
    with pytest.raises(lorakit.UnreadableFile, match="unknown dtype"):
        lorakit.load_lora(_write_header(tmp_path / "d.safetensors", h, b"\0" * 4))


def test_truncated_file(tmp_path: Path) -> None:
    good = _good(tmp_path)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-10])
    with pytest.raises(lorakit.UnreadableFile, match="cut.safetensors: .*outside the file"):
        lorakit.load_lora(cut)


def test_metadata_from_header_alone(tmp_path: Path) -> None:
    p = tmp_path / "meta.safetensors"
    save_file({"x": torch.zeros(1000, 1000)}, str(p), metadata={"ss_output_name": "abc"})
    header = read_header(p)
    assert header.metadata == {"ss_output_name": "abc"} and header.tensors["x"].shape == (1000, 1000)


class Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("pwned",))


def test_pickle_with_code_is_refused_and_not_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "evil.pt"
    torch.save({"lora_unet_x.lora_up.weight": torch.zeros(2, 2), "payload": Evil()}, str(p))
    capsys.readouterr()
    with pytest.raises(lorakit.UnsafePickle, match="evil.pt: pickle needs more than plain tensors"):
        lorakit.load_lora(p)
    assert "pwned" not in capsys.readouterr().out


def test_plain_pickle_not_zip(tmp_path: Path) -> None:
    p = tmp_path / "raw.bin"
    p.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(lorakit.LoraFileError, match="raw.bin"):
        lorakit.load_lora(p)


def test_garbage_pt(tmp_path: Path) -> None:
    p = tmp_path / "junk.ckpt"
    p.write_bytes(b"\x00junk" * 10)
    with pytest.raises(lorakit.UnreadableFile, match="junk.ckpt: not a readable torch file"):
        lorakit.load_lora(p)


def test_pickle_without_tensors(tmp_path: Path) -> None:
    p = tmp_path / "empty.pt"
    torch.save({"a": 1, "b": "text"}, str(p))
    with pytest.raises(lorakit.UnreadableFile, match="empty.pt: file holds no tensors"):
        lorakit.load_lora(p)


def test_nested_state_dict_pickle_loads(tmp_path: Path) -> None:
    t = adapter_tensors("lora", (32, 32))
    p = tmp_path / "nested.ckpt"
    torch.save({"state_dict": {f"lora_unet_a_b.{k}": v for k, v in t.items()}, "epoch": 3}, str(p))
    assert lorakit.load_lora(p).rank == 4


def test_not_a_lora(tmp_path: Path) -> None:
    p = tmp_path / "ckpt.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2)}, str(p))
    with pytest.raises(lorakit.UnsupportedLora, match="ckpt.safetensors: no known LoRA key layout"):
        lorakit.load_lora(p)


def test_broken_layer(tmp_path: Path) -> None:
    p = tmp_path / "half.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(4, 2)}, str(p))
    with pytest.raises(lorakit.InvalidLora, match="half.safetensors: layer unet.down_blocks.0.attentions.0.proj_in: "
                                                  "lora layer lacks lora_down.weight"):
        lorakit.load_lora(p)


def test_rank_mismatch(tmp_path: Path) -> None:
    p = tmp_path / "r.safetensors"
    save_file({"lora_unet_a.lora_up.weight": torch.zeros(4, 2), "lora_unet_a.lora_down.weight": torch.zeros(3, 4)},
              str(p))
    with pytest.raises(lorakit.InvalidLora, match="ranks differ"):
        lorakit.load_lora(p)


def test_strict_load_reports_unknown_keys(tmp_path: Path) -> None:
    t = adapter_tensors("lora", (32, 32))
    sd = {f"lora_unet_a_b.{k}": v for k, v in t.items()}
    sd["lora_unet_a_b.mystery"] = torch.zeros(1)
    p = tmp_path / "s.safetensors"
    save_file(sd, str(p))
    assert lorakit.load_lora(p).leftovers == ["unet.a.b.mystery"]
    with pytest.raises(lorakit.UnmatchedKeys, match="s.safetensors: 1 keys not understood"):
        lorakit.load_lora(p, strict=True)


def test_sd1_lora_on_sdxl_model_names_both_and_touches_nothing() -> None:
    from lorakit.models.configs import build_components

    sdxl = build_components("sdxl")
    t = adapter_tensors("lora", (320, 768))
    sd = {f"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.{k}": v for k, v in t.items()}
    lora = lorakit.lora_from_state_dict(sd, {}, name="sd1style")
    with pytest.raises(lorakit.IncompatibleLora, match="sd1style: this LoRA is for Stable Diffusion 1.x, the model "
                                                       "is Stable Diffusion XL"):
        lorakit.apply_loras(sdxl, [lora])


def test_shape_mismatch_raises_before_any_weight_changes() -> None:
    c = tiny_components("sd1")
    snap = snapshot(c)
    good = make_kohya_lora(c, "lora")
    bad = dict(good)
    bad["lora_unet_conv_out.lora_up.weight"] = torch.zeros(7, 4, 1, 1)
    with pytest.raises(lorakit.IncompatibleLora, match="unet.conv_out: LoRA maps 32→7 channels"):
        lorakit.apply_loras(c, [(lorakit.lora_from_state_dict(good, {}), 1.0),
                                (lorakit.lora_from_state_dict(bad, {}, name="bad"), 1.0)])
    assert_original(c, snap)


def test_failed_switch_keeps_state_consistent() -> None:
    c = tiny_components("sd1")
    snap = snapshot(c)
    good = lorakit.lora_from_state_dict(make_kohya_lora(c, "lora"), {})
    lorakit.apply_loras(c, [good])
    with pytest.raises(lorakit.WeightSpecError):
        lorakit.apply_loras(c, [(good, {"unet": "x"})])
    lorakit.restore(c)
    assert_original(c, snap)


def test_strict_apply_reports_unmatched_layers() -> None:
    c = tiny_components("sd1")
    t = adapter_tensors("lora", (32, 32))
    sd = {f"lora_unet_down_blocks_0_attentions_0_proj_in.{k}": v for k, v in t.items()}
    sd.update({f"lora_unet_down_blocks_9_attentions_0_proj_in.{k}": v for k, v in t.items()})
    lora = lorakit.lora_from_state_dict(sd, {}, name="x")
    report = lorakit.apply_loras(c, [lora]).reports[0]
    assert report.unmatched == ["unet.down_blocks.9.attentions.0.proj_in"] and "1 layers not in this model" in \
        report.line()
    lorakit.restore(c)
    with pytest.raises(lorakit.UnmatchedKeys, match="1 entries not applied"):
        lorakit.apply_loras(c, [lora], strict=True)


def test_no_layer_matches() -> None:
    c = tiny_components("sd1")
    t = adapter_tensors("lora", (32, 32))
    lora = lorakit.lora_from_state_dict({f"lora_unet_nothing_here.{k}": v for k, v in t.items()}, {}, name="n")
    with pytest.raises(lorakit.IncompatibleLora, match="none of its 1 layers exists in this model"):
        lorakit.apply_loras(c, [lora])


@pytest.mark.parametrize("spec,msg", [({"foo": 1}, "unknown weight part"), ("abc", "must be a number"),
                                      ({"lbw": [1, 2]}, "17 or 26"), ({"lbw": "BOGUS"}, "preset"),
                                      ({"dyn": 0}, "dyn must be")])
def test_bad_weight_specs(spec: object, msg: str) -> None:
    with pytest.raises(lorakit.WeightSpecError, match=msg):
        lorakit.as_weight(spec)  # type: ignore[arg-type]


def test_bad_target() -> None:
    with pytest.raises(lorakit.LorakitError, match="needs a diffusers pipeline"):
        lorakit.apply_loras(object(), [])


def test_bad_mode() -> None:
    with pytest.raises(lorakit.LorakitError, match="mode must be"):
        lorakit.apply_loras(tiny_components("sd1"), [], mode="magic")
