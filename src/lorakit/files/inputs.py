"""Reading the small files a user names as input (a jobs file, an options file, a caption, a prompts file, an
image, a sidecar), and JSON from them, in bounded memory and time.

- ``read_limited(path, limit)``: only a regular file — a FIFO is opened without waiting for a writer and refused
  (reading one blocks until someone writes), as are devices (``/dev/zero`` never ends), sockets and folders — of at
  most ``limit`` bytes (a bigger one is refused, not read).
- ``loads_bounded(text, max_depth)``: ``json.loads`` after a nesting check that is linear in time and needs a few
  bytes per byte of text, whatever the text holds (the decoder recurses once per level: deep nesting is a
  ``RecursionError``, not a ``ValueError``).
- ``read_json(path)``: both, for the small JSON files of models and LoRA folders.
- ``inside(path, root)``: whether a path, its symlinks resolved, stays within a folder — for folders lorakit
  scans, whose files may not lead it elsewhere.

Problems are ``ValueError``s whose message says what is wrong without the path; each caller wraps it in its own
``LorakitError`` naming the file (a ``BatchError``, a ``TrainDataError``, …).
"""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from .output import kind_of

_NOT_SKELETON = bytes(b for b in range(256) if b not in b'[]{}"')  # translate() deletes these
_CHUNK = 1 << 16  # strings are cut out of the skeleton this many bytes at a time (bounds the pieces' list)
MAX_JSON_BYTES = 16 << 20  # config.json, model_index.json, .civitai.info: a few KB
MAX_JSON_DEPTH = 64  # as the HTTP API's bodies (server.guards.MAX_DEPTH)


def read_limited(path: str | Path, limit: int) -> bytes:
    """The bytes of the regular file ``path`` (at most ``limit``); a ``ValueError`` saying why not."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO opens at once instead of waiting for a writer
    except FileNotFoundError:
        raise ValueError("no such file") from None
    except OSError as e:
        raise ValueError(e.strerror or str(e)) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"is {kind_of(st.st_mode)}, not a regular file")
        if st.st_size > limit:
            raise ValueError(f"is {_size(st.st_size)}; at most {_size(limit)} are read")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise ValueError(e.strerror or str(e)) from None
    finally:
        os.close(fd)
    if len(data) > limit:  # it grew while being read
        raise ValueError(f"is more than {_size(limit)}; at most that is read")
    return data


def _size(n: int) -> str:
    return f"{n / 2 ** 20:.3g} MiB" if n >= 2 ** 20 else f"{n:,} bytes"


def loads_bounded(text: str | bytes, max_depth: int) -> Any:
    """``json.loads(text)``, refusing nesting deeper than ``max_depth`` before decoding. Raises ``ValueError``
    for invalid or too deeply nested JSON (malformed JSON: the decoder's own ``JSONDecodeError``, with the
    position) and for numbers too long to convert."""
    if nesting_within(text, max_depth):
        return json.loads(text)  # ValueError (JSONDecodeError is one) for anything else
    try:  # unbalanced or too deep: the decoder says where it is malformed (its recursion is guarded in C)
        json.loads(text)
    except RecursionError:
        pass
    raise ValueError(f"nested deeper than {max_depth} levels")


def nesting_within(text: str | bytes, max_depth: int) -> bool:
    """Whether the brackets outside strings of ``text`` are balanced and nest at most about ``max_depth`` deep
    (alternating ``[{[{`` may empty two levels in one pass). Linear, in a few copies of the text: escaped
    backslashes and then escaped quotes are deleted (neither can end a string), every byte but brackets and
    quotes is deleted, the strings are cut out in chunks (quotes now alternate: open, close), and each of
    ``max_depth`` passes deletes the innermost empty ``[]`` and ``{}`` pairs."""
    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else bytes(text)
    data = data.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, _NOT_SKELETON)
    skeleton, in_string = bytearray(), False
    for at in range(0, len(data), _CHUNK):
        parts = data[at:at + _CHUNK].split(b'"')
        skeleton += b"".join(parts[1 if in_string else 0::2])
        in_string ^= len(parts) % 2 == 0  # an odd number of quotes in the chunk
    if in_string:
        return False  # an unterminated string
    rest = bytes(skeleton)
    for _ in range(max_depth):
        if not rest:
            return True
        shorter = rest.replace(b"[]", b"").replace(b"{}", b"")
        if len(shorter) == len(rest):
            return False
        rest = shorter
    return not rest


def read_json(path: str | Path, limit: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """A small JSON file (a model's ``config.json``, a sidecar): ``read_limited`` then ``loads_bounded``, every
    problem a ``ValueError`` (not UTF-8 included)."""
    return loads_bounded(read_limited(path, limit).decode("utf-8"), max_depth)


def inside(path: str | Path, root: str | Path) -> bool:
    """Whether ``path`` with every symlink resolved lies within ``root`` (also resolved)."""
    try:
        return Path(path).resolve(strict=True).is_relative_to(Path(root).resolve(strict=True))
    except (OSError, RuntimeError):  # missing, or a symlink loop
        return False
