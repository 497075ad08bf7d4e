"""The time table `.ci/run` prints at its end: each phase's seconds, the total against the budget, the slowest tests.

Usage: python scripts/ci_times.py DIR [--budget-min 45] [--top 20]

DIR holds ``phases.tsv`` (lines ``phase <TAB> step <TAB> seconds <TAB> exit code``, appended by .ci/run and
scripts/test.sh; a step ending in ``(beside)`` ran in the background, beside another phase, and is not added to the
total; a ``ci <TAB> wall`` line, when there, is the total) and one JUnit XML file per pytest run (``*.xml``, from ``--junitxml``). Standard library only: it
runs with any python3, before or without a venv. Exit code 0 always (the table informs; .ci/run decides).
"""

from __future__ import annotations

import argparse
import glob
import os
import xml.etree.ElementTree as ET


def read_phases(path: str) -> list[tuple[str, str, int, int]]:
    rows = []
    if not os.path.isfile(path):
        return rows
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            parts = line.rstrip("\n").split("\t")
            if len(parts) == 4 and parts[2].lstrip("-").isdigit():
                rows.append((parts[0], parts[1], int(parts[2]), int(parts[3]) if parts[3].lstrip("-").isdigit() else 1))
    return rows


def read_tests(directory: str) -> list[tuple[float, str, str]]:
    """(seconds, test id, run) for every test case of every JUnit file in ``directory``."""
    found = []
    for path in sorted(glob.glob(os.path.join(directory, "*.xml"))):
        run = os.path.splitext(os.path.basename(path))[0]
        try:
            root = ET.parse(path).getroot()
        except ET.ParseError:
            continue
        for case in root.iter("testcase"):
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            found.append((float(case.get("time") or 0.0), name, run))
    return found


def render(directory: str, budget_min: float, top: int) -> str:
    phases = read_phases(os.path.join(directory, "phases.tsv"))
    lines = ["", "CI time table", "", f"{'phase':<16} {'step':<22} {'seconds':>8}  result"]
    total, wall = 0, None
    for phase, step, seconds, rc in phases:
        if (phase, step) == ("ci", "wall"):
            wall = seconds
            continue
        total += 0 if step.endswith("(beside)") else seconds
        lines.append(f"{phase:<16} {step:<22} {seconds:>8}  {'ok' if rc == 0 else f'exit {rc}'}")
    total = total if wall is None else wall
    lines.append(f"{'all phases':<16} {'(wall clock)' if wall is not None else '':<22} {total:>8}  "
                 f"{total / 60:.1f} min of a {budget_min:g} min budget"
                 + ("" if total <= budget_min * 60 else "  OVER BUDGET"))
    tests = sorted(read_tests(directory), reverse=True)
    if tests:
        lines += ["", f"{top} slowest tests (seconds, run, test)"]
        lines += [f"{seconds:8.1f}  {run:<16} {name}" for seconds, name, run in tests[:top]]
        per_run: dict[str, float] = {}
        for seconds, _, run in tests:
            per_run[run] = per_run.get(run, 0.0) + seconds
        lines += ["", "test seconds per run (summed over workers): "
                  + ", ".join(f"{run} {s:.0f}" for run, s in sorted(per_run.items()))]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory")
    parser.add_argument("--budget-min", type=float, default=45.0)
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args(argv)
    print(render(args.directory, args.budget_min, args.top), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
