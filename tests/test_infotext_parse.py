"""Reading infotexts back (``generate.infotext_parse``): what lorakit writes comes back whole, real A1111 infotexts
parse as A1111's ``parse_generation_parameters`` parses them, and a hostile line takes linear time."""
from __future__ import annotations

import random
import time

import pytest

from lorakit.generate.infotext import infotext
from lorakit.generate.infotext_parse import PARAM, lora_hashes, param_pairs, parse_infotext

PROMPTS = [
    "a cozy cabin in the woods",
    "a cabin, snow, (warm light:1.2), <lora:demo_style:0.8>, <lora:chars/unet_only:0.6:unet=1:te=0>",
    "first line, with commas\nsecond line: with a colon, and more\n<lora:x:1> BREAK third",
    "portrait of a knight, Steps: like this, Sampler: in the prompt, Seed: here",  # params-like, not last line
    "",
]
NEGATIVES = ["", "blurry, lowres", "bad hands, <lora:loha_style:0.3>\nwatermark, text"]


def _lorakit_infotext(prompt: str, negative: str, clip_skip: int | None = None,
                      hashes: dict[str, str] | None = None) -> str:
    """As ``generate.infotext.job_infotext`` writes it."""
    params = {"Steps": 20, "Sampler": "DPM++ 2M Karras", "CFG scale": 7.5, "Seed": 4294967295,
              "Size": "512x768", "Model hash": "869c0f07e7", "Model": "demo", "Clip skip": clip_skip}
    return infotext(prompt, negative, params, hashes or {})


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("negative", NEGATIVES)
def test_lorakit_infotext_round_trips(prompt: str, negative: str) -> None:
    hashes = {"demo_style": "24763f94e151", "chars/unet_only": "0123abcd4567"}
    text = _lorakit_infotext(prompt, negative, hashes=hashes)
    p = parse_infotext(text)
    assert p["Prompt"] == prompt and p["Negative prompt"] == negative
    assert (p["Steps"], p["Sampler"], p["CFG scale"], p["Seed"]) == ("20", "DPM++ 2M Karras", "7.5", "4294967295")
    assert (p["Size-1"], p["Size-2"], p["Model hash"], p["Model"]) == ("512", "768", "869c0f07e7", "demo")
    assert p["Clip skip"] == "1"  # not written when 1; A1111's default
    assert p["Lora hashes"] == "demo_style: 24763f94e151, chars/unet_only: 0123abcd4567"  # quoted: kept whole
    assert lora_hashes(p) == hashes
    assert p["Version"].startswith("lorakit ")
    assert "Size" not in p


def test_clip_skip_and_no_loras_round_trip() -> None:
    p = parse_infotext(_lorakit_infotext("a cat", "", clip_skip=2))
    assert p["Clip skip"] == "2" and "Lora hashes" not in p and lora_hashes(p) == {}


def test_a1111_docstring_example() -> None:
    text = ("girl with an artist's beret, determined, blue eyes, desert scene, computer monitors, heavy makeup, by "
            "Alphonse Mucha and Charlie Bowater, ((eyeshadow)), (coquettish), detailed, intricate\n"
            "Negative prompt: ugly, fat, obese, chubby, (((deformed))), [blurry], bad anatomy, disfigured, poorly "
            "drawn face, mutation, mutated, (extra_limb), (ugly), (poorly drawn hands), messy drawing\n"
            "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512, Model hash: 45dee52b")
    p = parse_infotext(text)
    assert p["Prompt"].startswith("girl with an artist's beret") and p["Prompt"].endswith("detailed, intricate")
    assert p["Negative prompt"].startswith("ugly, fat") and p["Negative prompt"].endswith("messy drawing")
    assert {k: p[k] for k in ("Steps", "Sampler", "CFG scale", "Seed", "Size-1", "Size-2", "Model hash")} == {
        "Steps": "20", "Sampler": "Euler a", "CFG scale": "7", "Seed": "965400086", "Size-1": "512",
        "Size-2": "512", "Model hash": "45dee52b"}


def test_a1111_1_9_infotext_with_hires_and_hashes() -> None:
    text = ("masterpiece, best quality, 1girl, <lora:add_detail:0.6>, <lora:my:odd:name:1>\n"
            "Negative prompt: (worst quality, low quality:1.4), easynegative\n"
            "Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234567890, Size: 512x768, "
            "Model hash: 7f96a1a9ca, Model: anything-v5, Denoising strength: 0.5, Clip skip: 2, Hires upscale: 2, "
            "Hires steps: 15, Hires upscaler: R-ESRGAN 4x+ Anime6B, Lora hashes: \"add_detail: 7c6bad76eb54, "
            "my:odd:name: 0011aabbccdd\", TI hashes: \"easynegative: c74b4e810b03\", Version: v1.9.4")
    p = parse_infotext(text)
    assert p["Prompt"] == "masterpiece, best quality, 1girl, <lora:add_detail:0.6>, <lora:my:odd:name:1>"
    assert p["Negative prompt"] == "(worst quality, low quality:1.4), easynegative"
    assert p["Schedule type"] == "Karras" and p["Clip skip"] == "2" and p["Hires upscale"] == "2"
    assert p["Hires upscaler"] == "R-ESRGAN 4x+ Anime6B" and p["Version"] == "v1.9.4"
    assert p["TI hashes"] == "easynegative: c74b4e810b03"
    assert lora_hashes(p) == {"add_detail": "7c6bad76eb54", "my:odd:name": "0011aabbccdd"}
    # A1111's defaults for what the infotext lacks; its numbers are numbers
    assert (p["Hires resize-1"], p["Hires resize-2"], p["Masked area padding"]) == (0, 0, 32)
    assert (p["RNG"], p["Hires sampler"], p["FP8 weight"]) == ("GPU", "Use same sampler", "Disable")
    assert "Cache FP16 weight for LoRA" not in p


def test_quoted_values_keep_commas_escapes_and_colons() -> None:
    text = ('a prompt\nSteps: 4, Sampler: Euler, Wildcard prompt: "a \\"b\\", c: d", Note: "x\\ny", Seed: 3, '
            'Broken: "not json\\q", CFG scale: 5')
    p = parse_infotext(text)
    assert p["Wildcard prompt"] == 'a "b", c: d' and p["Note"] == "x\ny"
    assert p["Broken"] == '"not json\\q"'  # JSON cannot read it: kept as written, as A1111 does
    assert p["Seed"] == "3" and p["CFG scale"] == "5"


def test_multiline_negative_and_blank_lines() -> None:
    text = "  line one  \n\nline two\nNegative prompt:   bad\n  worse \nSteps: 1, Sampler: Euler, Seed: 2, Size: 8x16"
    p = parse_infotext(text)
    assert p["Prompt"] == "line one\n\nline two" and p["Negative prompt"] == "bad\nworse"  # lines stripped
    assert (p["Size-1"], p["Size-2"]) == ("8", "16")


def test_text_without_a_parameter_line_is_all_prompt() -> None:
    p = parse_infotext("just a prompt, with: one colon, and: two")  # two pairs: fewer than three
    assert p["Prompt"] == "just a prompt, with: one colon, and: two" and p["Negative prompt"] == ""
    assert "with" not in p and p["Clip skip"] == "1"
    empty = parse_infotext("")
    assert empty["Prompt"] == "" and empty["Negative prompt"] == "" and empty["Clip skip"] == "1"
    only_params = parse_infotext("Steps: 5, Sampler: Euler, Seed: 9")
    assert only_params["Prompt"] == "" and only_params["Steps"] == "5"


def test_empty_value_is_skipped_and_hypernet_goes_into_the_prompt() -> None:
    p = parse_infotext("a dog\nSteps: 5, Model: , Sampler: Euler, Seed: 9, Hypernet: anime, Hypernet strength: 0.5")
    assert "Model" not in p  # A1111's parser fails on an empty value and skips it
    assert p["Prompt"] == "a dog<hypernet:anime:0.5>"


def test_old_first_pass_size_becomes_size_and_hires_resize() -> None:
    base = "a castle\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 1024x768, Denoising strength: 0.7, "
    p = parse_infotext(base + "First pass size: 0x0")
    assert (p["Size-1"], p["Size-2"], p["Hires resize-1"], p["Hires resize-2"]) == (640, 448, 1024, 768)
    p = parse_infotext(base + "First pass size: 512x384")
    assert (p["Size-1"], p["Size-2"], p["Hires resize-1"], p["Hires resize-2"]) == (512, 384, 1024, 768)


def test_fp8_weight_adds_its_cache_default() -> None:
    p = parse_infotext("x\nSteps: 1, Sampler: Euler, Seed: 2, FP8 weight: Enable for SDXL")
    assert p["FP8 weight"] == "Enable for SDXL" and p["Cache FP16 weight for LoRA"] is False


@pytest.mark.parametrize("value, expected", [
    (None, {}), ("", {}), (7, {}),
    ("a: 0123abcd", {"a": "0123abcd"}),
    (" a : 01 ,b:02, nocolon, :03, c: ", {"a": "01", "b": "02"}),
])
def test_lora_hashes(value: object, expected: dict[str, str]) -> None:
    assert lora_hashes({} if value is None else {"Lora hashes": value}) == expected


def test_param_pairs_equal_a1111_findall() -> None:
    rng = random.Random(0)
    alphabet = list('ab_ -/:,"\t\\xé1\r\u00a0')
    for _ in range(30_000):
        line = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24)))
        assert param_pairs(line) == PARAM.findall(line), repr(line)


@pytest.mark.parametrize("line", ["word " * 60_000, " " * 300_000, "a" * 300_000, "-x" * 150_000],
                         ids=["words", "spaces", "letters", "dashes"])
def test_long_line_without_pairs_takes_linear_time(line: str) -> None:
    start = time.perf_counter()
    assert param_pairs(line) == []
    assert parse_infotext("prompt\n" + line)["Prompt"].startswith("prompt")
    assert time.perf_counter() - start < 5  # re's findall: minutes on the first one
