"""The CLI fuzz harness (``cli_fuzz.py``) in the suite: a fast, fixed subset of every command in this process, a
few real subprocesses (exit code, no traceback, one line), and — with ``--fuzz`` / ``-m fuzz`` — the nightly-size
run (``benchmarks/fuzz_cli.py`` runs the same with a report). Every case must end ``ok`` or ``refused``: no
traceback, hang, replaced special file, unloadable output, multi-line error or memory blow-up."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from .cli_fuzz import COMMANDS, Case, Report, Workspace, command_of, run, run_case

FAST = {"inspect": 10, "list": 5, "convert": 8, "resize": 5, "merge": 6, "extract": 4, "bake": 4, "serve": 4,
        "generate": 3, "grid": 3, "batch": 3, "train": 3, "inspect@flux": 3, "convert@flux": 3, "merge@flux": 3,
        "resize@flux": 2, "bake@flux": 2, "extract@flux": 2, "generate@flux": 3, "grid@flux": 3, "batch@flux": 2,
        "train@flux": 2, "serve@flux": 2, "inspect@sd3": 1, "convert@sd3": 1, "merge@sd3": 1, "extract@sd3": 1,
        "convert@chroma": 1, "bake@chroma": 1, "convert@qwen": 1, "generate@qwen": 1, "inspect@quant": 2,
        "serve@ray": 2}  # the newer rows' cheap cases (the nightly run has every row at full size)
FULL = 2_000


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    return Workspace(tmp_path_factory.mktemp("cli_fuzz"))


def _assert_clean(report: Report) -> None:
    findings = "\n".join(f"{o.outcome}: {' '.join(o.case.argv)[:300]}\n  {o.detail[-1500:]}" for o in report.findings())
    assert not findings, f"{report.text()}\n\n{findings}"


def test_every_command_is_in_the_table() -> None:
    from lorakit.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(sub.choices) == {command_of(name) for name in COMMANDS}  # type: ignore[arg-type]


def test_cli_fuzz_fast(ws: Workspace) -> None:
    report = run(ws, FAST, seed=0, timeout=120)
    assert len(report.outcomes) == sum(FAST.values())
    _assert_clean(report)
    assert {o.case.command for o in report.outcomes} == set(FAST)
    # every command met a bad input it refused (a FLUX row's few cases may all be valid ones)
    assert {o.case.argv[0] for o in report.outcomes if o.outcome == "refused"} == {command_of(n) for n in FAST}


SUBPROCESS_CASES = [
    ["merge", "{lora:good}", "{lora:sd1}", "--dry-run"],  # was a RuntimeError from torch.cat
    ["convert", "{lora:good}", "--to", "kohya", "-o", "{special:fifo}"],  # was renamed over the FIFO
    ["batch", "{text:jobs_deep}", "-o", "{fresh:}"],  # was a RecursionError
    ["inspect", "{lora:deep}"],
    ["serve", "--ray", "--replica-gpus", "nan", "--port", "0"],  # was Ray's ValueError, after Ray started
]


def test_real_subprocesses_exit_2_with_one_line(ws: Workspace) -> None:
    """Real ``python -m lorakit.cli`` processes (run side by side): exit 2, lorakit's own line, no traceback."""
    from concurrent.futures import ThreadPoolExecutor

    before = ws.identities()
    argvs = [[str(ws.specials[a[9:-1]]) if a.startswith("{special:") else ws.value(a) for a in argv]
             for argv in SUBPROCESS_CASES]
    with ThreadPoolExecutor(len(argvs)) as pool:
        outcomes = list(pool.map(lambda argv: run_case(Case(argv[0], argv, ["(fixed)"]), ws, 300, True), argvs))
    for o in outcomes:
        assert o.outcome == "refused" and o.detail.startswith("lorakit: error:"), (o.case.argv, o.outcome, o.detail)
    assert ws.identities() == before


@pytest.mark.fuzz
def test_cli_fuzz_full(ws: Workspace) -> None:
    per = -(-FULL // len(COMMANDS))
    report = run(ws, {name: per for name in COMMANDS}, seed=int(os.environ.get("LORAKIT_FUZZ_SEED", "1")),
                 timeout=600, subprocess_every=40)  # as benchmarks/fuzz_cli.py: a valid 1,000-cell grid takes minutes
    _assert_clean(report)
    Path(ws.root / "report.md").write_text(report.text())
