"""Drawing a labelled grid: cells side by side, column labels above, row labels on the left, a title on top —
all drawn as text (Pillow's bundled font), wrapped to fit. The layout says where each cell is, so a reader of the
PNG can cut a cell back out."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from PIL import Image, ImageDraw, ImageFont

BACKGROUND, INK = (255, 255, 255), (0, 0, 0)


@dataclass(frozen=True)
class Layout:
    """Cells of ``cell`` = (w, h) px in ``columns`` × ``rows``; the first cell's top-left corner is ``origin``
    (= the left label margin, the title + top label margin); the image is ``size``."""

    cell: tuple[int, int]
    columns: int
    rows: int
    origin: tuple[int, int]

    @property
    def size(self) -> tuple[int, int]:
        return self.origin[0] + self.columns * self.cell[0], self.origin[1] + self.rows * self.cell[1]

    def box(self, column: int, row: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of one cell, for ``Image.crop``."""
        left, top = self.origin[0] + column * self.cell[0], self.origin[1] + row * self.cell[1]
        return left, top, left + self.cell[0], top + self.cell[1]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Style:
    font: Any
    line: int  # line height, px
    pad: int


def _style(cell: tuple[int, int]) -> _Style:
    size = max(10, (cell[0] + cell[1]) // 25)  # A1111's label size for its cell size, at least 10 px
    return _Style(ImageFont.load_default(size=size), size + size // 4, max(2, size // 2))


def wrap(text: str, font: Any, width: int) -> list[str]:
    """Greedy word wrap to ``width`` px; a word longer than a line is broken between characters."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if font.getlength(candidate) <= width:
                line = candidate
                continue
            if line:
                lines.append(line)
            line = ""
            for ch in word:  # the word alone does not fit a line: break it
                if line and font.getlength(line + ch) > width:
                    lines.append(line)
                    line = ""
                line += ch
        lines.append(line)
    return lines


def draw_grid(cells: list[list[Image.Image]], x_labels: list[str] | None, y_labels: list[str] | None,
              title: str | None = None) -> tuple[Image.Image, Layout]:
    """``cells[row][column]`` (all the same size) under ``x_labels`` (one a column), beside ``y_labels`` (one a
    row), below ``title``. No labels: no margin on that side."""
    w, h = cells[0][0].size
    rows, columns = len(cells), len(cells[0])
    st = _style((w, h))
    x_lines = [wrap(t, st.font, w - 2 * st.pad) for t in x_labels] if x_labels else []
    y_width = max(w, 8 * st.line)
    y_lines = [wrap(t, st.font, y_width) for t in y_labels] if y_labels else []
    left = int(max(st.font.getlength(line) for lines in y_lines for line in lines)) + 2 * st.pad if y_lines else 0
    t_lines = wrap(title, st.font, left + columns * w - 2 * st.pad) if title else []
    title_h = len(t_lines) * st.line + 2 * st.pad if t_lines else 0
    top = title_h + (max(len(lines) for lines in x_lines) * st.line + 2 * st.pad if x_lines else 0)
    layout = Layout((w, h), columns, rows, (left, top))
    grid = Image.new("RGB", layout.size, BACKGROUND)
    pen = ImageDraw.Draw(grid)
    _lines(pen, st, t_lines, (0, layout.size[0]), st.pad)
    for column, lines in enumerate(x_lines):
        box = layout.box(column, 0)
        _lines(pen, st, lines, (box[0], box[2]), top - len(lines) * st.line - st.pad)
    for row, lines in enumerate(y_lines):
        box = layout.box(0, row)
        _lines(pen, st, lines, (0, left), box[1] + (h - len(lines) * st.line) // 2)
    for row, images in enumerate(cells):
        for column, image in enumerate(images):
            grid.paste(image.convert("RGB"), layout.box(column, row)[:2])
    return grid, layout


def _lines(pen: ImageDraw.ImageDraw, st: _Style, lines: list[str], span: tuple[int, int], y: int) -> None:
    """Each line centred between ``span`` = (x0, x1), the first at ``y``."""
    for line in lines:
        x = span[0] + (span[1] - span[0] - int(st.font.getlength(line))) // 2
        pen.text((max(x, span[0]), y), line, fill=INK, font=st.font)
        y += st.line
