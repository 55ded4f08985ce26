"""Training data as kohya users keep it, read into a list of (image, caption, repeats).

Layout (everything below ``root``; images: .png .jpg .jpeg .webp .bmp):

- kohya repeat folders ``10_name words``: every image repeats 10 times per epoch; the folder's words are the class
  words, the caption of its images that have no caption file (kohya's rule);
- images directly in ``root`` (or in folders without a number) repeat once;
- captions: ``NAME.txt`` **and** ``NAME.caption`` are both read (kohya reads only ``.caption`` by default and then
  trains silently without captions); when both exist the ``.txt`` one is used and the summary says so;
- ``--trigger WORD``: put in front of every caption that does not already contain it (and the caption of an image
  that has none).

An image without a caption, class words or trigger cannot be trained on: ``TrainDataError`` lists them.
Unreadable images are skipped and listed (``bad_images="skip"``) or fatal (``"fail"``).

Nothing leads the scan out of ``root``: every folder, image and caption is taken with its symlinks resolved, and
one that lands outside ``root``, in a symlink loop, or on a folder or image already taken (a link to ``root``
itself would train its images twice) is a ``TrainDataError`` naming the link. A caption is a regular UTF-8 text
file of at most ``MAX_CAPTION_BYTES`` (read no further) without control characters (a caption of NULs is a
binary file, not a caption).
"""
from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import TrainDataError
from ..files.inputs import read_limited
from ..prompt import lone_surrogate

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_EXTS = (".txt", ".caption")
REPEAT_FOLDER = re.compile(r"^(\d+)_(.*)$")
MAX_PIXELS = 64 * 1024 * 1024  # a bigger image is refused as unreadable (decompression bombs)
MAX_IMAGES = 100_000
MAX_CAPTION_CHARS = 10_000
MAX_CAPTION_BYTES = 4 * MAX_CAPTION_CHARS  # UTF-8: at most 4 bytes a character
CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


@dataclass(frozen=True)
class Item:
    image: Path
    caption: str
    repeats: int
    source: str  # where the caption came from: ".txt", ".caption", "folder", "trigger"
    folder: str  # the folder name (kohya's dataset dir), "" for root


@dataclass
class Dataset:
    root: Path
    items: list[Item]
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    both_captions: list[Path] = field(default_factory=list)

    def dataset_dirs(self) -> dict[str, dict[str, int]]:
        """kohya's ``ss_dataset_dirs``: ``{folder: {"n_repeats": n, "img_count": c}}``."""
        out: dict[str, dict[str, int]] = {}
        for it in self.items:
            d = out.setdefault(it.folder or self.root.name, {"n_repeats": it.repeats, "img_count": 0})
            d["img_count"] += 1
        return out

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """kohya's ``ss_tag_frequency``: per folder, how often each comma-separated tag appears."""
        out: dict[str, Counter[str]] = {}
        for it in self.items:
            tags = [t.strip() for t in it.caption.split(",") if t.strip()]
            out.setdefault(it.folder or self.root.name, Counter()).update(tags)
        return {k: dict(v) for k, v in out.items()}

    def class_words(self, used: bool = False) -> list[str]:
        """The words of the kohya repeat folders in use (``10_night sky`` → ``night sky``); with ``used``, only
        those that served as some image's caption (kohya's rule: a folder's words caption only the images without
        a caption file)."""
        found = (REPEAT_FOLDER.match(it.folder) for it in self.items if not used or it.source == "folder")
        return sorted({m.group(2).replace("_", " ").strip() for m in found if m and m.group(2).strip()})

    def trained_triggers(self, trigger: str | None = None) -> list[str]:
        """The words a LoRA trained on this data answers to: ``--trigger``, folder words that served as captions,
        and the comma-separated tags that every caption has (of two images or more) — each once, case-blind."""
        tags = [[t.strip() for t in it.caption.split(",") if t.strip()] for it in self.items]
        common = {t.casefold() for t in tags[0]}.intersection(*({t.casefold() for t in ts} for ts in tags[1:]))
        common = common if len(tags) > 1 else set()
        words = [trigger or "", *self.class_words(used=True), *(t for t in tags[0] if t.casefold() in common)]
        seen: dict[str, str] = {}
        for word in words:
            if word.strip():
                seen.setdefault(word.strip().casefold(), word.strip())
        return list(seen.values())

    def untrained_folder_words(self) -> list[str]:
        """Folder words that no image was captioned with (every image had a caption file)."""
        return sorted(set(self.class_words()) - set(self.class_words(used=True)))

    def summary(self) -> str:
        """One line: images, repeats, where the captions came from, what was skipped."""
        sources = Counter(it.source for it in self.items)
        said = {".txt": "from .txt", ".caption": "from .caption", "folder": "folder words (no caption file)",
                "trigger": "trigger word only (no caption file)"}
        caps = ", ".join(f"{n} {said[s]}" for s, n in sorted(sources.items()))
        steps = sum(it.repeats for it in self.items)
        text = f"{len(self.items)} images ({steps} per epoch with repeats) in {self.root}; captions: {caps}"
        if self.both_captions:
            text += f"; {len(self.both_captions)} with both .txt and .caption (the .txt was used)"
        unused = self.untrained_folder_words()
        if unused:
            text += (f"; folder words not trained ({', '.join(unused)}): every image there has a caption file — "
                     "put the word in the captions or pass --trigger")
        if self.skipped:
            text += f"; skipped {len(self.skipped)} unreadable: " + ", ".join(
                f"{p.name} ({why})" for p, why in self.skipped[:3]) + (" …" if len(self.skipped) > 3 else "")
        return text


def scan(root: str | Path, trigger: str | None = None, bad_images: str = "skip") -> Dataset:
    """Read ``root``; raises ``TrainDataError`` for an empty folder, images with nothing to train on, or (with
    ``bad_images="fail"``) an unreadable image."""
    if bad_images not in ("skip", "fail"):
        raise TrainDataError(f"bad_images must be skip or fail, got {bad_images!r}")
    base = Path(root)
    if not base.is_dir():
        raise TrainDataError(f"{base}: not a folder of training images")
    trigger = (trigger or "").strip() or None
    data = Dataset(base, [])
    uncaptioned: list[Path] = []
    seen = _Seen(base)
    for folder, repeats, words in _folders(base, seen):
        for image in _images(folder, seen):
            caption, source = _caption(image, words, trigger, data, seen)
            if caption is None:
                uncaptioned.append(image)
                continue
            problem = check_image(image)
            if problem:
                if bad_images == "fail":
                    raise TrainDataError(f"{image}: unreadable image ({problem}); use --bad-images skip to skip it")
                data.skipped.append((image, problem))
                continue
            data.items.append(Item(image, caption, repeats, source, "" if folder == base else folder.name))
            if len(data.items) > MAX_IMAGES:
                raise TrainDataError(f"{base}: more than {MAX_IMAGES} images")
    if uncaptioned:
        names = ", ".join(p.name for p in uncaptioned[:5]) + (" …" if len(uncaptioned) > 5 else "")
        raise TrainDataError(f"{base}: {len(uncaptioned)} images have no caption (.txt or .caption), are not in a "
                             f"kohya repeat folder such as 10_name, and no --trigger was given: {names}")
    if not data.items:
        found = "only unreadable images" if data.skipped else f"no images ({', '.join(IMAGE_EXTS)})"
        raise TrainDataError(f"{base}: {found} to train on")
    return data


class _Seen:
    """The resolved folders and images taken so far, and the resolved root they must stay in."""

    def __init__(self, base: Path) -> None:
        self.root = base.resolve()
        self.taken: dict[Path, Path] = {}

    def resolve(self, path: Path) -> Path:
        """``path`` with its symlinks resolved; a ``TrainDataError`` when that leaves the root or loops."""
        try:
            real = path.resolve(strict=True)
        except (OSError, RuntimeError):  # a symlink loop (ELOOP), or a link whose target vanished
            raise TrainDataError(f"{path}: a symlink that loops or leads nowhere; remove it from {self.root}") \
                from None
        if not real.is_relative_to(self.root):
            raise TrainDataError(f"{path}: a symlink to {real}, outside the data folder {self.root}; training "
                                 "reads only what is inside it (copy the file in)")
        return real

    def take(self, path: Path) -> None:
        """Take a folder or image once: a second path to the same one (a link) is an error naming both."""
        real = self.resolve(path)
        if real in self.taken:
            raise TrainDataError(f"{path}: the same {'folder' if real.is_dir() else 'image'} as "
                                 f"{self.taken[real]} (a symlink); it would be trained twice")
        self.taken[real] = path


def _folders(base: Path, seen: _Seen) -> list[tuple[Path, int, str]]:
    """(folder, repeats, class words): ``base`` itself, then its sub-folders in name order."""
    seen.take(base)
    out = [(base, 1, "")]
    for link in (p for p in base.iterdir() if p.is_symlink() and not p.exists()):
        seen.resolve(link)  # a loop or a dangling link: named, not skipped in silence
    for sub in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")):
        seen.take(sub)
        if lone_surrogate(sub.name) is not None:  # its words would be captions no tokenizer can encode
            raise TrainDataError(f"{sub}: the folder's name is not valid UTF-8; rename it")
        m = REPEAT_FOLDER.match(sub.name)
        if m and int(m.group(1)) > 0:
            out.append((sub, min(int(m.group(1)), 10_000), m.group(2).replace("_", " ").strip()))
        else:
            out.append((sub, 1, ""))
    return out


def _images(folder: Path, seen: _Seen) -> list[Path]:
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS and (p.is_symlink() or p.is_file()))
    for image in images:
        seen.take(image)
    return [p for p in images if p.is_file()]


def _caption(image: Path, words: str, trigger: str | None, data: Dataset, seen: _Seen) -> tuple[str | None, str]:
    found = [(ext, image.with_suffix(ext)) for ext in CAPTION_EXTS if os.path.lexists(image.with_suffix(ext))]
    if len(found) == 2:
        data.both_captions.append(image)
    text, source = "", ""
    for ext, path in found[:1]:
        seen.resolve(path)
        text, source = _read_caption(path), ext
    if not text and words:
        text, source = words, "folder"
    if trigger:
        if not text:
            return trigger, "trigger"
        if trigger.lower() not in text.lower():
            text = f"{trigger}, {text}"
    return (text, source) if text else (None, "")


def _read_caption(path: Path) -> str:
    """A caption's text, whitespace collapsed; a ``TrainDataError`` for anything that is not a caption."""
    try:
        text = read_limited(path, MAX_CAPTION_BYTES).decode("utf-8-sig")  # a BOM (Windows editors) is dropped
    except ValueError as e:  # not a regular file, too big, not UTF-8
        raise TrainDataError(f"{path}: unusable caption ({e}; a caption is UTF-8 text of at most "
                             f"{MAX_CAPTION_BYTES:,} bytes)") from None
    bad = CONTROL.search(text)
    if bad:
        raise TrainDataError(f"{path}: not a text caption (it holds control character U+{ord(bad.group()):04X} at "
                             f"character {bad.start() + 1}: a binary file?)")
    text = " ".join(text.split())
    if len(text) > MAX_CAPTION_CHARS:
        raise TrainDataError(f"{path}: the caption has {len(text):,} characters; at most {MAX_CAPTION_CHARS:,} (CLIP "
                             "reads the first 75 tokens of each chunk)")
    return text


def check_image(path: Path) -> str | None:
    """``None`` when PIL can decode the image within the size limit; else the reason."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > MAX_PIXELS or w < 8 or h < 8:
                return f"{w}×{h} pixels: outside 8 px … {MAX_PIXELS // 2**20} MP"
            im.load()
    except Exception as e:  # noqa: BLE001 — PIL raises many types for a broken file
        return type(e).__name__ + (f": {str(e)[:80]}" if str(e) else "")
    return None
