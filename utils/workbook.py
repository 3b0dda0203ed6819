"""The notebook pipeline: one header template, and student notebooks generated from solutions.

* ``header_cells(chapter)``: the cells every notebook opens with: title and Colab badge, the bootstrap
  cell (the one place that owns the Colab install line and its version pins, read from pyproject), and
  the setup cell (library noise, seeds, threads, versions: ``env.setup_notebook``). Titles and the
  packages each chapter prints come from the manifest, ``utils.course``.
* ``make_student(nb)``: a solution notebook with its solution regions replaced by
  ``raise NotImplementedError(...)`` and its outputs cleared (nbgrader's markers, so an instructor can
  also run nbgrader on ``solutions/``).
* ``python -m utils.workbook``: refresh the headers of ``solutions/``, regenerate ``notebooks/`` and the
  README's course map (what ``make notebooks`` runs). ``tests/test_workbook.py`` fails when any is stale.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import nbformat

from utils import course

ROOT = Path(__file__).resolve().parent.parent
SOLUTIONS = ROOT / "solutions"
NOTEBOOKS = ROOT / "notebooks"

# Where the course lives on GitHub: the Colab badge and the bootstrap clone use it. A fork changes this
# one line and runs `make notebooks`.
COURSE_REPO = "finetuning-course/finetuning-course"

BEGIN_SOLUTION, END_SOLUTION = "### BEGIN SOLUTION", "### END SOLUTION"
BEGIN_HIDDEN, END_HIDDEN = "### BEGIN HIDDEN TESTS", "### END HIDDEN TESTS"
HEADER_TAG = "course-header"
# Packages Colab lacks or has at other versions; torch is never reinstalled on Colab (its CUDA build is right).
COLAB_PACKAGES = (
    "transformers",
    "tokenizers",
    "safetensors",
    "peft",
    "bitsandbytes",
    "datasets",
    "accelerate",
    "huggingface_hub",
    "optuna",  # chapter 08: Trainer.hyperparameter_search
    "sacrebleu",  # chapter 08: BLEU
    "rouge-score",  # chapter 08: ROUGE
    "trl",  # chapter 10: SFTTrainer
)


def pinned_versions() -> dict[str, str]:
    """``{package: version}`` from the ``==`` pins of pyproject.toml (dependencies and extras)."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        specs += extra
    pins = {}
    for spec in specs:
        name, _, version = spec.partition("==")
        pins[name.strip().lower()] = version.strip()
    return pins


def header_cells(notebook_name: str) -> list:
    """The title + badge (markdown), bootstrap (code) and setup (code) cells for ``notebooks/<notebook_name>``."""
    ch = course.by_notebook(notebook_name)
    pins = pinned_versions()
    packages = " ".join(f"{p}=={pins[p.lower()]}" for p in COLAB_PACKAGES)
    badge = (
        f"{ch.heading}\n\n"
        f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
        f"(https://colab.research.google.com/github/{COURSE_REPO}/blob/main/notebooks/{notebook_name})\n\n"
        "Run the cells from the top. On a laptop everything runs offline on the course's tiny model; on Colab "
        "the next cell fetches the course and installs what Colab lacks (it never reinstalls PyTorch)."
    )
    bootstrap = (
        "# Colab bootstrap: only on Colab, fetch the course and install its pinned packages (not torch).\n"
        "import os\nimport subprocess\nimport sys\n\n"
        'if "google.colab" in sys.modules and not os.path.isdir("utils"):\n'
        f'    if not os.path.isdir("course"):\n'
        f'        url = "https://github.com/{COURSE_REPO}"\n'
        '        subprocess.run(["git", "clone", "--depth", "1", url, "course"], check=True)\n'
        '    os.chdir("course")\n'
        f'    pins = "{packages}"\n'
        '    subprocess.run([sys.executable, "-m", "pip", "install", "-q", *pins.split()], check=True)\n'
        'if os.path.basename(os.getcwd()) in ("solutions", "notebooks"):\n'
        '    os.chdir("..")  # run from the repository root, so that `import utils` finds the package\n'
        "sys.path.insert(0, os.getcwd())"
    )
    setup = (
        "# Setup, the same in every notebook: quiet known library noise (the list and the reasons are in\n"
        "# utils/env.py), seed everything, one CPU thread (results repeat exactly), print the versions.\n"
        "from utils import env\n\n"
        "env.setup_notebook(packages=("
        + ", ".join(f'"{p}"' for p in ch.packages)
        + ("," if len(ch.packages) == 1 else "")
        + "))"
    )
    cells = [
        nbformat.v4.new_markdown_cell(badge),
        nbformat.v4.new_code_cell(bootstrap),
        nbformat.v4.new_code_cell(setup),
    ]
    for cell in cells:
        cell.metadata["tags"] = [HEADER_TAG]
    return cells


def refresh_header(nb, notebook_name: str):
    """Replace the tagged header cells of ``nb`` by the current template."""
    body = [c for c in nb.cells if HEADER_TAG not in c.metadata.get("tags", [])]
    new = header_cells(notebook_name)
    for old, fresh in zip(
        [c for c in nb.cells if HEADER_TAG in c.metadata.get("tags", [])], new, strict=False
    ):
        if old.source == fresh.source:  # keep the id and the executed outputs of an unchanged cell
            if fresh.cell_type == "code":
                fresh.outputs = old.get("outputs", [])
                fresh.execution_count = old.get("execution_count")
            fresh.id = old.get("id", fresh.id)
    nb.cells = new + body
    return nb


def readme_text(text: str) -> str:
    """The README with its course map (between the COURSE MAP markers) regenerated from the manifest."""
    begin, end = text.index(course.COURSE_MAP_BEGIN), text.index(course.COURSE_MAP_END)
    return (
        text[: begin + len(course.COURSE_MAP_BEGIN)]
        + "\n"
        + course.course_map(COURSE_REPO)
        + "\n"
        + text[end:]
    )


def _strip_region(source: str, begin: str, end: str, replacement: str | None) -> str:
    lines, out, inside = source.splitlines(), [], False
    for line in lines:
        stripped = line.strip()
        if stripped == begin:
            if inside:
                raise ValueError(f"Nested {begin!r} in cell:\n{source}")
            inside = True
            if replacement is not None:
                indent = line[: len(line) - len(line.lstrip())]
                out += [indent + r for r in replacement.splitlines()]
            continue
        if stripped == end:
            if not inside:
                raise ValueError(f"{end!r} without {begin!r} in cell:\n{source}")
            inside = False
            continue
        if not inside:
            out.append(line)
    if inside:
        raise ValueError(f"{begin!r} without {end!r} in cell:\n{source}")
    return "\n".join(out)


def make_student(solution) -> nbformat.NotebookNode:
    """The student copy of a solution notebook: solution regions replaced, hidden tests removed,
    outputs cleared, and ``NBVAL_CHECK_OUTPUT`` markers dropped (there is no stored output to compare)."""
    nb = copy.deepcopy(solution)
    for cell in nb.cells:
        if cell.cell_type == "code":
            src = _strip_region(cell.source, BEGIN_HIDDEN, END_HIDDEN, None)
            src = _strip_region(
                src,
                BEGIN_SOLUTION,
                END_SOLUTION,
                '# YOUR CODE HERE\nraise NotImplementedError("Exercise: write this part, then run the check below.")',
            )
            src = "\n".join(line for line in src.splitlines() if line.strip() != "# NBVAL_CHECK_OUTPUT")
            cell.source = src
            cell.outputs = []
            cell.execution_count = None
        elif cell.cell_type == "markdown" and BEGIN_SOLUTION in cell.source:
            cell.source = _strip_region(cell.source, BEGIN_SOLUTION, END_SOLUTION, "*YOUR ANSWER HERE*")
        cell.metadata.pop("execution", None)
    nb.metadata.pop("widgets", None)
    return nb


def write_notebook(nb, path: Path) -> None:
    nbformat.validate(nb)
    path.write_text(nbformat.writes(nb) + "\n", encoding="utf-8")


def student_text(solution_path: Path) -> str:
    """What ``notebooks/<name>`` must contain for ``solutions/<name>``."""
    nb = make_student(nbformat.read(solution_path, as_version=4))
    return nbformat.writes(nb) + "\n"


def sync_all(check_only: bool = False) -> list[str]:
    """Refresh solution headers and regenerate every student notebook. Returns the stale files
    (with ``check_only`` nothing is written)."""
    stale = []
    NOTEBOOKS.mkdir(exist_ok=True)
    for sol in sorted(SOLUTIONS.glob("*.ipynb")):
        nb = nbformat.read(sol, as_version=4)
        text = nbformat.writes(refresh_header(nb, sol.name)) + "\n"
        if text != sol.read_text(encoding="utf-8"):
            stale.append(str(sol.relative_to(ROOT)))
            if not check_only:
                sol.write_text(text, encoding="utf-8")
        student = NOTEBOOKS / sol.name
        want = student_text(sol)
        if not student.exists() or student.read_text(encoding="utf-8") != want:
            stale.append(str(student.relative_to(ROOT)))
            if not check_only:
                student.write_text(want, encoding="utf-8")
    readme = ROOT / "README.md"
    want = readme_text(readme.read_text(encoding="utf-8"))
    if want != readme.read_text(encoding="utf-8"):
        stale.append("README.md (course map)")
        if not check_only:
            readme.write_text(want, encoding="utf-8")
    for orphan in sorted(
        set(p.name for p in NOTEBOOKS.glob("*.ipynb")) - set(p.name for p in SOLUTIONS.glob("*.ipynb"))
    ):
        stale.append(f"notebooks/{orphan} (no solution)")
        if not check_only:
            (NOTEBOOKS / orphan).unlink()
    return stale


# The notebook tests. Every solution notebook runs top to bottom under nbval. Its student copy differs from it only
# in its exercise cells (solution regions replaced by a stub, hidden tests removed, output markers dropped), and the
# cells after an exercise use the reference in ``utils``, never the learner's names (``exercise_dependencies``
# finds any that do; tests/test_workbook.py asserts there are none). So the student copy's run is the solution's
# run with each exercise cell swapped for its stub: ``nbtest_notebook`` runs exactly that swap inside the solution's
# run (the stub cell, then its check cell, which must report "not attempted"; then the solution's cell again, and
# the random generators put back as they were), and every student copy is covered without training its models a
# second time. ``make test-literal`` also executes every file in notebooks/ on its own.

NBTEST_DIR = ROOT / ".nbtest"  # same depth as solutions/, so relative paths resolve alike; git-ignored


def _code_names(source: str) -> tuple[set[str], set[str]]:
    """(names a cell binds at top level, names it reads anywhere) by its syntax tree; IPython magics skipped."""
    import ast

    lines = [line for line in source.splitlines() if not line.lstrip().startswith(("%", "!"))]
    tree = ast.parse("\n".join(lines))
    bound: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                bound |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
    read = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    return bound, read


def exercises(solution) -> list[tuple[int, int]]:
    """(exercise cell, its check cell) index pairs: a code cell with a solution region, and the next code cell."""
    pairs = []
    for i, cell in enumerate(solution.cells):
        if cell.cell_type == "code" and BEGIN_SOLUTION in cell.source:
            j = next(
                (k for k in range(i + 1, len(solution.cells)) if solution.cells[k].cell_type == "code"), None
            )
            if j is None:
                raise ValueError(f"exercise cell {i} has no check cell after it")
            pairs.append((i, j))
    return pairs


def exercise_dependencies(solution) -> list[str]:
    """Cells after an exercise's check that read a name the exercise cell or its check cell binds (they would
    run the learner's code or see its check's result, not the reference); empty when the notebook keeps the rule."""
    problems = []
    for i, j in exercises(solution):
        defined = _code_names(solution.cells[i].source)[0] | _code_names(solution.cells[j].source)[0]
        for k in range(j + 1, len(solution.cells)):
            cell = solution.cells[k]
            if cell.cell_type != "code" or k in {e for e, _ in exercises(solution)}:
                continue
            used = defined & _code_names(cell.source)[1]
            if used:
                problems.append(f"cell {k} reads {sorted(used)}, bound by exercise cell {i} or its check")
    return problems


def nbtest_notebook(solution) -> nbformat.NotebookNode:
    """The solution notebook with, after each exercise's check cell, the student copy's exercise and check cells,
    an assert that the check reported "not attempted", and the solution's exercise cell again."""
    student = make_student(solution)
    nb = copy.deepcopy(solution)
    inserted = 0
    for i, j in exercises(solution):
        before = (
            "# nbtest: the student copy's exercise and check cells run here (see utils/workbook.py)\n"
            "import utils.workbook as _nbtest\n\n_nbtest_state = _nbtest.save_state()"
        )
        after = (
            "_nbtest.expect_not_attempted(_nbtest_state)\n"
            + solution.cells[i].source.replace("# NBVAL_CHECK_OUTPUT", "")
            + "\n_nbtest.restore_state(_nbtest_state)"
        )
        cells = [
            nbformat.v4.new_code_cell(before),
            nbformat.v4.new_code_cell(student.cells[i].source),
            nbformat.v4.new_code_cell(student.cells[j].source),
            nbformat.v4.new_code_cell(after),
        ]
        at = j + 1 + inserted
        nb.cells[at:at] = cells
        inserted += len(cells)
    return nb


def save_state() -> dict:
    """The random generators' states and how many checks have run (taken before a stub's cells run)."""
    import random

    import numpy as np
    import torch

    from utils.checks import core

    return {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "checks": len(core.RESULTS),
    }


def expect_not_attempted(state: dict) -> None:
    """Fail unless every check since ``state`` ran and reported "not attempted" (None)."""
    from utils.checks import core

    since = core.RESULTS[state["checks"] :]
    if not since or any(r.result is not None for r in since):
        raise AssertionError(f"the student copy's check cell should report 'not attempted', got {since}")


def restore_state(state: dict) -> None:
    import random

    import numpy as np
    import torch

    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def write_nbtest(directory: Path = NBTEST_DIR) -> list[Path]:
    """Write ``nbtest_notebook`` of every solution into ``directory`` (what ``make test`` executes)."""
    directory.mkdir(exist_ok=True)
    for old in directory.glob("*.ipynb"):
        old.unlink()
    paths = []
    for sol in sorted(SOLUTIONS.glob("*.ipynb")):
        path = directory / sol.name
        write_notebook(nbtest_notebook(nbformat.read(sol, as_version=4)), path)
        paths.append(path)
    return paths


PEAK_MEMORY_PROBE = (
    "import resource, sys\n"
    "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform != 'darwin' else 2**30))"
)


def execute(path: Path, timeout: int = 900) -> tuple[float, float]:
    """Run a notebook in place (its directory as the working directory, as Jupyter does) and save its
    outputs. Quizzes render as text so the committed outputs read well on GitHub.

    Returns (seconds, peak resident memory of the kernel in GiB), the numbers of the README's course map.
    """
    import os
    import time

    from nbclient import NotebookClient

    os.environ["COURSE_QUIZ_TEXT"] = "1"
    os.environ["COURSE_PROGRESS"] = "0"  # committed outputs hold results, not progress bars
    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(PEAK_MEMORY_PROBE))  # measured, then removed
    start = time.time()
    NotebookClient(
        nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    ).execute()
    seconds = time.time() - start
    probe = nb.cells.pop()
    peak_gib = float(probe.outputs[0]["text"]) if probe.outputs else float("nan")
    write_notebook(nb, path)
    return seconds, peak_gib


if __name__ == "__main__":
    if "--nbtest" in sys.argv:
        for path in write_nbtest():
            print(f"wrote {path.relative_to(ROOT)}")
        sys.exit(0)
    if "--execute" in sys.argv:
        names = [a for a in sys.argv[1:] if not a.startswith("--")]
        for sol in sorted(SOLUTIONS.glob("*.ipynb")):
            if not names or any(n in sol.name for n in names):
                seconds, peak = execute(sol)
                ch = course.by_notebook(sol.name)
                course.record_measurement(ch, seconds, peak)
                over = f" OVER its {ch.cpu_budget_s} s budget" if seconds > ch.cpu_budget_s else ""
                print(
                    f"{sol.name}: executed in {seconds:.0f} s{over}, kernel peak memory {peak:.2f} GiB",
                    flush=True,
                )
    changed = sync_all(check_only="--check" in sys.argv)
    for name in changed:
        print(("stale: " if "--check" in sys.argv else "wrote: ") + name)
    if "--check" in sys.argv and changed:
        sys.exit(1)
    if not changed:
        print("notebooks/ is current with solutions/")
