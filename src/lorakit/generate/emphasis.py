"""A1111 prompt emphasis, as a pure function: ``(word)`` ×1.1, ``[word]`` ÷1.1, ``(word:1.4)`` ×1.4, escapes
``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\``, and ``BREAK`` (a chunk boundary). As in A1111, unbalanced brackets are
not errors: a stray closer is text, an unclosed opener weights the rest of the prompt. A malformed weight
(``(a:1.1.1)``, ``(a:.)``) is literal text, as ComfyUI reads it (A1111 raises ``ValueError`` there): the piece
is ``"a:1.1.1"`` weighted 1.1.

Linear time. A1111 multiplies every piece after an opener at each closer (quadratic in the nesting); here a piece
records the brackets open when it was made (the tops of two persistent bracket stacks), and its weight is the
product of their factors, folded in the order the brackets closed, as A1111 does, so weights are bit-identical
to A1111's for nesting up to ``EXACT_DEPTH`` brackets; deeper, the product runs from the outermost bracket in
(equal to ~1e-15 relative), so that pathological nesting costs O(1) per piece.
"""
from __future__ import annotations

import re

# A weight is a decimal number (≤ 300 digits a side, so it is finite; ASCII digits only); anything else after
# ":" in brackets is text.
NUMBER = r"[+-]?(?:[0-9]{1,300}(?:\.[0-9]{0,300})?|\.[0-9]{1,300})"
# A run of ":" is one text token, except a last ":" that may start a weight.
TOKEN = re.compile(r"\\[()\[\]\\]|\\|\(|\[|:\s*(" + NUMBER + r")\s*\)|\)|]|[^\\()\[\]:]+|:+(?!\s*[+-]?[.0-9])|:")
# A1111 splits on r"\s*\bBREAK\b\s*", which backtracks quadratically over a run of spaces; splitting on the word
# and stripping the whitespace beside it gives the same pieces in linear time.
BREAK_WORD = re.compile(r"\bBREAK\b")
BREAK = ("BREAK", -1.0)
ROUND, SQUARE = 1.1, 1 / 1.1
EXACT_DEPTH = 32
ROOT = 0


class _Brackets:
    """Every bracket opened, as nodes of a tree (node 0 is the root: no bracket). A node's parent is the bracket
    of the same kind that was open around it; its factor and close time are set when it closes."""

    def __init__(self) -> None:
        self.parent, self.factor, self.closed, self.depth = [ROOT], [1.0], [0], [0]
        self.clock = 0

    def open(self, parent: int) -> int:
        self.parent.append(parent)
        self.factor.append(1.0)
        self.closed.append(0)
        self.depth.append(self.depth[parent] + 1)
        return len(self.parent) - 1

    def close(self, node: int, factor: float) -> None:
        self.clock += 1
        self.factor[node], self.closed[node] = factor, self.clock

    def outward_products(self) -> list[float]:
        """Per node: the product of its factors and its ancestors', root first (parents precede children)."""
        out = [1.0] * len(self.parent)
        for node in range(1, len(out)):
            out[node] = out[self.parent[node]] * self.factor[node]
        return out

    def chain(self, node: int) -> list[int]:
        out = []
        while node != ROOT:
            out.append(node)
            node = self.parent[node]
        return out


def parse_emphasis(text: str) -> list[tuple[str, float]]:
    """``"a (big:1.3) [cat]"`` → ``[("a ", 1.0), ("big", 1.3), (" ", 1.0), ("cat", 0.909…)]``; ``BREAK`` becomes
    ``("BREAK", -1.0)``. Neighbouring pieces of equal weight are merged; empty pieces are dropped."""
    tree = _Brackets()
    rounds: list[int] = []
    squares: list[int] = []
    pieces: list[tuple[str, int, int] | None] = []  # (text, innermost round, innermost square); None: BREAK
    for m in TOKEN.finditer(text):
        token = m.group()
        first = token[0]
        if first == "(":
            rounds.append(tree.open(rounds[-1] if rounds else ROOT))
        elif first == "[":
            squares.append(tree.open(squares[-1] if squares else ROOT))
        elif first == ")" and rounds:
            tree.close(rounds.pop(), ROUND)
        elif first == "]" and squares:
            tree.close(squares.pop(), SQUARE)
        elif first == ":" and rounds and m.group(1) is not None:
            tree.close(rounds.pop(), float(m.group(1)))
        elif first == "\\":
            pieces.append((token[1:], rounds[-1] if rounds else ROOT, squares[-1] if squares else ROOT))
        else:
            _text(token, rounds[-1] if rounds else ROOT, squares[-1] if squares else ROOT, pieces)
    for node in rounds:  # A1111's order: unclosed round brackets outermost first, then square ones
        tree.close(node, ROUND)
    for node in squares:
        tree.close(node, SQUARE)
    return _merge(pieces, tree)


def _text(token: str, r: int, q: int, pieces: list[tuple[str, int, int] | None]) -> None:
    if "BREAK" not in token:
        pieces.append((token, r, q))
        return
    parts = BREAK_WORD.split(token)
    for i, part in enumerate(parts):
        if i:
            pieces.append(None)
            part = part.lstrip()
        if i < len(parts) - 1:
            part = part.rstrip()
        pieces.append((part, r, q))


def _merge(pieces: list[tuple[str, int, int] | None], tree: _Brackets) -> list[tuple[str, float]]:
    weights: dict[tuple[int, int], float] = {}
    outward = tree.outward_products()
    texts: list[list[str] | None] = []  # None: BREAK
    out_w: list[float] = []
    for piece in pieces:
        if piece is None:
            texts.append(None)
            out_w.append(BREAK[1])
            continue
        part, r, q = piece
        if not part:
            continue
        w = weights.get((r, q))
        if w is None:
            w = weights[(r, q)] = _weight(tree, r, q, outward)
        last = texts[-1] if texts else None
        if last is not None and out_w[-1] == w:
            last.append(part)  # joined once at the end: repeated string concatenation is quadratic
        else:
            texts.append([part])
            out_w.append(w)
    return [("".join(t) if t is not None else BREAK[0], w) for t, w in zip(texts, out_w)] or [("", 1.0)]


def _weight(tree: _Brackets, r: int, q: int, outward: list[float]) -> float:
    """1.0 times the factor of each bracket open around the piece, in the order they closed (A1111's)."""
    if tree.depth[r] + tree.depth[q] > EXACT_DEPTH:
        return outward[r] * outward[q]
    w = 1.0
    for node in sorted(tree.chain(r) + tree.chain(q), key=tree.closed.__getitem__):
        w *= tree.factor[node]
    return w
