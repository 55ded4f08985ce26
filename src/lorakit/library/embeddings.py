"""Textual-inversion embeddings: files in embedding folders, used by name (file stem) in prompts, and the ones
bundled in LoRA files. An embedding holds one (n, width) matrix per text encoder (SDXL: CLIP-L then CLIP-G).

File layouts read: A1111 ``.pt`` (``string_to_param: {"*": (n, w)}``), A1111 safetensors (``emb_params``), SDXL
(``clip_l``, ``clip_g``), diffusers (``{"<token>": (w,)}``). Loading needs torch; importing this module does not.
Where A1111 records how an embedding was trained (``step``, ``sd_checkpoint``, ``sd_checkpoint_name``: keys of its
``.pt`` files, or safetensors metadata), the ``Embedding`` keeps it.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InvalidLora, LorakitError, UnreadableFile

SUFFIXES = (".pt", ".bin", ".safetensors")


@dataclass
class Embedding:
    name: str
    vectors: list[Any]  # per text encoder: torch.Tensor (n, width)
    path: str | None = None
    step: int | None = None  # A1111's training record, where the file has one
    sd_checkpoint: str | None = None  # the hash of the model it was trained on
    sd_checkpoint_name: str | None = None

    @property
    def tokens(self) -> int:
        return int(self.vectors[0].shape[0])


def name_pattern(name: str) -> re.Pattern[str]:
    """The name as a whole word (A1111 matches embedding names in the prompt's words)."""
    return re.compile(r"(?<![\w-])" + re.escape(name) + r"(?![\w-])", re.IGNORECASE)


def embedding_from_tensors(name: str, tensors: Mapping[str, Any], path: str | None = None) -> Embedding:
    if "clip_l" in tensors and "clip_g" in tensors:
        vectors = [tensors["clip_l"], tensors["clip_g"]]
    elif "emb_params" in tensors:
        vectors = [tensors["emb_params"]]
    elif len(tensors) == 1:
        vectors = [next(iter(tensors.values()))]
    else:
        raise InvalidLora(path, f"not a textual-inversion embedding (keys: {', '.join(list(tensors)[:5])})")
    if any(v.ndim == 0 or v.numel() == 0 for v in vectors):
        raise InvalidLora(path, "textual-inversion embedding without vectors (an empty or scalar tensor)")
    return Embedding(name, [v.float().reshape(-1, v.shape[-1]) for v in vectors], path)


def _with_record(embedding: Embedding, record: Mapping[str, Any]) -> Embedding:
    """``embedding`` with A1111's ``step`` / ``sd_checkpoint`` / ``sd_checkpoint_name`` from ``record`` (a .pt
    file's dict or safetensors metadata, where they are strings); a value of another type is ignored."""
    step = record.get("step")
    if isinstance(step, str) and step.strip().isdigit():
        step = int(step)
    embedding.step = step if isinstance(step, int) and not isinstance(step, bool) else None
    for key in ("sd_checkpoint", "sd_checkpoint_name"):
        value = record.get(key)
        setattr(embedding, key, value if isinstance(value, str) else None)
    return embedding


def load_embedding(path: str | Path) -> Embedding:
    from ..files.io import load_file, load_pickle

    p = Path(path)
    if p.suffix.lower() == ".safetensors":
        tensors, metadata = load_file(p)
        return _with_record(embedding_from_tensors(p.stem, tensors, str(p)), metadata)
    obj = load_pickle(p)
    record = obj if isinstance(obj, dict) else {}
    if isinstance(obj, dict) and isinstance(obj.get("string_to_param"), dict):
        obj = obj["string_to_param"]
    if not isinstance(obj, dict):
        raise InvalidLora(p, "not a textual-inversion embedding")
    tensors = {k: v for k, v in obj.items() if hasattr(v, "shape")}
    return _with_record(embedding_from_tensors(p.stem, tensors, str(p)), record)


def bundled_embeddings(bundle: Mapping[str, Any], source: str | None) -> dict[str, Embedding]:
    """A LoRA's bundled embeddings: ``name`` → (n, w), or SDXL pairs ``name.clip_l`` / ``name.clip_g``."""
    grouped: dict[str, dict[str, Any]] = {}
    for key, tensor in bundle.items():
        name, _, part = key.rpartition(".") if key.endswith((".clip_l", ".clip_g")) else (key, "", "emb_params")
        grouped.setdefault(name, {})[part] = tensor
    return {name: embedding_from_tensors(name, parts, source) for name, parts in grouped.items()}


class EmbeddingIndex:
    """Embedding files in folders, by file stem; loaded on first use and cached while unchanged."""

    def __init__(self, dirs: Iterable[str | Path]) -> None:
        self.paths: dict[str, Path] = {}
        for root in (Path(d) for d in dirs):
            if not root.is_dir():
                raise LorakitError(f"{root}: embeddings folder does not exist")
            for path in sorted(root.rglob("*")):
                if path.suffix.lower() in SUFFIXES and path.is_file():
                    self.paths.setdefault(path.stem, path)
        self._cache: dict[tuple[Path, int], Embedding] = {}

    def used_in(self, text: str) -> dict[str, Embedding]:
        """The embeddings whose names appear in ``text``."""
        return {name: self._load(path) for name, path in self.paths.items() if name_pattern(name).search(text)}

    def load_each(self) -> Iterator[tuple[str, Embedding | LorakitError]]:
        """Every embedding file by name: loaded (cached like ``used_in``'s), or the error that kept it from
        loading — one unreadable file does not stop the others."""
        for name, path in self.paths.items():
            try:
                yield name, self._load(path)
            except LorakitError as e:
                yield name, e
            except OSError as e:  # removed or unreadable since the folder was scanned
                yield name, UnreadableFile(path, f"cannot be read ({e.strerror or e})")

    def _load(self, path: Path) -> Embedding:
        key = (path, path.stat().st_mtime_ns)
        if key not in self._cache:
            self._cache[key] = load_embedding(path)
        return self._cache[key]
