"""The CLI fuzz harness: every ``lorakit`` command run with mutated arguments and inputs, each outcome classified.

A case starts from a cheap valid command line (tiny models, the demo model at 64 px and 1 step) and mutates 0–3
of its slots — a number to NaN/inf/huge/negative/zero, a path to a missing one, a folder, a FIFO, a socket, a
device, a symlink loop, one leading outside, a path under a file or under /proc, an input file to a truncated,
empty, binary, sparse 3 GiB, deeply nested or mutated one (``cli_fuzz_inputs``). Cases run in this process
(``lorakit.cli.main``, output captured, a per-case deadline) or as real subprocesses (``python -m lorakit.cli``).

Outcomes: ``ok`` (exit 0; an output it names is checked: a LoRA loads with ``load_lora``, a PNG decodes, a model
opens, a batch's images exist) and ``refused`` (exit 2 and lorakit's own error, one line — a prompt syntax
error's excerpt and caret excepted) are fine; the findings are ``traceback``, ``hang`` (past the deadline),
``replaced`` (a FIFO, socket, device, folder or symlink loop changed, or the file a symlink points at),
``unloadable`` (exit 0 with an output that does not load), ``multiline`` (an error of several lines),
``memory`` (the process's peak resident memory grew by more than ``MEMORY_LIMIT``) and ``exit`` (another code).

Extension point: ``COMMANDS`` (each command's slots: flag, value kind, valid values) and ``POOLS`` (the bad values
of each kind) are plain tables — a new command, flag or input kind (FLUX and quantized models, Ray Serve) is a
row here and its files in ``cli_fuzz_inputs.Workspace``; FLUX.1 and quantized (GGUF) models and LoRAs are the
``NAME@flux`` rows, with their files from ``cli_fuzz_flux``; SD3, Chroma, Qwen-Image, quantized files and
``serve --ray`` are the rows of ``cli_fuzz_dit_rows`` (files from ``cli_fuzz_dits``).
"""
from __future__ import annotations

import contextlib
import io
import os
import random
import re
import signal
import subprocess
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .cli_fuzz_dit_rows import DIT_ROWS, POOLS_ALL
from .cli_fuzz_inputs import Workspace
from .cli_fuzz_table import COMMANDS as FIRST_ROWS
from .cli_fuzz_table import Slot, command_of

COMMANDS = FIRST_ROWS | DIT_ROWS
POOLS = POOLS_ALL

BAD = ("traceback", "hang", "replaced", "unloadable", "multiline", "memory", "exit")
MEMORY_LIMIT = 2 << 30
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Case:
    command: str
    argv: list[str]
    mutated: list[str]  # the slots given bad values ("" for a valid case)
    output: Path | None = None  # the output path the command was given, when it has one


@dataclass
class Outcome:
    case: Case
    outcome: str
    seconds: float
    detail: str = ""


@dataclass
class Report:
    outcomes: list[Outcome] = field(default_factory=list)

    def table(self) -> dict[str, Counter[str]]:
        out: dict[str, Counter[str]] = {}
        for o in self.outcomes:
            out.setdefault(o.case.command, Counter())[o.outcome] += 1
        return out

    def findings(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.outcome in BAD]

    def text(self) -> str:
        kinds = ["ok", "refused", *BAD]
        rows = [f"| command | cases | {' | '.join(kinds)} | seconds |", "|---" * (len(kinds) + 3) + "|"]
        table = self.table()
        for name in (n for n in COMMANDS if n in table):  # the rows this run had
            c = table[name]
            secs = sum(o.seconds for o in self.outcomes if o.case.command == name)
            rows.append(f"| {name} | {sum(c.values())} | {' | '.join(str(c[k]) for k in kinds)} | {secs:.0f} |")
        total = Counter(o.outcome for o in self.outcomes)
        rows.append(f"| **all** | {len(self.outcomes)} | {' | '.join(str(total[k]) for k in kinds)} | "
                    f"{sum(o.seconds for o in self.outcomes):.0f} |")
        return "\n".join(rows)


# -- making cases -----------------------------------------------------------------------------------------------
def make_case(rng: random.Random, ws: Workspace, command: str) -> Case:
    """A command line for ``command``: its valid slots, 0–3 of them given a bad value (one case in ten valid)."""
    slots = COMMANDS[command]
    n = rng.choice([0, 1, 1, 1, 1, 2, 2, 3])
    mutated = set(rng.sample(range(len(slots)), min(n, len(slots))))
    positionals: list[str] = []
    options: list[str] = []
    output: Path | None = None
    for i, slot in enumerate(slots):
        if i not in mutated and rng.random() >= slot.present:
            continue
        value = POOLS[slot.kind](rng, ws) if i in mutated else ws.value(rng.choice(slot.valid)) if slot.valid \
            else ""
        if slot.flag is None:
            positionals += [value] + ([ws.value(rng.choice(slot.valid))] if slot.many and rng.random() < 0.3 else [])
        elif slot.kind == "flag":
            options.append(slot.flag)
        else:
            options += [slot.flag, value]
        if slot.output and i not in mutated:
            output = Path(value)
    argv = [command_of(command), *positionals, *options]
    if rng.random() < 0.03:  # the shape of the line itself: a missing argument, an unknown flag
        argv = argv[:-1] if rng.random() < 0.5 else argv + ["--no-such-flag"]
    return Case(command, argv, [slots[i].flag or f"#{i}" for i in sorted(mutated)], output)


def cases(seed: int, counts: dict[str, int], ws: Workspace) -> Iterator[Case]:
    """``counts[command]`` cases of each command, interleaved, all drawn from ``seed``."""
    rng = random.Random(seed)
    plan = [name for name, n in counts.items() for _ in range(n)]
    rng.shuffle(plan)
    for name in plan:
        yield make_case(rng, ws, name)


# -- running them -----------------------------------------------------------------------------------------------
class Deadline(BaseException):
    """Raised in the case's own code when its time is up (a ``BaseException``: ``except Exception`` lets it by)."""


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    def expire(signum: int, frame: object) -> None:
        raise Deadline

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_in_process(case: Case, timeout: float) -> tuple[str, int | None, str]:
    """(``"ran"``/``"hang"``/``"traceback"``, exit code, stderr or the traceback)."""
    from lorakit.cli import main

    err = io.StringIO()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err), deadline(timeout):
            try:
                return "ran", main(case.argv), err.getvalue()
            except SystemExit as e:  # argparse: exit 2 with usage, or 0 for --help
                return "ran", e.code if isinstance(e.code, int) else 2, err.getvalue()
    except Deadline:
        return "hang", None, f"still running after {timeout:g} s"
    except KeyboardInterrupt:
        raise
    except BaseException:  # noqa: BLE001 — anything else escaping main is the finding
        return "traceback", None, traceback.format_exc()[-3000:]


def run_subprocess(case: Case, timeout: float, cwd: Path) -> tuple[str, int | None, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "lorakit.cli", *case.argv], cwd=cwd, env=env, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return "hang", None, f"still running after {timeout:g} s"
    return ("traceback" if "Traceback (most recent call last)" in err else "ran"), proc.returncode, err[-3000:]


def classify(case: Case, ran: str, code: int | None, err: str, ws: Workspace) -> tuple[str, str]:
    if ran != "ran":
        return ran, err
    if code == 2:
        return ("multiline", err) if _multiline(err) else ("refused", _error_line(err))
    if code != 0:
        return "exit", f"exit {code}: {err[-500:]}"
    problem = check_output(case, ws)
    return ("unloadable", problem) if problem else ("ok", "")


def run_case(case: Case, ws: Workspace, timeout: float, subprocess_mode: bool = False) -> Outcome:
    before = ws.identities()
    peak = _peak_rss()
    start = time.monotonic()
    ran, code, err = run_subprocess(case, timeout, ws.root) if subprocess_mode else run_in_process(case, timeout)
    seconds = time.monotonic() - start
    outcome, detail = classify(case, ran, code, err, ws)
    changed = [str(p) for p, ident in before.items() if not os.path.lexists(p) or _ident(ws, p) != ident]
    if changed:
        outcome, detail = "replaced", f"{', '.join(changed)} changed ({outcome}: {detail[:300]})"
        ws.repair()
    elif not subprocess_mode and _peak_rss() - peak > MEMORY_LIMIT:
        outcome, detail = "memory", f"peak resident memory grew by {(_peak_rss() - peak) / 2 ** 30:.1f} GiB"
    return Outcome(case, outcome, seconds, detail)


def run(ws: Workspace, counts: dict[str, int], seed: int = 0, timeout: float = 120.0, subprocess_every: int = 0,
        progress: Callable[[Outcome], None] | None = None) -> Report:
    """Run ``counts`` cases (every ``subprocess_every``-th one as a subprocess; 0: none) in ``ws``. ``serve``
    always runs in this process, its server started and stopped at once (``serve_once``)."""
    report = Report()
    cwd = os.getcwd()
    os.chdir(ws.root)  # a ./lorakit.toml of the caller's must not steer the cases
    try:
        with serve_once(), ray_once():
            for i, case in enumerate(cases(seed, counts, ws)):
                sub = bool(subprocess_every) and i % subprocess_every == 0 and case.argv[0] != "serve" and \
                    _argv_passable(case.argv)
                outcome = run_case(case, ws, timeout, sub)
                report.outcomes.append(outcome)
                if progress is not None:
                    progress(outcome)
    finally:
        os.chdir(cwd)
    return report


@contextlib.contextmanager
def serve_once() -> Iterator[None]:
    """``lorakit serve`` in this process: instead of serving until Ctrl+C, the app starts (its lifespan: the
    library listing, the worker), answers one request, and stops (the worker closed, the weights restored)."""
    import uvicorn
    from starlette.testclient import TestClient

    def once(self: uvicorn.Server, sockets: object = None) -> None:
        with TestClient(self.config.app) as client:
            client.get("/sdapi/v1/options")

    original = uvicorn.Server.run
    uvicorn.Server.run = once  # type: ignore[method-assign]
    try:
        yield
    finally:
        uvicorn.Server.run = original  # type: ignore[method-assign]


@contextlib.contextmanager
def ray_once() -> Iterator[None]:
    """``lorakit serve --ray`` without a Ray cluster: where it would start Ray and deploy, the address is checked
    as Ray would be reached and the Serve application is built from the config (Ray's own checks of the
    deployments' options run there); then the command returns 0. A flag lorakit let by that Ray refuses is a
    traceback here, as it would be after Ray started."""
    from lorakit.serve_ray import run as ray_run

    def once(cfg: object, host: str, port: int, address: str | None, gpus_flag: float | None) -> int:
        from lorakit.serve_ray.deployments import build

        if address:
            ray_run.check_reachable(address)
        ray_run.import_serve()
        _as_serve_sends_it(build(cfg))  # type: ignore[arg-type]
        return 0

    original = ray_run.serve_forever
    ray_run.serve_forever = once  # type: ignore[assignment]
    try:
        yield
    finally:
        ray_run.serve_forever = original  # type: ignore[assignment]


def _as_serve_sends_it(app: object) -> None:
    """Each deployment of a Serve application serialised as ``serve.run`` sends it to the controller (where an
    option out of Serve's range — an int32 field — fails)."""
    todo, seen = [getattr(app, "_bound_deployment")], set()
    while todo:
        node = todo.pop()
        deployment = getattr(node, "_bound_deployment", node)
        if id(deployment) in seen or not hasattr(deployment, "_deployment_config"):
            continue
        seen.add(id(deployment))
        deployment._deployment_config.to_proto_bytes()
        todo += [a for a in getattr(deployment, "init_args", ()) if hasattr(a, "_bound_deployment")]


# -- checks -----------------------------------------------------------------------------------------------------
def check_output(case: Case, ws: Workspace) -> str:
    """What is wrong with the output of an exit-0 case ("" when nothing, or when it wrote none)."""
    kind = next((s.output for s in COMMANDS[case.command] if s.output), None)
    if case.output is None or kind is None or "--dry-run" in case.argv:
        return ""
    paths = [case.output] if case.output.exists() else sorted(case.output.parent.glob(f"{case.output.stem}-*"))
    if not paths:
        return f"exit 0 but no output at {case.output}"
    try:
        for path in paths:
            CHECKS[kind](path)
    except Exception as e:  # noqa: BLE001 — any failure to read it back is the finding
        return f"{path}: {type(e).__name__}: {str(e)[:300]}"
    return ""


def _lora(path: Path) -> None:
    import lorakit

    if path.suffix == ".png":
        return _png(path)  # train's samples/ next to it
    assert lorakit.load_lora(path).layers, "no layers"


def _png(path: Path) -> None:
    from PIL import Image

    with Image.open(path) as im:
        im.load()


def _model(path: Path) -> None:
    from lorakit.tools.modelfile import open_model

    assert open_model(path).params, "no tensors"


def _batch(folder: Path) -> None:
    import json

    for line in (folder / "results.jsonl").read_text().splitlines():
        for name in json.loads(line).get("images", []):
            _png(folder / name)


def _serve_config(path: Path) -> None:
    """A written Serve config: YAML whose application builds (``serve deploy`` would run its ``app_builder``)."""
    import yaml

    from lorakit.serve_ray.deployments import app_builder

    app_builder(yaml.safe_load(path.read_text())["applications"][0]["args"])


CHECKS: dict[str, Callable[[Path], None]] = {"lora": _lora, "png": _png, "model": _model, "batch": _batch,
                                             "serve_config": _serve_config}


def _multiline(err: str) -> bool:
    lines = err.rstrip("\n").splitlines()
    start = next((i for i in range(len(lines) - 1, -1, -1) if re.match(r"lorakit( \w+)?: error:|usage:", lines[i])),
                 None)
    if start is None or lines[start].startswith("usage:"):
        return False
    rest = lines[start + 1:]
    caret = len(rest) == 2 and rest[0].startswith("  ") and rest[1].strip() == "^"  # a prompt syntax excerpt
    return bool(rest) and not caret


def _error_line(err: str) -> str:
    found = [line for line in err.splitlines() if "error" in line]
    return (found[-1] if found else err.strip().splitlines()[-1] if err.strip() else "(no message)")[:300]


def _ident(ws: Workspace, p: Path) -> object:
    return ws.identities().get(p)


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+)", f.read())[1]) * 1024  # type: ignore[index]


def _argv_passable(argv: list[str]) -> bool:
    """Whether a real process can be given ``argv``: no NUL, encodable, each argument under the kernel's 128 KiB
    (``MAX_ARG_STRLEN``) and all under 1 MiB (such cases run in this process instead)."""
    try:
        sizes = [len(a.encode("utf-8")) for a in argv if "\0" not in a]
    except UnicodeEncodeError:
        return False
    return len(sizes) == len(argv) and max(sizes, default=0) < 100_000 and sum(sizes) < 1 << 20


__all__ = ["BAD", "COMMANDS", "POOLS", "Case", "Outcome", "Report", "Slot", "Workspace", "command_of", "run"]
