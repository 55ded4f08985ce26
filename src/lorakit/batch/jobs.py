"""Batch jobs: a JSONL file of A1111 txt2img requests → PNGs and ``results.jsonl`` in an output folder.

Each line is one JSON object with A1111's ``/sdapi/v1/txt2img`` field names (``prompt`` with its LoRA tags,
``negative_prompt``, ``seed``, ``steps``, ``cfg_scale``, ``sampler_name``, ``scheduler``, ``width``, ``height``,
``batch_size``, ``n_iter``, ``override_settings.CLIP_stop_at_last_layers``); fields lorakit does not use are
ignored with one warning. Every line is checked before the first image (a bad one is an error naming the file and
line): the file is a regular file of at most ``MAX_JOBS_BYTES`` and ``MAX_ITEMS`` requests, each line JSON nested
at most ``MAX_DEPTH`` levels, without what the HTTP API refuses (NaN, ±inf, huge integers, lone surrogates). A seed
of -1 is drawn when the file is read, so every runner gives the same images.

An item's key is its line number and a hash of its JSON (``000003-9f2c…``): images are ``KEY-NN.png`` and each
finished item appends one line to ``results.jsonl`` (key, line, images, seeds, infotexts, prompt, settings,
notes, seconds, worker; or ``error``). A re-run skips the items whose line is there without an error and whose
images exist (``results.py``); an edited line has a new key and runs again. Images are written under a temporary
name and renamed; a results line is appended in one write, and a torn last line (a crash mid-write) is dropped on
the next run.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..errors import BatchError, LorakitError
from ..files.inputs import loads_bounded, read_limited
from ..generate.pipeline import Generator, Request, Result
from ..prompt import parse_prompt
from ..server.guards import MAX_DEPTH
from .common import LoraSet, Progress, lora_set, save_png_atomic
from .results import RESULTS, ResultsWriter, finished

log = logging.getLogger("lorakit")
MAX_JOBS_BYTES = 64 * 2 ** 20  # ~60,000 requests of 1 KB
MAX_ITEMS = 100_000
CHUNK = 4  # with batching: items are run in runs of CHUNK × max images (results are written after each run)


@dataclass(frozen=True)
class Item:
    """One line of the jobs file: its requests (one per ``n_iter``) and their LoRA set."""

    line: int
    key: str
    requests: tuple[Request, ...]
    lora_set: LoraSet

    def as_row(self) -> dict[str, Any]:
        """A plain row (for Ray Data): the requests as JSON."""
        return {"key": self.key, "line": self.line, "requests": json.dumps([asdict(r) for r in self.requests])}


def requests_from_row(row: dict[str, Any]) -> list[Request]:
    return [Request(**fields) for fields in json.loads(str(row["requests"]))]


@dataclass
class Outcome:
    """What running one item gave: its results record and its images (H, W, 3) uint8, in order."""

    record: dict[str, Any]
    pixels: list[np.ndarray] = field(default_factory=list)


@dataclass
class Summary:
    total: int
    skipped: int  # finished in an earlier run
    done: int = 0
    failed: int = 0


def read_jobs(path: str | Path) -> list[Item]:
    """Every request of the jobs file, checked. Raises ``BatchError`` naming the file and line."""
    try:
        lines = read_limited(path, MAX_JOBS_BYTES).decode("utf-8").splitlines()
    except ValueError as e:  # UnicodeDecodeError is one
        raise BatchError(f"{path}: cannot read the jobs file ({e})") from None
    items, ignored = [], set()
    for number, text in enumerate(lines, 1):
        if text.strip():
            item, unused = _item(str(path), number, text)
            items.append(item)
            ignored |= unused
        if len(items) > MAX_ITEMS:
            raise BatchError(f"{path}: more than {MAX_ITEMS} requests; split the file")
    if not items:
        raise BatchError(f"{path}: no requests (one JSON object a line, with A1111 txt2img fields)")
    if ignored:
        log.warning(f"{path}: fields lorakit does not use are ignored: {', '.join(sorted(ignored))}")
    return items


def _item(path: str, number: int, text: str) -> tuple[Item, set[str]]:
    from pydantic import ValidationError

    from ..server.a1111 import Txt2Img, requests_of

    where = f"{path}:{number}"
    try:
        fields = loads_bounded(text, MAX_DEPTH)
    except json.JSONDecodeError as e:
        raise BatchError(f"{where}: not JSON ({e.msg} at column {e.colno})") from None
    except ValueError as e:
        raise BatchError(f"{where}: {e}") from None
    _check_values(text, where)
    if not isinstance(fields, dict):
        raise BatchError(f"{where}: expected a JSON object of A1111 txt2img fields, got {type(fields).__name__}")
    try:
        txt2img = Txt2Img.model_validate(fields)
    except ValidationError as e:
        first = e.errors()[0]
        name = ".".join(str(p) for p in first["loc"]) or "(the object)"
        got = repr(first.get("input"))
        raise BatchError(f"{where}: field {name!r}: {first['msg']} (got {got[:80] + '…' if len(got) > 80 else got})") \
            from None
    clip_skip = _clip_skip(txt2img.override_settings, where)
    for name, value in (("prompt", txt2img.prompt), ("negative_prompt", txt2img.negative_prompt)):
        try:
            parse_prompt(value, negative=name != "prompt")
        except LorakitError as e:
            raise BatchError(f"{where}: field {name!r}: {e}") from None
    key = lora_set(txt2img.prompt, txt2img.negative_prompt)
    requests = requests_of(txt2img, clip_skip, False)  # type: ignore[arg-type]  # None: the model's default
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]
    return Item(number, f"{number:06d}-{digest}", tuple(requests), key), set(fields) - set(Txt2Img.model_fields)


def _check_values(text: str, where: str) -> None:
    """What the HTTP API refuses in a body (``server.guards.check_json``), refused here too: NaN, ±inf, huge
    integers, lone surrogates."""
    from fastapi.exceptions import RequestValidationError

    from ..server.guards import check_json

    try:
        check_json(text.encode("utf-8", "surrogatepass"))
    except RequestValidationError as e:
        first = e.errors()[0]
        name = ".".join(str(p) for p in first["loc"] if p != "body") or "(the object)"
        raise BatchError(f"{where}: field {name!r}: {first['msg']}") from None


def _clip_skip(overrides: dict[str, Any], where: str) -> int | None:
    value = overrides.get("CLIP_stop_at_last_layers")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BatchError(f"{where}: override_settings.CLIP_stop_at_last_layers must be a whole number ≥ 1, "
                         f"got {value!r}")
    return value


def check_loras(items: list[Item], library: Any, path: str | Path) -> None:
    """Every LoRA the items name must resolve in ``library`` (raises ``BatchError`` naming the first line)."""
    seen: set[str] = set()
    for item in items:
        req = item.requests[0]
        for ref in parse_prompt(req.prompt).loras + parse_prompt(req.negative, negative=True).loras:
            if ref.name not in seen:
                try:
                    library.resolve(ref.name)
                except LorakitError as e:
                    raise BatchError(f"{path}:{item.line}: {e}") from None
                seen.add(ref.name)


def run_item(gen: Generator, key: str, line: int, requests: Iterable[Request], worker: str) -> Outcome:
    """Generate one item; a ``LorakitError`` becomes the record's ``error`` (the batch goes on)."""
    start = time.perf_counter()
    results: list[Result | LorakitError] = []
    try:
        for req in requests:
            results.append(gen(req))
    except LorakitError as e:
        results.append(e)
    return item_outcome(key, line, results, time.perf_counter() - start, worker)


class ItemLike(Protocol):
    """What running an item needs of it (an ``Item``, or a row rebuilt on a Ray worker)."""

    @property
    def key(self) -> str: ...

    @property
    def line(self) -> int: ...

    @property
    def requests(self) -> Sequence[Request]: ...


def run_items(gen: Generator, items: Sequence[ItemLike], worker: str, max_images: int) -> list[Outcome]:
    """Generate several items with ``Generator.run_batch``: their compatible requests share UNet batches of up
    to ``max_images`` images, each with its own LoRAs. Each item's ``seconds`` is its share of the whole run."""
    start = time.perf_counter()
    results = gen.run_batch([r for item in items for r in item.requests], max_images)
    share = (time.perf_counter() - start) / len(items)
    bounds = list(itertools.accumulate(len(item.requests) for item in items))
    return [item_outcome(item.key, item.line, results[end - len(item.requests):end], share, worker)
            for item, end in zip(items, bounds)]


def item_outcome(key: str, line: int, results: list[Result | LorakitError], seconds: float, worker: str) -> Outcome:
    """An item's record and pixels from its requests' results; its first error (if any) is the record."""
    error = next((r for r in results if isinstance(r, LorakitError)), None)
    if error is not None:
        return Outcome({"key": key, "line": line, "error": str(error), "worker": worker})
    record: dict[str, Any] = {"key": key, "line": line, "seeds": [], "infotexts": [], "notes": []}
    pixels = []
    for result in (r for r in results if isinstance(r, Result)):
        pixels += [np.asarray(image.convert("RGB")) for image in result.images]
        record["seeds"] += result.seeds
        record["infotexts"] += result.infotexts
        record["notes"] += result.notes
        record.update(prompt=result.prompt, settings=result.settings)
    record.update(seconds=round(seconds, 4), worker=worker)
    return Outcome(record, pixels)


def write_outcome(writer: ResultsWriter, outdir: Path, outcome: Outcome) -> None:
    """An outcome's images (atomically), then its record (one appended line)."""
    from PIL import Image

    record = dict(outcome.record)
    names = []
    for i, (px, text) in enumerate(zip(outcome.pixels, record.get("infotexts", []))):
        name = f"{record['key']}-{i:02d}.png"
        save_png_atomic(Image.fromarray(px), outdir / name, text)
        names.append(name)
    if "error" not in record:
        record["images"] = names
    writer.append(record)


Runner = Callable[[list[Item]], Iterator[Outcome]]


def run_batch(items: list[Item], outdir: Path, runner: Runner, progress: Progress | None = None) -> Summary:
    """Run the items not finished yet with ``runner`` (local or Ray), writing each outcome as it comes."""
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BatchError(f"{outdir}: cannot create the output folder ({e.strerror})") from None
    done = finished(outdir)
    pending = [item for item in items if item.key not in done]
    summary = Summary(len(items), len(items) - len(pending))
    if progress is not None:
        progress.total, progress.done = len(items), summary.skipped
    writer = ResultsWriter(outdir)
    written: set[str] = set()
    try:
        for outcome in runner(pending) if pending else iter(()):
            key = str(outcome.record.get("key"))
            if key in written:  # a retried Ray task delivered it again: the first outcome stands, no second image
                log.info(f"line {outcome.record.get('line')}: a repeated outcome (a retried task) ignored")
                continue
            written.add(key)
            write_outcome(writer, outdir, outcome)
            failed = "error" in outcome.record
            summary.failed += failed
            summary.done += not failed
            if failed:
                log.warning(f"line {outcome.record['line']}: {outcome.record['error']}")
            if progress is not None:
                progress.advance()
    finally:
        writer.close()
        if progress is not None:
            progress.close()
    return summary


def local_runner(make: Callable[[], Generator], progress: Progress | None = None, max_images: int = 1) -> Runner:
    """Items in file order on one generator in this process, made (``make()``: the model loads) only when there
    is something to run, and closed (weights restored) at the end. ``max_images`` > 1: items are taken in runs
    of up to ``CHUNK × max_images`` images and their compatible requests share UNet batches (``run_items``)."""
    def run(items: list[Item]) -> Iterator[Outcome]:
        gen = make()
        if progress is not None:
            gen.on_step = lambda step, steps: progress.part(step / steps)
        try:
            if max_images == 1:
                for item in items:
                    yield run_item(gen, item.key, item.line, item.requests, "local")
                return
            for chunk in chunks(items, CHUNK * max_images):
                yield from run_items(gen, chunk, "local", max_images)
        finally:
            gen.on_step = None
            gen.close()
    return run


def chunks(items: list[Item], images: int) -> Iterator[list[Item]]:
    """Consecutive runs of items with at most ``images`` images (an item with more is a run of its own). A local
    run and a Ray run cut the same runs, so their UNet batches — and images — are the same."""
    run: list[Item] = []
    count = 0
    for item in items:
        n = sum(r.batch for r in item.requests)
        if run and count + n > images:
            yield run
            run, count = [], 0
        run.append(item)
        count += n
    if run:
        yield run
