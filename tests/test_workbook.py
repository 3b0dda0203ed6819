import nbformat
import pytest

from utils import workbook


def _nb(*cells):
    nb = nbformat.v4.new_notebook()
    nb.cells = list(cells)
    return nb


def test_solution_region_becomes_not_implemented_and_keeps_indentation():
    src = "def f(x):\n    ### BEGIN SOLUTION\n    return 2 * x\n    ### END SOLUTION\n\nprint(f)"
    cell = nbformat.v4.new_code_cell(src)
    cell.outputs = [nbformat.v4.new_output("stream", text="hi")]
    student = workbook.make_student(_nb(cell)).cells[0]
    assert "return 2 * x" not in student.source
    assert "    raise NotImplementedError(" in student.source
    assert student.source.endswith("print(f)")
    assert student.outputs == [] and student.execution_count is None


def test_hidden_tests_and_check_output_markers_are_removed():
    src = "# NBVAL_CHECK_OUTPUT\nx = 1\n### BEGIN HIDDEN TESTS\nassert x == 1\n### END HIDDEN TESTS"
    student = workbook.make_student(_nb(nbformat.v4.new_code_cell(src))).cells[0]
    assert student.source == "x = 1"


def test_markdown_answer_region():
    src = "Why?\n### BEGIN SOLUTION\nBecause.\n### END SOLUTION"
    student = workbook.make_student(_nb(nbformat.v4.new_markdown_cell(src))).cells[0]
    assert "Because" not in student.source and "YOUR ANSWER HERE" in student.source


def test_unbalanced_markers_are_an_error():
    with pytest.raises(ValueError, match="without"):
        workbook.make_student(_nb(nbformat.v4.new_code_cell("### BEGIN SOLUTION\nx = 1")))


def test_header_pins_match_pyproject_and_never_install_torch():
    cells = workbook.header_cells("00_setup.ipynb")
    pins = workbook.pinned_versions()
    assert f"peft=={pins['peft']}" in cells[1].source
    assert f"transformers=={pins['transformers']}" in cells[1].source
    assert "torch==" not in cells[1].source
    assert "colab.research.google.com/github/" in cells[0].source


def test_notebooks_are_current_with_solutions():
    stale = workbook.sync_all(check_only=True)
    assert not stale, f"run `make notebooks`: stale {stale}"


def test_every_solution_exercise_has_a_region_and_a_check():
    for path in sorted(workbook.SOLUTIONS.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
        assert code.count(workbook.BEGIN_SOLUTION) == code.count(workbook.END_SOLUTION), path.name
        if workbook.BEGIN_SOLUTION in code:
            assert "check_" in code, f"{path.name} has an exercise but calls no checker"


def test_header_title_and_setup_cell_come_from_the_manifest():
    from utils import course

    cells = workbook.header_cells("03_lora_math.ipynb")
    assert cells[0].source.startswith("# 03 LoRA: the math and parameter counting\n")
    assert 'env.setup_notebook(packages=("torch", "transformers", "peft"))' in cells[2].source
    with pytest.raises(ValueError, match="No chapter has the notebook"):
        workbook.header_cells("99_nothing.ipynb")
    assert course.chapter(3).solution.name == "03_lora_math.ipynb"


def test_no_solution_cell_repeats_what_the_setup_cell_does():
    for path in sorted(workbook.SOLUTIONS.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        body = [
            c.source
            for c in nb.cells
            if c.cell_type == "code" and workbook.HEADER_TAG not in c.metadata.get("tags", [])
        ]
        for src in body:
            for repeated in ("quiet_library_noise()", "set_num_threads(", "setup_notebook("):
                assert repeated not in src, f"{path.name}: {repeated} belongs to the generated setup cell"


def test_readme_course_map_is_generated_from_the_manifest():
    from utils import course

    text = (workbook.ROOT / "README.md").read_text()
    assert workbook.readme_text(text) == text, "run `make notebooks` to refresh the README course map"
    for ch in course.CHAPTERS:
        assert f"| {ch.id} | {ch.short_title} |" in text


# The notebook tests run each student copy's exercise and check cells inside its solution's run
# (utils.workbook.nbtest_notebook); that covers the student copy only if no later cell depends on the exercise.


def test_no_cell_after_an_exercise_uses_the_learners_names():
    for path in sorted(workbook.SOLUTIONS.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        assert workbook.exercise_dependencies(nb) == [], path.name
        for i, j in workbook.exercises(nb):
            assert "check" in nb.cells[j].source, (
                f"{path.name}: cell {j} after exercise cell {i} is not its check"
            )


def _toy_solution(*sources):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(s) for s in sources]
    return nb


EXERCISE = "def double(x):\n    ### BEGIN SOLUTION\n    return 2 * x\n    ### END SOLUTION"
CHECK = "checks.run_check('double', double, lambda f: f(3))"


def test_a_later_cell_that_calls_the_exercise_is_found():
    nb = _toy_solution("from utils import checks", EXERCISE, CHECK, "y = double(4)", "z = 5")
    assert workbook.exercises(nb) == [(1, 2)]
    problems = workbook.exercise_dependencies(nb)
    assert len(problems) == 1 and "cell 3 reads ['double']" in problems[0]
    nb = _toy_solution(EXERCISE, "ok = checks.run_check('double', double, lambda f: f(3))", "print(ok)")
    assert "cell 2 reads ['ok']" in workbook.exercise_dependencies(nb)[0]  # the check's result differs too


def test_nbtest_notebook_runs_the_stub_and_its_check_then_the_solution_again():
    nb = _toy_solution("from utils import checks", EXERCISE, CHECK, "z = 5")
    cells = [c.source for c in workbook.nbtest_notebook(nb).cells]
    assert cells[:3] == [c.source for c in nb.cells[:3]] and cells[-1] == "z = 5"
    inserted = cells[3:-1]
    assert len(inserted) == 4 and "save_state()" in inserted[0]
    assert "raise NotImplementedError" in inserted[1] and inserted[2] == CHECK
    assert inserted[3].startswith("_nbtest.expect_not_attempted") and "return 2 * x" in inserted[3]
    namespace = {}
    for source in cells:  # runs as a kernel would: the stub's check reports "not attempted", then z is set
        exec(source, namespace)
    assert namespace["z"] == 5 and namespace["double"](2) == 4


def test_expect_not_attempted_fails_when_a_stub_passes_or_no_check_ran():
    from utils.checks import core

    state = workbook.save_state()
    with pytest.raises(AssertionError, match="not attempted"):
        workbook.expect_not_attempted(state)  # no check ran at all
    core.run_check("double", lambda x: 2 * x, lambda f: f(3))
    with pytest.raises(AssertionError, match="not attempted"):
        workbook.expect_not_attempted(state)  # a check that passed: the stub was not a stub
    import torch

    before = torch.get_rng_state()
    state = workbook.save_state()
    torch.rand(3)
    workbook.restore_state(state)
    assert torch.equal(torch.get_rng_state(), before)


def test_the_title_appears_once():
    from utils import course

    for path in sorted(workbook.SOLUTIONS.glob("*.ipynb")):
        heading = course.by_notebook(path.name).heading
        nb = nbformat.read(path, as_version=4)
        titles = [
            i for i, c in enumerate(nb.cells) if c.cell_type == "markdown" and c.source.strip() == heading
        ]
        assert titles == [], f"{path.name}: cells {titles} repeat the title the header cell already shows"
