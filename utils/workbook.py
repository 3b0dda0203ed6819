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
