"""Captions of the demo model's scenes: the phrasings it is trained on (``PHRASINGS``) and the ones kept out of
training for its evaluation (``HELD_OUT``: new arrangements of the same words — no caption a training picture
gets is ever an evaluation prompt, ``tests/test_demo_model.py`` checks it).

A caption names every attribute that differs from the default (one shape, medium size, in the middle); the
background is named or not, depending on the phrasing.
"""
from __future__ import annotations

from .shapes import POSITION_WORDS, Scene

# Fields: {np} "a small red circle" / "two small red circles"; {bare} "small red circle" (no article);
# {inv} "a small circle that is red"; {a_shape} "a small circle"; {colour} {shape} {bg};
# {pos} " on the left" ("" in the middle); {where} "on the left" / "in the middle"; {front} "on the left, "
# ("" in the middle).
PHRASINGS: tuple[str, ...] = (
    "{np}{pos}",
    "{np}{pos} on a {bg} background",
    "a picture of {np}{pos}",
    "{inv}{pos}",
    "{np}{pos}, {bg} background",
    "{np}{pos} on {bg}",
    "{np} {where}",
    "{a_shape} in {colour}{pos}",
    # The colour word at other places (first; after the shape; after the background), so the text encoder finds
    # it by what it is rather than where it stands.
    "{colour}: {a_shape}{pos}",
    "{a_shape} coloured {colour}{pos}",
    "{bg} background, {np}{pos}",
    "draw {np}{pos}",
    # The position first, and the background with the other forms.
    "{front}{np}",
    "{inv}{pos} on a {bg} background",
    "a picture of {np}{pos} on {bg}",
    "{np} {where}, {bg} background",
)
# Never a training caption: the evaluation set's phrasings (frozen with it).
HELD_OUT: tuple[str, ...] = (
    "{bare}{pos}",
    "{a_shape}, {colour}{pos}",
    "{front}{bare}, {bg} background",
    "{np} on a {bg} background {where}",
    "a picture of {inv}{pos}, {bg} background",
    "{bg} background: {np}{pos}",
    "draw {a_shape} in {colour}{pos} on {bg}",
)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(scene: Scene, phrasing: str | int) -> str:
    """Describe ``scene`` with a template (a string, or an index into ``PHRASINGS``)."""
    template = PHRASINGS[phrasing] if isinstance(phrasing, int) else phrasing
    size = "" if scene.size == "medium" else scene.size + " "
    plural = scene.count == 2
    noun = scene.shape + "s" if plural else scene.shape
    bare = f"{'two ' if plural else ''}{size}{scene.colour} {noun}"
    np_ = bare if plural else f"{_article(bare)} {bare}"
    shape_np = f"two {size}{noun}" if plural else f"{_article(size + noun)} {size}{noun}"
    where = POSITION_WORDS[scene.position]
    pos = "" if scene.position == "center" else " " + where
    fields = {
        "np": np_, "bare": bare, "inv": f"{shape_np} that {'are' if plural else 'is'} {scene.colour}",
        "colour": scene.colour, "shape": scene.shape, "bg": scene.background, "pos": pos, "where": where,
        "front": pos[1:] + ", " if pos else "", "a_shape": shape_np,
    }
    return template.format(**fields)


def names_background(phrasing: str) -> bool:
    """Whether captions in ``phrasing`` say the background."""
    return "{bg}" in phrasing


def training_captions(scene: Scene) -> set[str]:
    """Every caption a training picture of ``scene`` can get."""
    return {caption(scene, p) for p in PHRASINGS}
