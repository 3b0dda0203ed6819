"""The course as a whole: pins agree, every chapter has its three views and its README row, lesson
code runs, and every relative link resolves."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from utils import course, quiz, workbook

ROOT = Path(__file__).resolve().parent.parent
LESSONS = sorted((ROOT / "lessons").glob("*.md"))
SOLUTIONS = sorted((ROOT / "solutions").glob("*.ipynb"))


def _pins_environment() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "environment.yml").read_text().splitlines():
        m = re.match(r"\s*-\s*([A-Za-z0-9_.\-]+)==([^\s#]+)", line)
        if m:
            pins[m.group(1).lower()] = m.group(2)
    return pins


def test_environment_yml_has_the_same_pins_as_pyproject():
    assert _pins_environment() == workbook.pinned_versions()


def test_makefile_installs_the_same_torch_as_pyproject():
    torch_pin = re.search(r"TORCH\s*:=\s*torch==(\S+)", (ROOT / "Makefile").read_text()).group(1)
    assert torch_pin == workbook.pinned_versions()["torch"]


def test_ci_calls_make_test_and_readme_shows_both_commands():
    assert "make test" in (ROOT / ".ci/run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "make lab" in readme and "make test" in readme


@pytest.mark.parametrize("ch", course.CHAPTERS, ids=lambda c: c.id)
def test_each_chapter_of_the_manifest_has_its_files_and_readme_row(ch):
    readme = (ROOT / "README.md").read_text()
    row = [line for line in readme.splitlines() if line.startswith(f"| {ch.id} |")]
    assert len(row) == 1, f"README course map needs one row for chapter {ch.id}"
    if not ch.written:
        assert not ch.solution.exists(), f"chapter {ch.id} has a notebook: mark it written in utils/course.py"
        assert "planned" in row[0]
        return
    assert ch.lesson.exists() and ch.solution.exists() and ch.notebook.exists(), ch
    assert f"lessons/{ch.lesson.name}" in row[0] and f"notebooks/{ch.notebook_name}" in row[0]
    assert "colab" in row[0].lower()
    first_line = ch.solution.read_text(encoding="utf-8")
    assert ch.heading in first_line, f"{ch.solution.name} must open with {ch.heading!r}"


def test_every_notebook_and_lesson_belongs_to_a_chapter():
    names = {ch.notebook_name for ch in course.CHAPTERS}
    assert {p.name for p in SOLUTIONS} <= names
    lessons = {ch.lesson.name for ch in course.CHAPTERS}
    assert {p.name for p in LESSONS} <= lessons


def _anchors(path: Path) -> set[str]:
    return set(quiz._file_anchors(path))  # one anchor rule for the whole course (duplicates get -1, -2)


MARKDOWN = [ROOT / "README.md", *LESSONS]


@pytest.mark.parametrize("doc", MARKDOWN, ids=lambda p: p.name)
def test_relative_links_resolve(doc):
    text = re.sub(r"```.*?```", "", doc.read_text(encoding="utf-8"), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        file_part, _, anchor = target.partition("#")
        path = (doc.parent / file_part).resolve() if file_part else doc
        assert path.exists(), f"{doc.name}: broken link {target}"
        if anchor and path.suffix in (".md", ".ipynb"):
            assert anchor in _anchors(path), f"{doc.name}: no heading for #{anchor} in {path.name}"


@pytest.mark.parametrize("lesson", LESSONS, ids=lambda p: p.name)
def test_lesson_code_blocks_run(lesson, tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", lesson.read_text(encoding="utf-8"), flags=re.S)
    if not blocks:
        pytest.skip(f"{lesson.name} has no python blocks")
    script = tmp_path / "lesson.py"
    script.write_text("\n\n".join(blocks))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # `import utils` works even without the editable install
    result = subprocess.run(
        [sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, f"{lesson.name}:\n{result.stderr[-3000:]}"


def test_no_unsafe_loading():
    """A checkpoint or model is data: torch.load unpickles arbitrary objects unless weights_only=True, and
    trust_remote_code runs a repository's Python. Neither belongs in what the course teaches."""
    unsafe = re.compile(r"weights_only\s*=\s*False|trust_remote_code\s*=\s*True")
    paths = [*ROOT.glob("utils/**/*.py"), *ROOT.glob("solutions/*.ipynb"), *ROOT.glob("lessons/*.md")]
    hits = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in paths
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if unsafe.search(line)
    ]
    assert hits == [], f"unsafe loading: {hits}"
