"""The course as an nbgrader course: source notebooks with nbgrader's cell metadata, built from solutions/.

    make classroom                                  # builds classroom/ for every written chapter
    python -m utils.classroom DIR [--chapters 03 08]

then, in DIR, nbgrader's own commands (https://nbgrader.readthedocs.io):

    nbgrader generate_assignment 08_training_hygiene    # release/08_training_hygiene/08_training_hygiene.ipynb
    # collect each learner's file as submitted/<learner>/08_training_hygiene/08_training_hygiene.ipynb
    nbgrader autograde 08_training_hygiene              # runs them, one point per exercise
    nbgrader export                                     # grades.csv

What the build adds to each solution notebook, so that nbgrader and the course agree:

* an exercise cell (one with ``### BEGIN SOLUTION``) becomes an nbgrader *solution* cell; nbgrader's stub is set to
  the course's, so the released notebook's code cells equal ``notebooks/<name>`` line for line (tested);
* the check cell after it becomes an autograded *test* cell worth one point, locked, with a hidden test that
  asserts the check passed. The course's checks never raise (a workbook that always runs), so without it nbgrader
  would score every answer right; hidden tests are removed from the released copy and put back to grade;
* ``# NBVAL_CHECK_OUTPUT`` markers (for the course's own tests) are dropped, as in the student copies.

The same exercise names appear in nbgrader's gradebook (``grade_id``) and in ``python -m utils.grade``, which
grades without nbgrader.
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
from pathlib import Path

import nbformat

from utils import course, workbook

STUB = '# YOUR CODE HERE\nraise NotImplementedError("Exercise: write this part, then run the check below.")'
HIDDEN_ASSERT = (
    f"{workbook.BEGIN_HIDDEN}\n"
    "from utils.checks.core import last_check_passed\n\n"
    "assert last_check_passed()  # raises with the checker's reason when the exercise is not right\n"
    f"{workbook.END_HIDDEN}"
)
CONFIG = """c = get_config()  # noqa: F821 (nbgrader's config loader defines it)
c.CourseDirectory.root = {root!r}
c.CourseDirectory.db_assignments = {assignments!r}
# The course's stub, so that released notebooks equal notebooks/ (utils/classroom.py).
c.ClearSolutions.code_stub = {{"python": {stub!r}}}
c.ClearSolutions.text_stub = "*YOUR ANSWER HERE*"
c.Execute.timeout = 900  # seconds per cell: the training chapters run minutes on a CPU
"""


def _metadata(**fields) -> dict:
    return {"schema_version": 3, "task": False, "locked": False, "solution": False, "grade": False, **fields}


def exercise_name(source: str, index: int) -> str:
    """The exercise's function or class name (``perplexity_from_logits``), or ``exercise-<cell>``."""
    match = re.search(r"^(?:def|class)\s+(\w+)", source, re.MULTILINE)
    return match.group(1) if match else f"exercise-{index}"


def nbgrader_source(solution) -> nbformat.NotebookNode:
    """A solution notebook with nbgrader's metadata on its exercise and check cells (see the module docstring)."""
    nb = copy.deepcopy(solution)
    for i, j in workbook.exercises(nb):
        name = exercise_name(nb.cells[i].source, i)
        nb.cells[i].metadata["nbgrader"] = _metadata(solution=True, grade_id=name)
        check = nb.cells[j]
        check.source = check.source.rstrip() + "\n" + HIDDEN_ASSERT
        check.metadata["nbgrader"] = _metadata(grade=True, locked=True, points=1, grade_id=f"check_{name}")
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.source = "\n".join(
                line for line in cell.source.splitlines() if line.strip() != "# NBVAL_CHECK_OUTPUT"
            )
            cell.outputs, cell.execution_count = [], None
        cell.metadata.pop("execution", None)
    return nb


def build(directory: str | Path, chapters: list[int] | None = None) -> list[str]:
    """Write an nbgrader course folder: ``nbgrader_config.py`` and ``source/<assignment>/<notebook>``, one
    assignment per chapter (the notebook's name without ``.ipynb``). Returns the assignment names."""
    root = Path(directory).resolve()
    wanted = [course.chapter(n) for n in chapters] if chapters else [c for c in course.CHAPTERS if c.written]
    names = []
    for ch in wanted:
        if not ch.solution.exists():
            raise FileNotFoundError(f"Chapter {ch.id} has no solution notebook yet ({ch.solution.name}).")
        name = ch.notebook_name.removesuffix(".ipynb")
        if not workbook.exercises(nbformat.read(ch.solution, as_version=4)):
            continue  # nothing to grade (the question bank chapter)
        target = root / "source" / name
        target.mkdir(parents=True, exist_ok=True)
        workbook.write_notebook(
            nbgrader_source(nbformat.read(ch.solution, as_version=4)), target / ch.notebook_name
        )
        names.append(name)
    assignments = [{"name": n} for n in names]
    (root / "nbgrader_config.py").write_text(
        CONFIG.format(root=str(root), assignments=assignments, stub=STUB), encoding="utf-8"
    )
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.classroom", description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", help="the nbgrader course folder to write (created if missing)")
    parser.add_argument(
        "--chapters", nargs="*", type=int, help="chapter numbers (default: every written one)"
    )
    args = parser.parse_args(argv)
    try:
        names = build(args.directory, args.chapters)
    except (FileNotFoundError, ValueError) as error:
        print(f"utils.classroom: {error}", file=sys.stderr)
        return 2
    print(f"wrote {len(names)} assignments to {args.directory}/source: {', '.join(names)}")
    print(f"next: cd {args.directory} && nbgrader generate_assignment {names[0] if names else 'NAME'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
