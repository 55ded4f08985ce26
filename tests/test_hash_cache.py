"""One hash cache: the library's hashes, ``inspect``'s, the base model's hash and fast-LoRA (LCM) detection all go
through ``files.hashes.HashCache`` (a table of the library's SQLite index), so a file is hashed once per version."""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from lorakit.files import hashes as hashes_mod
from lorakit.files.hashes import cache_db_path, cached_sha256
from lorakit.library import Library

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "loras"


@pytest.fixture
def digest_calls(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[str]:
    """Every hashing pass over a file; a fresh default cache (its own $XDG_CACHE_HOME)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    calls: list[str] = []
    real = hashes_mod.digests

    def spy(path: str | Path, addnet: bool = True) -> tuple[str, str | None]:
        calls.append(Path(path).name)
        return real(path, addnet)

    monkeypatch.setattr(hashes_mod, "digests", spy)
    return calls


def test_every_caller_shares_one_cache(tmp_path: Path, digest_calls: list[str], monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    from lorakit import load_lora
    from lorakit.cli import main
    from lorakit.generate import fast_loras
    from lorakit.models import loading, single_file

    root = tmp_path / "loras"
    root.mkdir()
    path = root / "lcm_like.safetensors"
    shutil.copy(EXAMPLES / "ink_sketch_sd15.safetensors", path)
    truth = hashlib.sha256(path.read_bytes()).hexdigest()

    lib = Library([root])  # the default index: the same SQLite file as the default hash cache
    assert lib.hashes(lib.entries[0])["sha256"] == truth and digest_calls == [path.name]
    assert cached_sha256(path) == truth
    # fast-LoRA detection by hash (any size, and this file's hash known as an LCM-LoRA)
    monkeypatch.setattr(fast_loras, "SIZE_WINDOW", (0, 10 ** 12))
    monkeypatch.setitem(fast_loras.KNOWN_HASHES, truth, ("lcm", None))
    assert fast_loras._from_hash(load_lora(path)) == "lcm"
    # the base model's hash (a single-file checkpoint: the pipeline building is not what is tested here)
    fakes: dict[str, Any] = {"checkpoint_tensors": lambda p: {}, "checkpoint_arch": lambda sd, p: "sd1",
                             "build_pipeline": lambda *a, **k: object(), "default_configs": lambda arch: {}}
    for name, fake in fakes.items():
        monkeypatch.setattr(single_file, name, fake)
    assert loading.load_single_file(path).hash == truth[:10]
    assert main(["inspect", "--json", str(path)]) == 0 and truth in capsys.readouterr().out
    assert digest_calls == [path.name]  # hashed once, for all five
    assert not (cache_db_path().parent / "sha256.json").exists()  # the old JSON cache is gone


def test_a_changed_file_is_hashed_again_and_links_share_a_row(tmp_path: Path, digest_calls: list[str]) -> None:
    path = tmp_path / "model.safetensors"
    shutil.copy(EXAMPLES / "demo_style.safetensors", path)
    link = tmp_path / "link.safetensors"
    link.symlink_to(path)
    first = cached_sha256(path)
    assert cached_sha256(link) == first and len(digest_calls) == 1
    with path.open("ab") as f:
        f.write(b"\0")
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    assert cached_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest() != first
    assert len(digest_calls) == 2


def test_a_model_hash_does_not_compute_the_lora_hash_until_asked(tmp_path: Path, digest_calls: list[str]) -> None:
    """A checkpoint's hash needs the whole-file SHA-256 only; the LoRA hashes of the same file fill in later."""
    path = tmp_path / "x.safetensors"
    shutil.copy(EXAMPLES / "demo_style.safetensors", path)
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    assert cached_sha256(path) == hashlib.sha256(data).hexdigest()
    h = hashes_mod.cached_hashes(path)
    assert h.addnet == hashlib.sha256(data[8 + n:]).hexdigest() and len(digest_calls) == 2
    assert hashes_mod.cached_hashes(path) == h and len(digest_calls) == 2


def test_an_unwritable_cache_costs_only_time(tmp_path: Path, digest_calls: list[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from lorakit.errors import UnreadableFile

    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # the cache folder cannot be made
    path = tmp_path / "x.safetensors"
    shutil.copy(EXAMPLES / "demo_style.safetensors", path)
    assert cached_sha256(path) == cached_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert len(digest_calls) == 1  # kept in memory for the process
    with pytest.raises(UnreadableFile, match="gone.safetensors: cannot read it to hash it"):
        cached_sha256(tmp_path / "gone.safetensors")
