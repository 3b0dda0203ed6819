"""Grade workbook notebooks without nbgrader: run each one, collect what its checkers said.

    python -m utils.grade notebooks/03_lora_math.ipynb [more.ipynb ...]   # one learner's notebooks
    python -m utils.grade submissions/                                      # one sub-folder per learner
    python -m utils.grade submissions/ --csv grades.csv --json grades.json --timeout 600

Each notebook runs in a fresh kernel (its own directory as the working directory, as Jupyter does), with a time
limit for the whole notebook. A cell that raises does not stop the run: later exercises are still graded. The
checkers already know right from wrong (``utils.checks``); every check writes its ``CheckResult`` to a file the
grader names, as it runs, so a time limit or a crash loses nothing that ran before it. The exercises expected in a notebook are the checks its solution
(``solutions/<same name>``) calls, so an exercise whose check never ran (deleted, or the kernel died first) is
reported as "not run" rather than silently missing.

Statuses: ``right``; ``wrong`` (with the checker's reason, which never gives the answer away); ``not attempted``
(the stub is still there); ``not run``. The score is the number right.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import nbformat

from utils import workbook
from utils.checks.core import verdict


@dataclass(frozen=True)
class Grade:
    """One exercise of one notebook."""

    notebook: str
    exercise: str  # the check function, e.g. "check_lora_count"
    status: str  # right / wrong / not attempted / not run
    reason: str = ""


def expected_checks(notebook_name: str, solutions: Path = workbook.SOLUTIONS) -> list[str]:
    """The ``check_*`` functions the solution of this notebook calls after its exercises, in order."""
    solution = Path(solutions) / notebook_name
    if not solution.exists():
        raise FileNotFoundError(
            f"{notebook_name} is not a course notebook (no {solution}); "
            "grade files named like the course's notebooks, e.g. 03_lora_math.ipynb."
        )
    nb = nbformat.read(solution, as_version=4)
    names: list[str] = []
    for _, j in workbook.exercises(nb):
        names += [n for n in re.findall(r"\b(check_\w+)\s*\(", nb.cells[j].source) if n not in names]
    return names


def run_notebook(path: Path, timeout: float = 900) -> tuple[list[dict], str]:
    """Execute a copy of the notebook; return its check results and a note (time limit, dead kernel).

    Each check appends its result to a file named by ``COURSE_GRADE_RESULTS`` as it runs
    (``utils.checks.core.run_check``), so what ran before a time limit or a crash is still graded."""
    import os
    import tempfile

    from nbclient import NotebookClient

    from utils.checks.core import GRADE_RESULTS_ENV

    nb = nbformat.read(path, as_version=4)
    deadline = time.monotonic() + timeout
    client = NotebookClient(
        nb,
        timeout=int(timeout),
        timeout_func=lambda cell: max(1, int(deadline - time.monotonic())),  # the whole notebook's limit
        allow_errors=True,  # a learner's failing cell must not hide the exercises after it
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    )
    note = ""
    with tempfile.TemporaryDirectory() as tmp:
        results_file = Path(tmp) / "results.jsonl"
        old = os.environ.get(GRADE_RESULTS_ENV)
        os.environ[GRADE_RESULTS_ENV] = str(results_file)  # the kernel inherits it
        try:
            client.execute()
        except (
            Exception
        ) as error:  # nbclient's time limit, a dead kernel: grade what ran, say why not the rest
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
            note = f"stopped: {type(error).__name__}: {first_line}"
            if time.monotonic() >= deadline - 1:
                note = f"stopped at the time limit of {timeout:.0f} s"
        finally:
            if old is None:
                os.environ.pop(GRADE_RESULTS_ENV, None)
            else:
                os.environ[GRADE_RESULTS_ENV] = old
        lines = results_file.read_text(encoding="utf-8").splitlines() if results_file.exists() else []
    return [json.loads(line) for line in lines], note


def grade_notebook(
    path: str | Path, timeout: float = 900, solutions: Path = workbook.SOLUTIONS
) -> list[Grade]:
    """Grades of one notebook, one per exercise its solution checks (the last run of each check counts)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No notebook at {path}.")
    expected = expected_checks(path.name, solutions)
    results, note = run_notebook(path, timeout)
    grades = []
    for checker in expected:
        status, reason = verdict([r for r in results if r["checker"] == checker])
        if status == "not run":
            reason = note or reason
        grades.append(Grade(path.name, checker, status, reason))
    return grades


def find_submissions(paths: list[str | Path]) -> dict[str, list[Path]]:
    """``{learner: [notebooks]}``: notebook files name one learner ("-"); a folder holds one sub-folder per learner
    (or notebooks directly: then the folder is the learner)."""
    found: dict[str, list[Path]] = {}
    for p in map(Path, paths):
        if p.is_file():
            found.setdefault("-", []).append(p)
        elif p.is_dir():
            direct = sorted(p.glob("*.ipynb"))
            if direct:
                found[p.name] = direct
            for sub in sorted(d for d in p.iterdir() if d.is_dir() and not d.name.startswith(".")):
                notebooks = sorted(sub.glob("*.ipynb"))
                if notebooks:
                    found[sub.name] = notebooks
        else:
            raise FileNotFoundError(f"No notebook or folder at {p}.")
    if not found:
        raise FileNotFoundError(f"No .ipynb files in {', '.join(map(str, paths))}.")
    return found


def grade_all(
    paths: list[str | Path], timeout: float = 900, solutions: Path = workbook.SOLUTIONS
) -> dict[str, list[Grade]]:
    return {
        learner: [g for nb in notebooks for g in grade_notebook(nb, timeout, solutions)]
        for learner, notebooks in find_submissions(paths).items()
    }


def table(grades: dict[str, list[Grade]]) -> str:
    """One line per learner and exercise, and each learner's score."""
    lines = [f"{'learner':12s} {'notebook':28s} {'exercise':34s} {'result':14s} reason"]
    for learner, rows in grades.items():
        for g in rows:
            reason = g.reason.replace("\n", " ")
            lines.append(f"{learner:12s} {g.notebook:28s} {g.exercise:34s} {g.status:14s} {reason[:90]}")
        right = sum(g.status == "right" for g in rows)
        lines.append(f"{learner:12s} score {right}/{len(rows)}")
    return "\n".join(lines)


def write_csv(grades: dict[str, list[Grade]], path: str | Path) -> None:
    """A gradebook: one row per learner, one column per notebook:exercise (1 right, 0 otherwise), and a score."""
    columns = list(dict.fromkeys(f"{g.notebook}:{g.exercise}" for rows in grades.values() for g in rows))
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["learner", *columns, "score"])
        for learner, rows in grades.items():
            status = {f"{g.notebook}:{g.exercise}": g.status for g in rows}
            marks = [int(status.get(c) == "right") for c in columns]
            writer.writerow([learner, *marks, sum(marks)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.grade", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="notebooks, or a folder with one sub-folder per learner")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per notebook (default 900)")
    parser.add_argument("--csv", help="write a gradebook CSV here")
    parser.add_argument("--json", help="write every grade, with reasons, as JSON here")
    parser.add_argument("--solutions", default=str(workbook.SOLUTIONS), help="the solution notebooks' folder")
    args = parser.parse_args(argv)
    try:
        grades = grade_all(args.paths, args.timeout, Path(args.solutions))
    except FileNotFoundError as error:
        print(f"utils.grade: {error}", file=sys.stderr)
        return 2
    print(table(grades))
    if args.csv:
        write_csv(grades, args.csv)
    if args.json:
        Path(args.json).write_text(
            json.dumps({k: [asdict(g) for g in v] for k, v in grades.items()}, indent=1), encoding="utf-8"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
