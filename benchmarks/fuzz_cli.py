"""The nightly CLI fuzz run: ``tests/cli_fuzz.py`` over every ``lorakit`` command, with a report.

    python benchmarks/fuzz_cli.py --cases 2000 --seed 1 --subprocess-every 40 --json fuzz.json

Cases are split evenly over the commands and drawn from ``--seed`` (the same seed gives the same cases); every
``--subprocess-every``-th case runs as a real ``python -m lorakit.cli`` process. Prints one line per finding as it
happens, then the table of outcomes per command (markdown, for ``docs/benchmarks.md``); ``--json`` writes every
case (command line, outcome, seconds, detail). Exit 1 when any case is a finding (traceback, hang, replaced
special file, unloadable output, multi-line error, memory)."""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' harness and factories

from tests.cli_fuzz import BAD, COMMANDS, Outcome, Workspace, run  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=2000, help="cases in all, split evenly over the commands")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a case may run before it is a hang (a valid "
                   "1,000-cell FLUX.1 grid takes minutes on a loaded CPU)")
    p.add_argument("--subprocess-every", type=int, default=25, help="every Nth case as a real process (0: none)")
    p.add_argument("--commands", help="comma-separated subset of the commands (default: all)")
    p.add_argument("--workspace", type=Path, help="folder for the inputs and outputs (default: a temporary one)")
    p.add_argument("--json", type=Path, help="write every case here")
    args = p.parse_args()
    names = args.commands.split(",") if args.commands else list(COMMANDS)
    per = -(-args.cases // len(names))
    root = args.workspace or Path(tempfile.mkdtemp(prefix="lorakit-fuzz-cli-"))
    started = time.time()
    ws = Workspace(root)
    print(f"workspace {root} ({time.time() - started:.0f} s); {per * len(names)} cases, seed {args.seed}",
          flush=True)
    done = [0]

    def progress(o: Outcome) -> None:
        done[0] += 1
        if o.outcome in BAD:
            text = f"FINDING {o.outcome}: {' '.join(o.case.argv)[:400]}\n  {o.detail[-2000:]}"
            print(text.encode("utf-8", "backslashreplace").decode(), flush=True)  # a case's lone surrogates
        if done[0] % 100 == 0:
            print(f"{done[0]} cases, {time.time() - started:.0f} s", flush=True)

    report = run(ws, {n: per for n in names}, seed=args.seed, timeout=args.timeout,
                 subprocess_every=args.subprocess_every, progress=progress)
    print(f"\n{len(report.outcomes)} cases in {time.time() - started:.0f} s (seed {args.seed}, a subprocess every "
          f"{args.subprocess_every})\n\n{report.text()}")
    if args.json:
        args.json.write_text(json.dumps([{"command": o.case.command, "argv": o.case.argv, "mutated": o.case.mutated,
                                          "outcome": o.outcome, "seconds": round(o.seconds, 3),
                                          "detail": o.detail[-2000:]} for o in report.outcomes], indent=1))
    return 1 if report.findings() else 0


if __name__ == "__main__":
    sys.exit(main())
