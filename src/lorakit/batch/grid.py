"""XY(Z) grids: every combination of up to three axes' values is one cell (one image), run in the order that
switches LoRA sets the fewest times, and drawn as one labelled PNG per Z value.

Order: cells are grouped by their LoRA set (``lora_set``: every LoRA with every weight as written) in order of
first appearance, grid order kept within a group — so each distinct set is applied once, and the number of
switches is (distinct sets − 1), the least any order can do. Seeds are fixed before the first cell (a random seed
is drawn once, as A1111's X/Y/Z plot does), so a cell is exactly the image of its request run alone.

The PNG carries A1111's ``parameters`` text (the first cell's infotext with ``X Type``/``X Values``… appended),
one ``cell X,Y`` text per cell with that cell's infotext, and ``lorakit grid``: JSON with the layout (cell size,
origin, columns, rows) and the axes' labels.
"""
from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ..errors import GridError
from ..files.output import write_atomic
from ..generate.pipeline import Generator, Request
from .axes import Axis
from .common import LoraSet, Progress, lora_set
from .draw import Layout, draw_grid

MAX_GRID_PIXELS = 200_000_000  # per PNG (A1111's img_max_size_mp default, 200 MP), and all Z grids together
MAX_CELLS = 5_000  # 50 × 50 × 2: hours of images on a GPU; more is a typo (1-1000 on two axes) long before a plan
SCHEMA = "lorakit.grid/1"


@dataclass(frozen=True)
class Cell:
    """One image of the grid: its place (column ``ix``, row ``iy``, grid ``iz``), its request, its LoRA set."""

    ix: int
    iy: int
    iz: int
    request: Request
    key: LoraSet


@dataclass
class GridRun:
    paths: list[Path]  # one PNG per Z value
    order: list[Cell]  # the cells in the order they ran
    switches: int  # LoRA-set changes between consecutive cells
    layouts: list[Layout]


def fix_seed(req: Request) -> Request:
    """A request with a concrete seed: a missing or -1 seed is drawn once, so every cell shares it."""
    return req if req.seed not in (None, -1) else replace(req, seed=random.randrange(2 ** 32 - 2))


def build_cells(base: Request, x: Axis | None, y: Axis | None, z: Axis | None) -> list[Cell]:
    """Every combination in grid order (Z, then Y, then X fastest); axes act in X, Y, Z order as in A1111."""
    for axis in (x, y, z):
        if axis is not None:
            axis.check(base)
    cells = []
    for iz, zv in enumerate(_values(z)):
        for iy, yv in enumerate(_values(y)):
            for ix, xv in enumerate(_values(x)):
                req = base
                for axis, value in ((x, xv), (y, yv), (z, zv)):
                    req = axis.apply(req, value) if axis is not None else req
                cells.append(Cell(ix, iy, iz, req, lora_set(req.prompt, req.negative)))
    return cells


def _values(axis: Axis | None) -> tuple[Any, ...]:
    return axis.values if axis is not None else (None,)


def run_order(cells: list[Cell]) -> list[Cell]:
    """Cells grouped by LoRA set (first appearance first), grid order within a group."""
    groups: dict[LoraSet, list[Cell]] = {}
    for cell in cells:
        groups.setdefault(cell.key, []).append(cell)
    return [cell for group in groups.values() for cell in group]


def switches(order: list[Cell]) -> int:
    return sum(1 for a, b in itertools.pairwise(order) if a.key != b.key)


def check_size(base: Request, x: Axis | None, y: Axis | None, z: Axis | None) -> int:
    """The number of cells, checked before any is built: at most ``MAX_CELLS``, each PNG at most
    ``MAX_GRID_PIXELS``, and all of them together too (every cell's image is held until the PNGs are drawn)."""
    nx, ny, nz = (len(_values(a)) for a in (x, y, z))
    cells = nx * ny * nz
    if cells > MAX_CELLS:
        raise GridError(f"the grid has {cells} cells ({nx} × {ny} × {nz}); at most {MAX_CELLS}: use fewer values")
    size = (base.width or 512) * (base.height or 512)
    for pixels, what in ((nx * ny * size, "grid would be"), (cells * size, "grids would hold")):
        if pixels > MAX_GRID_PIXELS:
            raise GridError(f"the {what} {pixels / 1e6:.0f} megapixels (more than {MAX_GRID_PIXELS / 1e6:.0f}): "
                            "use fewer values or a smaller size")
    return cells


def preflight_requests(gen: Generator, requests: list[Request]) -> None:
    """Resolve every distinct request before the first image (unknown LoRAs, bad tags, limits fail now, not
    after an hour of cells)."""
    seen: set[str] = set()
    for req in requests:
        if repr(req) not in seen:
            seen.add(repr(req))
            gen.resolve(req)


def run_grid(gen: Generator, base: Request, x: Axis | None, y: Axis | None, z: Axis | None, out: Path,
             progress: Progress | None = None) -> GridRun:
    """Generate every cell (one image each) and write one labelled PNG per Z value: ``out`` without a Z axis,
    else ``OUT-01.png``, ``OUT-02.png``…"""
    base = fix_seed(replace(base, batch=1))
    check_size(base, x, y, z)
    cells = build_cells(base, x, y, z)
    preflight_requests(gen, [c.request for c in cells])
    order = run_order(cells)
    done: dict[tuple[int, int, int], tuple[Image.Image, str]] = {}
    previous = gen.on_step
    if progress is not None:
        gen.on_step = lambda step, steps: progress.part(step / steps)
    try:
        for cell in order:
            result = gen(cell.request)
            done[(cell.ix, cell.iy, cell.iz)] = (result.images[0], result.infotexts[0])
            if progress is not None:
                progress.advance()
    finally:
        gen.on_step = previous
        if progress is not None:
            progress.close()
    paths, layouts = [], []
    for iz, zv in enumerate(_values(z)):
        path = out if z is None else out.with_name(f"{out.stem}-{iz + 1:02d}{out.suffix}")
        layouts.append(_save(path, done, iz, (x, y, z), zv))
        paths.append(path)
    return GridRun(paths, order, switches(order), layouts)


def _save(path: Path, done: dict[tuple[int, int, int], tuple[Image.Image, str]], iz: int,
          axes: tuple[Axis | None, Axis | None, Axis | None], z_value: Any) -> Layout:
    x, y, z = axes
    nx, ny = len(_values(x)), len(_values(y))
    images = [[done[(ix, iy, iz)][0] for ix in range(nx)] for iy in range(ny)]
    grid, layout = draw_grid(images, [x.label(v) for v in x.values] if x else None,
                             [y.label(v) for v in y.values] if y else None, z.label(z_value) if z else None)
    info = PngInfo()
    info.add_text("parameters", done[(0, 0, iz)][1] + axis_params(axes))
    for iy in range(ny):
        for ix in range(nx):
            info.add_text(f"cell {ix},{iy}", done[(ix, iy, iz)][1])
    info.add_text("lorakit grid", json.dumps(grid_info(layout, axes, z_value)))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: grid.save(tmp, format="PNG", pnginfo=info))
    return layout


def axis_params(axes: tuple[Axis | None, ...]) -> str:
    """A1111's grid fields: ``, X Type: lora:style, X Values: "0,0.5,1"`` for each axis given."""
    out = ""
    for letter, axis in zip("XYZ", axes):
        if axis is not None:
            values = axis.text.partition("=")[2].strip().replace('"', "'")
            out += f", {letter} Type: {axis.name}, {letter} Values: \"{values}\""
    return out


def grid_info(layout: Layout, axes: tuple[Axis | None, ...], z_value: Any) -> dict[str, Any]:
    x, y, z = axes
    return {"schema": SCHEMA, **layout.as_dict(),
            "x": {"axis": x.name, "labels": [x.label(v) for v in x.values]} if x else None,
            "y": {"axis": y.name, "labels": [y.label(v) for v in y.values]} if y else None,
            "z": {"axis": z.name, "label": z.label(z_value)} if z else None}


def read_grid(path: str | Path) -> tuple[Image.Image, dict[str, Any], dict[tuple[int, int], str]]:
    """A grid PNG back: the image, its ``lorakit grid`` layout, and each cell's infotext by (column, row)."""
    image = Image.open(path)
    image.load()
    texts = dict(getattr(image, "text", {}))
    if "lorakit grid" not in texts:
        raise GridError(f"{path}: not a lorakit grid PNG (no 'lorakit grid' text chunk)")
    cells = {}
    for key, text in texts.items():
        if key.startswith("cell "):
            ix, _, iy = key[5:].partition(",")
            cells[(int(ix), int(iy))] = text
    return image, json.loads(texts["lorakit grid"]), cells
