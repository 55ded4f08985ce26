"""A1111 prompt emphasis, as a pure function: ``(word)`` ×1.1, ``[word]`` ÷1.1, ``(word:1.4)`` ×1.4, escapes
``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\``, and ``BREAK`` (a chunk boundary). As in A1111, unbalanced brackets are
not errors: a stray closer is text, an unclosed opener weights the rest of the prompt."""
from __future__ import annotations

import re

TOKEN = re.compile(r"\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:")
BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*")
BREAK = ("BREAK", -1.0)
ROUND, SQUARE = 1.1, 1 / 1.1


def parse_emphasis(text: str) -> list[tuple[str, float]]:
    """``"a (big:1.3) [cat]"`` → ``[("a ", 1.0), ("big", 1.3), (" ", 1.0), ("cat", 0.909…)]``; ``BREAK`` becomes
    ``("BREAK", -1.0)``. Neighbouring pieces of equal weight are merged."""
    pieces: list[list[object]] = []
    rounds: list[int] = []
    squares: list[int] = []
    for m in TOKEN.finditer(text):
        token, weight = m.group(0), m.group(1)
        if token.startswith("\\"):
            pieces.append([token[1:], 1.0])
        elif token == "(":
            rounds.append(len(pieces))
        elif token == "[":
            squares.append(len(pieces))
        elif weight is not None and rounds:
            _scale(pieces, rounds.pop(), float(weight))
        elif token == ")" and rounds:
            _scale(pieces, rounds.pop(), ROUND)
        elif token == "]" and squares:
            _scale(pieces, squares.pop(), SQUARE)
        else:
            for i, part in enumerate(BREAK_WORD.split(token)):
                if i:
                    pieces.append(list(BREAK))
                pieces.append([part, 1.0])
    for start in rounds:
        _scale(pieces, start, ROUND)
    for start in squares:
        _scale(pieces, start, SQUARE)
    return _merge(pieces)


def _scale(pieces: list[list[object]], start: int, factor: float) -> None:
    for piece in pieces[start:]:
        if piece[1] != BREAK[1]:
            piece[1] = float(piece[1]) * factor  # type: ignore[arg-type]


def _merge(pieces: list[list[object]]) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    for text, weight in pieces:
        if text == "" and weight != BREAK[1]:
            continue
        if out and out[-1][1] == weight and weight != BREAK[1]:
            out[-1] = (out[-1][0] + str(text), float(weight))  # type: ignore[arg-type]
        else:
            out.append((str(text), float(weight)))  # type: ignore[arg-type]
    return out or [("", 1.0)]
