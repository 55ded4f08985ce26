"""Textual-inversion embeddings: file layouts, use by name in prompts, bundled in LoRAs, exact injection."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import lorakit
import lorakit.files.hashes
import lorakit.files.io
from lorakit.files.io import save_file
from lorakit.generate.conditioning import encode_prompt
from lorakit.generate.pipeline import Generator, Request
from lorakit.generate.tokenizer import clip_tokenizer
from lorakit.library import EmbeddingIndex, LoraIndex
from lorakit.library.embeddings import Embedding, load_embedding
from lorakit.models.loading import BaseModel, load_model

from .conftest import assert_original, snapshot

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "loras"


@pytest.fixture(scope="module")
def model() -> BaseModel:
    return load_model(None)


def _a1111_pt(path: Path, vectors: torch.Tensor) -> Path:
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": path.stem, "step": 100},
               str(path))
    return path


def test_embedding_equal_to_word_vectors_gives_the_words_conditioning(model: BaseModel) -> None:
    te, tok = model.pipe.text_encoder, clip_tokenizer()
    ids = tok("red cat", add_special_tokens=False).input_ids
    vectors = te.get_input_embeddings().weight[ids].detach().clone()
    emb = {"mytoken": Embedding("mytoken", [vectors])}
    with torch.no_grad():
        words = encode_prompt("a red cat on a mat", [(te, tok)]).embeds
        injected = encode_prompt("a mytoken on a mat", [(te, tok)], embeddings=emb).embeds
        other = encode_prompt("a mytoken on a mat", [(te, tok)]).embeds
    assert torch.equal(injected, words) and not torch.equal(other, words)
    assert not te.get_input_embeddings()._forward_hooks  # the injection hook is gone


@pytest.mark.parametrize("layout", ["a1111_pt", "emb_params", "diffusers_bin", "diffusers_st"])
def test_file_layouts(tmp_path: Path, layout: str) -> None:
    v = torch.randn(2, 64)
    if layout == "a1111_pt":
        path = _a1111_pt(tmp_path / "x.pt", v)
    elif layout == "emb_params":
        path = tmp_path / "x.safetensors"
        save_file({"emb_params": v}, path)
    elif layout == "diffusers_bin":
        path = tmp_path / "x.bin"
        torch.save({"<x>": v[0]}, str(path))
        v = v[:1]
    else:
        path = tmp_path / "x.safetensors"
        save_file({"<x>": v[0]}, path)
        v = v[:1]
    emb = load_embedding(path)
    assert emb.name == "x" and emb.tokens == v.shape[0] and torch.equal(emb.vectors[0], v)


def test_sdxl_pair(tmp_path: Path) -> None:
    save_file({"clip_l": torch.randn(3, 768), "clip_g": torch.randn(3, 1280)}, tmp_path / "xl.safetensors")
    emb = load_embedding(tmp_path / "xl.safetensors")
    assert [t.shape for t in emb.vectors] == [(3, 768), (3, 1280)]


def test_embedding_in_negative_prompt_changes_image_and_unused_changes_nothing(
        model: BaseModel, tmp_path: Path) -> None:
    _a1111_pt(tmp_path / "bad-artist.pt", torch.randn(2, 64))
    snap = snapshot({"text_encoder": model.pipe.text_encoder})
    plain_gen = Generator(model, LoraIndex([]))
    emb_gen = Generator(model, LoraIndex([]), EmbeddingIndex([tmp_path]))
    req = dict(steps=2, width=64, height=64, seed=4)
    neg = "(painting by bad-artist:0.9), blurry"
    with_emb = np.asarray(emb_gen(Request("a cat", neg, **req)).images[0])  # type: ignore[arg-type]
    without = np.asarray(plain_gen(Request("a cat", neg, **req)).images[0])  # type: ignore[arg-type]
    assert not np.array_equal(with_emb, without)
    unused = np.asarray(emb_gen(Request("a cat", "blurry", **req)).images[0])  # type: ignore[arg-type]
    assert np.array_equal(unused, np.asarray(plain_gen(Request("a cat", "blurry", **req)).images[0]))  # type: ignore[arg-type]
    assert_original({"text_encoder": model.pipe.text_encoder}, snap)


def test_bundled_embedding_is_loaded_with_its_lora(model: BaseModel, tmp_path: Path) -> None:
    sd = lorakit.files.io.load_file(EXAMPLES / "demo_style.safetensors")[0]
    save_file(sd, tmp_path / "plain.safetensors")
    save_file({**sd, "bundle_emb.mychar.string_to_param.*": torch.randn(2, 64)}, tmp_path / "bundled.safetensors")
    gen = Generator(model, LoraIndex([tmp_path]))
    req = dict(steps=2, width=64, height=64, seed=4)
    a = np.asarray(gen(Request("mychar walking <lora:bundled:0.5>", **req)).images[0])  # type: ignore[arg-type]
    b = np.asarray(gen(Request("mychar walking <lora:plain:0.5>", **req)).images[0])  # type: ignore[arg-type]
    gen.close()
    assert not np.array_equal(a, b)


def test_wrong_width_names_the_file(model: BaseModel, tmp_path: Path) -> None:
    _a1111_pt(tmp_path / "sd15emb.pt", torch.randn(1, 768))
    gen = Generator(model, LoraIndex([]), EmbeddingIndex([tmp_path]))
    with pytest.raises(lorakit.LorakitError, match="sd15emb.pt: embedding 'sd15emb' is 768 wide, the text encoder "
                                                   "expects 64"):
        gen(Request("a sd15emb cat", steps=1, width=64, height=64, seed=1))


def test_long_embedding_stays_whole_in_the_next_chunk() -> None:
    from lorakit.generate.conditioning import chunk_prompt

    chunks = chunk_prompt(" ".join(["cat"] * 73) + " styleemb dog", clip_tokenizer(), {"styleemb": 3})
    assert [len(c.tokens) for c in chunks] == [73, 4] and sorted(chunks[1].vectors) == [0, 1, 2]


def test_unsafe_embedding_pickle_refused(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (print, ("pwned",))

    torch.save({"string_to_param": {"*": torch.zeros(1, 4)}, "x": Evil()}, str(tmp_path / "e.pt"))
    with pytest.raises(lorakit.UnsafePickle):
        load_embedding(tmp_path / "e.pt")


def test_cli_embeddings_dir(tmp_path: Path) -> None:
    from PIL import Image

    from lorakit.cli import main

    emb_dir = tmp_path / "emb"
    emb_dir.mkdir()
    _a1111_pt(emb_dir / "shiny.pt", torch.randn(1, 64))
    out = tmp_path / "o.png"
    assert main(["generate", "a shiny cat", "-e", str(emb_dir), "--steps", "1", "-W", "64", "-H", "64", "--seed",
                 "2", "-o", str(out)]) == 0
    assert Image.open(out).text["parameters"].startswith("a shiny cat")
