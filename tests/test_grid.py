"""X/Y/Z grids and the block analyzer: axis syntax (A1111 ranges), tag rewriting, cell order (fewest LoRA-set
switches), the labelled PNG with each cell's infotext, and — on the demo model at 64 px, 1 step — a cell equal to
its request run alone and the analyzer's ranking."""
from __future__ import annotations

import hashlib
import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from lorakit.batch.analyze import analyze, lora_blocks
from lorakit.batch.axes import parse_axis, set_lora_args
from lorakit.batch.grid import build_cells, read_grid, run_grid, run_order, switches
from lorakit.cli import main
from lorakit.errors import GridError, LorakitError
from lorakit.generate.pipeline import Generator, Request, Result
from lorakit.library import Library, LoraNameError
from lorakit.models.loading import load_model
from lorakit.prompt import parse_prompt

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "loras"


@pytest.mark.parametrize("text, values", [
    ("steps=1-9 (+2)", (1, 3, 5, 7, 9)),
    ("steps=1-5", (1, 2, 3, 4, 5)),
    ("steps=5-1", (5, 4, 3, 2, 1)),  # downwards (A1111 gives nothing)
    ("steps=10-1 (-3)", (10, 7, 4, 1)),
    ("steps=1-10 [4]", (1, 4, 7, 10)),
    ("seed=0-10 [4]", (0, 3, 6, 10)),  # 3.33 → 3, 6.67 → 6: truncated, as A1111
    ("steps = 2 - 4 , 8", (2, 3, 4, 8)),
    ("seed=3,1-2", (3, 1, 2)),
    ("lora:s=0-1 [5]", (0.0, 0.25, 0.5, 0.75, 1.0)),
    ("lora:s=0-1 (+0.1)", tuple(round(i / 10, 10) for i in range(11))),  # no 1.1, no 0.30000000000000004
    ("cfg=3-7 (+1.5)", (3.0, 4.5, 6.0)),
    ("cfg=7-5 [3]", (7.0, 6.0, 5.0)),
    ("te:s=-1-1 [3]", (-1.0, 0.0, 1.0)),
    ("unet:s=.5,1e-1", (0.5, 0.1)),
    ("lora:s=1-1 [1]", (1.0,)),
    ("lbw:s=all,OUTD", ("ALL", "OUTD")),
    ('lbw:s="1, 0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1"', ("1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1",)),
    ("sampler=euler_a,DPM++ 2M", ("Euler a", "DPM++ 2M")),
    ('prompt=cat,"dog, sitting"', ("cat", "dog, sitting")),
    ("clip-skip=1-2", (1, 2)),
])
def test_axis_values_and_ranges(text: str, values: tuple[Any, ...]) -> None:
    axis = parse_axis(text, "--x")
    assert axis.values == values
    assert all(type(a) is type(b) for a, b in zip(axis.values, values))


@pytest.mark.parametrize("text, problem", [
    ("nothing", "expected KIND=VALUES"),
    ("colour=1,2", "unknown axis 'colour'"),
    ("lora=0,1", "name the LoRA"),
    ("seed:s=1", "takes no LoRA name"),
    ("steps=a,2", "'a' is not a whole number or a range"),
    ("steps=1.5", "not a whole number"),
    ("cfg=nan", "is not a number"),
    ("steps=1-9 (-2)", "never gets from 1 to 9"),
    ("steps=1-9 (+0)", "never gets"),
    ("steps=1-100000", "at most 1000"),
    ("cfg=1-3 [0]", "count must be from 1"),
    ("steps=0,1", "steps must be from 1"),
    ("cfg=99", "CFG must be from 0 to 30"),
    ("seed=-2", "a seed must be from 0"),
    ("sampler=Heun", "unknown sampler 'Heun'"),
    ("lbw:s=1,0", "vector must be quoted"),
    ('lbw:s="1,0,1"', "17 or 26 values"),
    ("prompt=cat", "needs the text to find and at least one replacement"),
    ('prompt="cat', "not valid comma-separated"),
    ("seed=1,,2", "an empty value"),
])
def test_axis_errors_name_the_axis(text: str, problem: str) -> None:
    with pytest.raises(GridError) as e:
        parse_axis(text, "--y")
    assert str(e.value).startswith(f"--y {text!r}: ") and problem in str(e.value)


def test_seed_minus_one_is_one_fixed_random_seed() -> None:
    (seed,) = parse_axis("seed=-1").values
    assert 0 <= seed < 2 ** 32


@pytest.mark.parametrize("prompt, changes, expect", [
    ("a <lora:s:0.5>", {"te": "1", "unet": "1"}, "a <lora:s:1>"),
    ("a <lora:s:0.5:0.7>", {"te": "0.2"}, "a <lora:s:0.2:0.7>"),
    ("a <lora:s:te=0.5>", {"unet": "0"}, "a <lora:s:0.5:0>"),  # unet was 1 (named te alone)
    ("a <lora:s:0.8:lbw=OUTD>", {"lbw": "INS"}, "a <lora:s:0.8:lbw=INS>"),
    ("a <lora:s:1:1:4>", {"lbw": "ALL"}, "a <lora:s:1:dyn=4:lbw=ALL>"),
    ("a <lora:s:te=0@0,1@1>", {"lbw": "ALL"}, "a <lora:s:te=0@0,1@1:unet=1:lbw=ALL>"),
    ("a <LYCO:S:0.5> <lora:t:1>", {"te": "0", "unet": "0"}, "a <LYCO:S:0> <lora:t:1>"),  # names are case-blind
    ("a cat", {"te": "0.3", "unet": "0.3"}, "a cat <lora:s:0.3>"),  # not named: appended
])
def test_lora_axis_rewrites_the_tag(prompt: str, changes: dict[str, str], expect: str) -> None:
    assert set_lora_args(Request(prompt), "s", changes).prompt == expect
    parse_prompt(expect)  # the rewritten tag is valid syntax


def test_lora_axis_reaches_negative_prompt_and_refuses_invokeai() -> None:
    req = set_lora_args(Request("a cat", "blurry <lora:s:1>"), "s", {"te": "0", "unet": "0"})
    assert (req.prompt, req.negative) == ("a cat", "blurry <lora:s:0>")
    with pytest.raises(GridError, match="withLora"):
        build_cells(Request("a withLora(s, 0.5)"), parse_axis("lora:s=0,1"), None, None)
    with pytest.raises(GridError, match="did not find 'dog'"):
        build_cells(Request("a cat"), parse_axis("prompt=dog,cow"), None, None)


def test_cells_grouped_by_lora_set_switch_the_minimum() -> None:
    """X seeds change fastest in grid order: running in grid order would switch weights at every row; grouped,
    each LoRA set is applied once."""
    cells = build_cells(Request("a cat <lora:s:1>", seed=1), parse_axis("seed=1-3"),
                        parse_axis("lora:s=0,0.5,1"), parse_axis("lbw:s=ALL,OUTD"))
    assert len(cells) == 18 and switches(cells) == 5  # grid order: Z/Y change every 3 cells
    order = run_order(cells)
    assert sorted(map(id, order)) == sorted(map(id, cells))
    assert switches(order) == len({c.key for c in cells}) - 1 == 5
    swapped = build_cells(Request("a cat <lora:s:1>", seed=1), parse_axis("lora:s=0,0.5,1"), parse_axis("seed=1-3"),
                          None)
    assert switches(swapped) == 8 and switches(run_order(swapped)) == 2
    assert [(c.iy, c.ix) for c in run_order(swapped)[:3]] == [(0, 0), (1, 0), (2, 0)]  # grid order in a group


class FakeGenerator:
    """A stand-in with the generator's interface: each image is a colour drawn from the request, and every call is
    recorded (the grid's own logic, without a model)."""

    def __init__(self) -> None:
        self.index = Library([EXAMPLES])
        self.conditioner = type("C", (), {"layers": 12})()
        self.model = type("M", (), {"native_size": 512})()
        self.on_step: Any = None
        self.calls: list[Request] = []

    def resolve(self, req: Request) -> object:
        from lorakit.generate.request import resolve_job

        return resolve_job(req, self.index, self.conditioner.layers, self.model.native_size)

    def __call__(self, req: Request) -> Result:
        self.calls.append(req)
        digest = hashlib.sha256(repr(req).encode()).digest()
        image = Image.new("RGB", (req.width or 512, req.height or 512), tuple(digest[:3]))
        return Result([image], [int(req.seed or 0)], [f"{req.prompt}\nSeed: {req.seed}"])


def test_grid_png_labels_infotexts_and_one_file_per_z(tmp_path: Path) -> None:
    gen = FakeGenerator()
    x, y, z = parse_axis("lora:demo_style=0,1"), parse_axis("prompt=cat,dog,cow"), parse_axis("seed=7,8")
    run = run_grid(gen, Request("a cat", width=64, height=64), x, y, z, tmp_path / "g.png")  # type: ignore[arg-type]
    assert [p.name for p in run.paths] == ["g-01.png", "g-02.png"] and len(gen.calls) == 12
    seen = [frozenset(parse_prompt(r.prompt).loras) for r in gen.calls]
    assert sum(a != b for a, b in itertools.pairwise(seen)) == run.switches == 1  # the calls really switch once
    for iz, path in enumerate(run.paths):
        image, info, cells = read_grid(path)
        left, top = info["origin"]
        assert left > 0 and top > 0 and image.size == (left + 2 * 64, top + 3 * 64)  # grows by the margins only
        px = np.asarray(image)
        assert (px[:top, left:] < 128).any() and (px[top:, :left] < 128).any()  # text drawn in both margins
        assert info["x"]["labels"] == ["demo_style: 0", "demo_style: 1"] and info["z"]["label"] == f"Seed: {7 + iz}"
        assert image.text["parameters"].endswith('X Type: lora:demo_style, X Values: "0,1", Y Type: prompt, Y '
                                                 'Values: "cat,dog,cow", Z Type: seed, Z Values: "7,8"')
        for (ix, iy), text in cells.items():
            req = next(r for r in gen.calls if f"\nSeed: {r.seed}" in text and r.prompt == text.split("\n")[0])
            assert req.seed == 7 + iz and ["cat", "dog", "cow"][iy] in req.prompt and f":{ix}>" in req.prompt
            colour = image.crop((left + ix * 64, top + iy * 64, left + ix * 64 + 64, top + iy * 64 + 64))
            assert np.array_equal(np.asarray(colour), np.asarray(gen(req).images[0]))
        assert len(cells) == 6


def test_grid_checks_every_cell_before_the_first_image(tmp_path: Path) -> None:
    gen = FakeGenerator()
    with pytest.raises(LoraNameError):
        run_grid(gen, Request("a cat"), parse_axis("lora:no_such_lora=0,1"), None, None,  # type: ignore[arg-type]
                 tmp_path / "g.png")
    with pytest.raises(LorakitError, match="width must be between"):
        run_grid(gen, Request("a cat", width=32), parse_axis("seed=1,2"), None, None,  # type: ignore[arg-type]
                 tmp_path / "g.png")
    with pytest.raises(GridError, match="megapixels"):
        run_grid(gen, Request("a cat", width=2048, height=2048), parse_axis("seed=1-8"),  # type: ignore[arg-type]
                 parse_axis("steps=1-8"), None, tmp_path / "g.png")
    assert gen.calls == [] and not (tmp_path / "g.png").exists()


@pytest.mark.parametrize("argv, problem", [
    (["grid", "a cat"], "give at least one axis"),
    (["grid", "a cat", "--x", "hue=1"], "unknown axis 'hue'"),
    (["grid", "a cat", "--x", "seed=1", "--analyze-blocks", "s"], "leave out --x"),
])
def test_cli_errors_are_one_line(argv: list[str], problem: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lorakit: error: ") and problem in err


@pytest.fixture(scope="module")
def gen() -> Any:
    g = Generator(load_model(None), Library([EXAMPLES]))
    yield g
    g.close()


def test_cell_is_the_same_request_run_alone(gen: Generator, tmp_path: Path) -> None:
    base = Request("a cat <lora:demo_style:1>", steps=1, width=64, height=64, seed=4)
    run = run_grid(gen, base, parse_axis("lbw:demo_style=ALL,OUTD"), None, None, tmp_path / "g.png")
    image, info, cells = read_grid(run.paths[0])
    alone = gen(set_lora_args(base, "demo_style", {"lbw": "OUTD"}))
    assert cells[(1, 0)] == alone.infotexts[0] and "lbw=OUTD" in cells[(1, 0)]
    cell = image.crop((info["origin"][0] + 64, info["origin"][1], info["origin"][0] + 128, info["origin"][1] + 64))
    assert np.array_equal(np.asarray(cell), np.asarray(alone.images[0]))  # bitwise


def test_lora_blocks_are_the_blocks_it_has_layers_in(gen: Generator) -> None:
    assert lora_blocks(gen, "demo_style") == ["BASE", "IN00", "IN01", "IN03", "IN04", "M00", "OUT00", "OUT01",
                                              "OUT02", "OUT03", "OUT04", "OUT11"]


def test_analyzer_ranks_a_block_that_matters_above_one_that_does_not(gen: Generator) -> None:
    """IN07 is in the lbw vector but neither in the demo UNet nor the LoRA: lowering it changes nothing."""
    base = Request("a cat <lora:demo_style:1>", steps=1, width=64, height=64, seed=4)
    result = analyze(gen, base, "demo_style", ["in07", "OUT04"])
    assert [e.block for e in result.effects] == ["OUT04", "IN07"]
    top, none = result.effects
    assert top.mean > 0.0 and top.max > 0 and (none.mean, none.max) == (0.0, 0)  # changes pixels / changes none
    with pytest.raises(GridError, match="IN99 is not a block"):
        analyze(gen, base, "demo_style", ["IN99"])
