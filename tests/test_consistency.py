"""The course as a whole: pins agree, every chapter has its three views and its README row, lesson
code runs, and every relative link resolves."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent
LESSONS = sorted((ROOT / "lessons").glob("*.md"))
SOLUTIONS = sorted((ROOT / "solutions").glob("*.ipynb"))


def _pins_pyproject() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] + [
        s for extra in project["optional-dependencies"].values() for s in extra
    ]
    return dict(s.lower().split("==") for s in specs)


def _pins_environment() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "environment.yml").read_text().splitlines():
        m = re.match(r"\s*-\s*([A-Za-z0-9_.\-]+)==([^\s#]+)", line)
        if m:
            pins[m.group(1).lower()] = m.group(2)
    return pins


def test_environment_yml_has_the_same_pins_as_pyproject():
    assert _pins_environment() == _pins_pyproject()


def test_makefile_installs_the_same_torch_as_pyproject():
    torch_pin = re.search(r"TORCH\s*:=\s*torch==(\S+)", (ROOT / "Makefile").read_text()).group(1)
    assert torch_pin == _pins_pyproject()["torch"]


def test_ci_calls_make_test_and_readme_shows_both_commands():
    assert "make test" in (ROOT / ".ci/run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "make lab" in readme and "make test" in readme


@pytest.mark.parametrize("solution", SOLUTIONS, ids=lambda p: p.name)
def test_each_chapter_has_lesson_notebook_and_readme_row(solution):
    number = solution.name[:2]
    lessons = list((ROOT / "lessons").glob(f"{number}-*.md"))
    assert len(lessons) == 1, f"chapter {number} needs exactly one lesson, found {lessons}"
    assert (ROOT / "notebooks" / solution.name).exists()
    readme = (ROOT / "README.md").read_text()
    row = [
        line for line in readme.splitlines() if line.startswith("|") and f"lessons/{lessons[0].name}" in line
    ]
    assert row, f"README course map has no row for {lessons[0].name}"
    assert f"notebooks/{solution.name}" in row[0] and "colab" in row[0].lower()


def _github_anchor(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".ipynb":
        import nbformat

        nb = nbformat.reads(text, as_version=4)
        text = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return {_github_anchor(m) for m in re.findall(r"^#{1,6}\s+(.+)$", text, flags=re.M)}


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
