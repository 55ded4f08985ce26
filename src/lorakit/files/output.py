"""Writing an output file or folder: the one place lorakit puts anything on disk in the user's name.

- ``check_target(path)``: an output may be a regular file (then replaced) or not exist yet. A device, FIFO, socket
  or folder — or a symlink to one — is refused with an ``OutputError`` and never replaced (renaming a finished
  temporary file onto ``/dev/null`` as root replaces the machine's ``/dev/null``; opening a FIFO to write blocks
  until someone reads it). A symlink to a regular file, or a dangling one, is itself replaced by the new file:
  what it pointed at is left alone. ``folder=True`` (a diffusers model folder): an existing folder is fine,
  anything else is refused.
- ``check_writable(path)``: ``check_target``, the folder made, and a probe file created and removed there — so a
  path under a file, under ``/proc`` or in a read-only folder fails before the work, not after it.
- ``atomic_path(path, verify)`` / ``atomic_file`` / ``write_atomic``: the content goes to a temporary name in the
  same folder (``.STEM.lorakit-PID-N.tmp.SUFFIX``; the suffix kept so PIL still knows the format), is fsynced,
  checked by ``verify(temporary path)``, the target checked again, and only then renamed onto ``path``: a reader
  sees the old file or the whole new one, and a failed write or check leaves the old file and no temporary one.
- ``atomic_dir(path)``: the same for a folder (built at a temporary name, swapped in when complete).

Every ``OSError`` of making the folder, writing the temporary file or renaming it is an ``OutputError`` naming
the path and the reason.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from ..errors import OutputError

_serial = itertools.count()


def kind_of(mode: int) -> str:
    """What a ``st_mode`` is, in words: ``"a folder"``, ``"a FIFO (named pipe)"``, ``"a regular file"``…"""
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"), (stat.S_ISREG, "a regular file"))
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def check_target(path: str | Path, *, folder: bool = False) -> None:
    """Refuse an output path that exists and is not a regular file (``folder``: not a folder), through symlinks."""
    p = Path(path)
    if p.name in ("", ".."):  # ".", "", "/", "a/..": a folder named by its place, never one to write or swap
        raise OutputError(f"{p}: names a folder by its place, not an output; give the output its own name")
    try:
        mode = os.stat(p).st_mode  # follows symlinks: a link to a device is a device here
    except FileNotFoundError:
        return  # nothing there yet (or a dangling symlink, which the rename replaces)
    except OSError as e:
        raise OutputError(f"{p}: cannot be used as an output ({e.strerror or e})") from None
    if (stat.S_ISDIR(mode) if folder else stat.S_ISREG(mode)):
        return
    via = " (through a symlink)" if p.is_symlink() else ""
    wanted = "a folder for the model" if folder else "a regular file (an existing one is replaced)"
    raise OutputError(f"{p}: is {kind_of(mode)}{via}; the output must be {wanted}, so it is left as it is")


def make_parent(path: str | Path) -> None:
    """Make the folder of ``path`` (and its parents); an ``OutputError`` when that cannot be done."""
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        reason = "a file is in the way" if isinstance(e, (FileExistsError, NotADirectoryError)) else e.strerror
        raise OutputError(f"{p}: cannot make its folder {p.parent} ({reason or e})") from None


def check_writable(path: str | Path, *, folder: bool = False) -> None:
    """``check_target``, the folder made, and a probe file created and removed in it."""
    p = Path(path)
    check_target(p, folder=folder)
    make_parent(p)
    probe = temp_name(p)
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        raise OutputError(f"{p}: cannot write in {p.parent} ({e.strerror or e})") from None
    os.close(fd)
    with contextlib.suppress(OSError):
        probe.unlink()


def temp_name(path: Path) -> Path:
    """A fresh temporary name beside ``path`` (same folder, so the rename is atomic; same suffix)."""
    return path.with_name(f".{path.stem}.lorakit-{os.getpid()}-{next(_serial)}.tmp{path.suffix}")


@contextlib.contextmanager
def atomic_path(path: str | Path, verify: Callable[[Path], object] | None = None) -> Iterator[Path]:
    """A temporary path for the caller to write; fsynced, verified and renamed onto ``path`` when the block
    succeeds (see the module's docstring); removed whatever happens."""
    p = Path(path)
    check_target(p)
    make_parent(p)
    tmp = temp_name(p)
    try:
        try:
            yield tmp
            _fsync(tmp)
        except OSError as e:
            raise _output_error(e, p, tmp) from None
        if verify is not None:
            verify(tmp)
        check_target(p)  # again, just before the rename: nothing may have become a device meanwhile
        _rename(tmp, p)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_file(path: str | Path, verify: Callable[[Path], object] | None = None) -> Iterator[BinaryIO]:
    """``atomic_path`` with the temporary file opened for writing (``w+b``: a writer may seek back)."""
    with atomic_path(path, verify) as tmp, tmp.open("w+b") as f:
        yield f


def write_atomic(path: str | Path, write: Callable[[Path], object],
                 verify: Callable[[Path], object] | None = None) -> None:
    """Run ``write(temporary path)`` and rename the result onto ``path`` (``atomic_path``)."""
    with atomic_path(path, verify) as tmp:
        write(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """A folder built at a temporary name, swapped in for ``path`` (a folder or nothing) when the block succeeds."""
    p = Path(path)
    check_target(p, folder=True)
    make_parent(p)
    tmp, old = temp_name(p), temp_name(p)
    try:
        tmp.mkdir()
        yield tmp
        check_target(p, folder=True)
        if os.path.lexists(p):
            _rename(p, old)
        _rename(tmp, p)
    except OSError as e:
        raise _output_error(e, p, tmp) from None
    finally:
        for leftover in (tmp, old):
            if leftover.is_symlink():
                leftover.unlink()
            else:
                shutil.rmtree(leftover, ignore_errors=True)


def _output_error(e: OSError, path: Path, tmp: Path) -> OSError | OutputError:
    """An ``OutputError`` for a failed write of the temporary file (or folder) ``tmp``; an input's own error (a
    file name outside ``tmp``) stays as it is."""
    if e.filename is not None and not str(e.filename).startswith(str(tmp)):
        return e
    return OutputError(f"{path}: cannot be written ({e.strerror or e})")


def _rename(src: Path, dst: Path) -> None:
    try:
        os.replace(src, dst)
    except OSError as e:
        raise OutputError(f"{dst}: cannot be written ({e.strerror or e})") from None
    with contextlib.suppress(OSError):  # the rename itself durable too (best effort: not every system allows it)
        fd = os.open(dst.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
