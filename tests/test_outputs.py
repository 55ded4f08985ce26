"""Outputs (issue 21): a path that is not a regular file — a device, FIFO, socket or folder, or a symlink to one —
is refused and left exactly as it was; a path that cannot be written (under a file, under /proc) is one
``OutputError``; what the tools write is checked (finite, at least one layer, loads back) before it is renamed
into place, and nothing is left behind when a check fails."""
from __future__ import annotations

import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import lorakit
from lorakit.cli import main
from lorakit.errors import OutputError, ToolError
from lorakit.files.io import save_file
from lorakit.files.output import atomic_dir, atomic_path, check_target, check_writable, write_atomic
from lorakit.tools.output import Entry, write_safetensors

from .factories import make_kohya_lora, tiny_components


@pytest.fixture(scope="module")
def lora(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("lora") / "tiny.safetensors"
    save_file(make_kohya_lora(tiny_components("sd1"), "lora", rank=2), path)
    return path


def _special(folder: Path, suffix: str = "") -> Iterator[tuple[str, Path]]:
    """Every kind of non-regular target lorakit can make here (a device only as root: a copy of /dev/null's
    numbers, so the machine's own is never at stake), plus a symlink to one."""
    fifo = folder / f"fifo{suffix}"
    os.mkfifo(fifo)
    yield "fifo", fifo
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(folder / f"sock{suffix}"))
    yield "socket", folder / f"sock{suffix}"
    (folder / f"dir{suffix}").mkdir()
    yield "folder", folder / f"dir{suffix}"
    if os.geteuid() == 0:
        os.mknod(folder / f"null{suffix}", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        yield "device", folder / f"null{suffix}"
    (folder / f"link{suffix}").symlink_to(fifo)
    yield "symlink to a fifo", folder / f"link{suffix}"
    sock.close()


def _identity(path: Path) -> tuple[int, int, int]:
    st = os.lstat(path)
    return st.st_ino, st.st_mode, st.st_rdev


def test_non_regular_targets_are_refused_and_left_alone(tmp_path: Path) -> None:
    for kind, target in _special(tmp_path):
        before = _identity(target)
        with pytest.raises(OutputError, match="the output must be|is a"):
            write_atomic(target, lambda tmp: tmp.write_bytes(b"x"))
        assert _identity(target) == before, kind
        with pytest.raises(OutputError):
            check_writable(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["fifo", "sock", "dir", "link"] + (["null"] if os.geteuid() == 0 else []))  # no temporary files


def test_symlink_to_a_file_is_replaced_not_written_through(tmp_path: Path) -> None:
    real = tmp_path / "real.txt"
    real.write_text("keep")
    link = tmp_path / "link.txt"
    link.symlink_to(real)
    write_atomic(link, lambda tmp: tmp.write_text("new"))
    assert real.read_text() == "keep" and not link.is_symlink() and link.read_text() == "new"


@pytest.mark.parametrize("where", ["under_a_file", "proc"])
def test_unwritable_places_are_one_output_error(tmp_path: Path, where: str) -> None:
    (tmp_path / "file").write_text("x")
    target = tmp_path / "file" / "out.png" if where == "under_a_file" else Path("/proc/lorakit-test.png")
    with pytest.raises(OutputError, match=str(target)):
        check_writable(target)
    with pytest.raises(OutputError, match=str(target)):
        write_atomic(target, lambda tmp: tmp.write_bytes(b"x"))


def test_a_failed_verification_leaves_the_old_file_and_nothing_else(tmp_path: Path) -> None:
    out = tmp_path / "x.safetensors"
    out.write_bytes(b"old")

    def refuse(tmp: Path) -> None:
        raise ToolError("no")

    with pytest.raises(ToolError):
        write_safetensors(out, [Entry("a", torch.float32, (2,), lambda: torch.zeros(2))], verify=refuse)
    assert out.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]
    with pytest.raises(ToolError, match="NaN or infinite"):
        write_safetensors(out, [Entry("a", torch.float32, (1,), lambda: torch.tensor([float("inf")]))], finite=True)
    assert out.read_bytes() == b"old"


def test_atomic_dir_refuses_a_file_and_swaps_a_folder(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputError, match="is a regular file"):
        with atomic_dir(tmp_path / "f"):
            pass
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "old").write_text("1")
    with atomic_dir(tmp_path / "d") as tmp:
        (tmp / "new").write_text("2")
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "f"]


@pytest.mark.parametrize("name", ["", ".", "..", "/", "sub/.."])
def test_a_folder_named_by_its_place_is_no_output(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``bake -o ""`` (a folder output) was a ValueError from the temporary name: ``.`` has no name to put beside."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    for folder in (False, True):
        with pytest.raises(OutputError, match="names a folder by its place"):
            check_writable(name, folder=folder)
        with pytest.raises(OutputError, match="names a folder by its place"):
            with atomic_dir(name) if folder else atomic_path(name):
                pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"]


@pytest.mark.parametrize("argv", [
    ["convert", "{lora}", "--to", "kohya", "-o", "{target}"],
    ["merge", "{lora}", "-o", "{target}"],
    ["resize", "{lora}", "--rank", "1", "-o", "{target}"],
    ["generate", "a", "--steps", "1", "-o", "{target}"],
    ["grid", "a", "--x", "seed=1,2", "--steps", "1", "-o", "{target}"],
    ["train", "{tmp}", "-o", "{target}", "--steps", "1"],
    ["serve", "--options-file", "{target}", "--port", "0"],
])
def test_every_command_refuses_a_fifo_or_device_output(argv: list[str], lora: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    targets = [t for _, t in _special(tmp_path, ".safetensors")]
    for target in targets:
        before = {p: _identity(p) for p in tmp_path.iterdir()}
        args = [a.format(lora=lora, target=target, tmp=tmp_path) for a in argv]
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("lorakit: error:") and "must be" in err[0], err
        assert {p: _identity(p) for p in tmp_path.iterdir()} == before


def test_batch_results_file_that_is_a_folder_or_fifo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"prompt": "a", "steps": 1}\n')
    for kind in ("folder", "fifo"):
        out = tmp_path / kind
        out.mkdir()
        (out / "results.jsonl").mkdir() if kind == "folder" else os.mkfifo(out / "results.jsonl")
        assert main(["batch", str(jobs), "-o", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "results.jsonl: is a" in err, err


def test_tool_outputs_load_back_or_are_not_written(lora: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.safetensors"
    assert main(["merge", f"{lora}:1", f"{lora}:0.5", "-o", str(out)]) == 0
    assert lorakit.load_lora(out).layers
    assert main(["merge", f"{lora}:1e308", f"{lora}:1e308", "-o", str(tmp_path / "inf.safetensors")]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_check_target_allows_regular_files_and_missing_paths(tmp_path: Path) -> None:
    check_target(tmp_path / "missing")
    (tmp_path / "f").write_text("x")
    check_target(tmp_path / "f")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    check_target(tmp_path / "dangling")


def test_a_closed_pipe_ends_the_command_quietly() -> None:
    """`lorakit inspect … | head`: the reader leaves before lorakit writes — no BrokenPipeError traceback."""
    import subprocess
    import sys

    loras = sorted(str(p) for p in (Path(__file__).parent.parent / "examples" / "loras").glob("*.safetensors"))
    proc = subprocess.Popen([sys.executable, "-m", "lorakit.cli", "inspect", *loras], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone before anything is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and "Traceback" not in err, err
