"""utils.classroom: the course as an nbgrader course, tried for real on chapter 08.

The round trip: build the nbgrader source from solutions/, ``nbgrader generate_assignment`` (the released notebook
must equal notebooks/08 cell for cell), a learner's submission with exercise 1 right, exercise 2 wrong (disjoint
chunks) and exercise 3 not attempted, ``nbgrader autograde``, and the gradebook's score per exercise.
"""

import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from utils import classroom, workbook

NAME = "08_training_hygiene"
WRONG_WINDOW = '''def sliding_window_perplexity(model, input_ids, max_length, stride):
    """Disjoint chunks of max_length: every window restarts without context (a plausible wrong answer)."""
    ids = torch.tensor([input_ids])
    total, count = 0.0, 0
    for begin in range(0, ids.shape[1], max_length):
        window = ids[:, begin : begin + max_length]
        if window.shape[1] < 2:
            break
        with torch.no_grad():
            out = model(window, labels=window)
        total, count = total + out.loss.item() * (window.shape[1] - 1), count + window.shape[1] - 1
    return math.exp(total / count)'''


def _code(nb):
    return [c.source for c in nb.cells if c.cell_type == "code"]


def _index(nb, needle):
    return next(i for i, c in enumerate(nb.cells) if c.cell_type == "code" and needle in c.source)


def _nbgrader(root: Path, *args):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    result = subprocess.run(
        [sys.executable, "-m", "nbgrader", *args, "--force"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_source_cells_carry_nbgrader_metadata(tmp_path):
    assert classroom.build(tmp_path, [8, 9]) == [NAME]  # chapter 09 has no exercise: no assignment
    nb = nbformat.read(tmp_path / "source" / NAME / f"{NAME}.ipynb", as_version=4)
    solutions = [c for c in nb.cells if c.metadata.get("nbgrader", {}).get("solution")]
    tests = [c for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade")]
    assert [c.metadata["nbgrader"]["grade_id"] for c in solutions] == [
        "perplexity_from_logits",
        "sliding_window_perplexity",
        "EarlyStopper",
    ]
    assert [c.metadata["nbgrader"]["points"] for c in tests] == [1, 1, 1]
    assert all(c.metadata["nbgrader"]["locked"] and workbook.BEGIN_HIDDEN in c.source for c in tests)
    assert not any("NBVAL_CHECK_OUTPUT" in s for s in _code(nb))
    assert "c.ClearSolutions.code_stub" in (tmp_path / "nbgrader_config.py").read_text()
    with pytest.raises(ValueError, match="No chapter 42"):
        classroom.build(tmp_path, [42])


def test_round_trip_generate_submit_autograde(tmp_path):
    root = tmp_path / "course"
    classroom.build(root, [8])
    _nbgrader(root, "generate_assignment", NAME)
    release = nbformat.read(root / "release" / NAME / f"{NAME}.ipynb", as_version=4)
    assert _code(release) == _code(nbformat.read(workbook.NOTEBOOKS / f"{NAME}.ipynb", as_version=4))

    solution = nbformat.read(workbook.SOLUTIONS / f"{NAME}.ipynb", as_version=4)
    right = solution.cells[_index(solution, "def perplexity_from_logits")].source
    right = "\n".join(
        line for line in right.splitlines() if line.strip() not in ("### BEGIN SOLUTION", "### END SOLUTION")
    )
    release.cells[_index(release, "def perplexity_from_logits")].source = right
    release.cells[_index(release, "def sliding_window_perplexity")].source = WRONG_WINDOW
    submitted = root / "submitted" / "alice" / NAME
    submitted.mkdir(parents=True)
    nbformat.write(release, submitted / f"{NAME}.ipynb")
    _nbgrader(root, "autograde", NAME)

    from nbgrader.api import Gradebook

    with Gradebook(f"sqlite:///{root / 'gradebook.db'}") as gradebook:
        graded = gradebook.find_submission_notebook(NAME, NAME, "alice")
        scores = {g.name: (g.score, g.max_score) for g in graded.grades}
    assert scores == {
        "check_perplexity_from_logits": (1.0, 1.0),
        "check_sliding_window_perplexity": (0.0, 1.0),  # wrong: the hidden test asserts the check passed
        "check_EarlyStopper": (0.0, 1.0),  # not attempted
    }
