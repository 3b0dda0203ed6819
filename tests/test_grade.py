"""utils.grade on generated submissions: a toy course of two exercises from chapters 02 and 03, with real checkers,
and four learners: all right, one wrong, untouched, and one whose notebook breaks before the second check."""

import csv
import json

import nbformat
import pytest

from utils import grade, workbook

BYTES = """def full_finetuning_bytes(n_params, precision):
    ### BEGIN SOLUTION
    weight = {"fp32": 4, "mixed": 2, "bf16": 2}[precision]
    moment = 2 if precision == "bf16" else 4
    master = 4 if precision == "mixed" else 0
    return {"weights": weight * n_params, "gradients": weight * n_params, "optimizer": (master + 2 * moment) * n_params}
    ### END SOLUTION"""
COUNT = """def count_lora_llama(config, rank, target_modules):
    ### BEGIN SOLUTION
    d, d_ff = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    shapes = {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
              "gate_proj": (d, d_ff), "up_proj": (d, d_ff), "down_proj": (d_ff, d)}
    return config.num_hidden_layers * sum(rank * sum(shapes[t]) for t in target_modules)
    ### END SOLUTION"""
# The classic mistake: 16 bytes per parameter for every precision (no fp32 master copy rule, no bf16 state).
BYTES_WRONG = """def full_finetuning_bytes(n_params, precision):
    return {"weights": 2 * n_params, "gradients": 2 * n_params, "optimizer": 12 * n_params}"""


def _notebook(*sources):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# 99 toy")] + [nbformat.v4.new_code_cell(s) for s in sources]
    return nb


def _solution():
    return _notebook(
        "from utils import checks",
        BYTES,
        "checks.check_full_finetuning_bytes(full_finetuning_bytes)",
        COUNT,
        "checks.check_lora_count(count_lora_llama)",
    )


@pytest.fixture(scope="module")
def course(tmp_path_factory):
    root = tmp_path_factory.mktemp("course")
    (root / "solutions").mkdir()
    solution = _solution()
    nbformat.write(solution, root / "solutions" / "99_toy.ipynb")
    student = workbook.make_student(solution)
    submissions = {
        "alice": solution,
        "bob": _notebook(
            "from utils import checks",
            BYTES_WRONG,
            "checks.check_full_finetuning_bytes(full_finetuning_bytes)",
            COUNT,
            "checks.check_lora_count(count_lora_llama)",
        ),
        "carol": student,
        "dave": _notebook(
            "from utils import checks",
            BYTES,
            "checks.check_full_finetuning_bytes(full_finetuning_bytes)",
            "import time\ntime.sleep(60)",  # a cell that never ends: the time limit stops the notebook
            COUNT,
            "checks.check_lora_count(count_lora_llama)",
        ),
    }
    for learner, nb in submissions.items():
        (root / "submissions" / learner).mkdir(parents=True)
        nbformat.write(nb, root / "submissions" / learner / "99_toy.ipynb")
    grades = grade.grade_all(
        [root / "submissions" / name for name in ("alice", "bob", "carol")],
        timeout=300,
        solutions=root / "solutions",
    )
    grades |= grade.grade_all([root / "submissions" / "dave"], timeout=15, solutions=root / "solutions")
    return root, grades


def test_expected_exercises_come_from_the_solution(course):
    root, _ = course
    assert grade.expected_checks("99_toy.ipynb", root / "solutions") == [
        "check_full_finetuning_bytes",
        "check_lora_count",
    ]
    with pytest.raises(FileNotFoundError, match="not a course notebook"):
        grade.expected_checks("42_unknown.ipynb", root / "solutions")


def test_each_learner_gets_what_the_checkers_said(course):
    _, grades = course
    status = {learner: [g.status for g in rows] for learner, rows in grades.items()}
    assert status == {
        "alice": ["right", "right"],
        "bob": ["wrong", "right"],
        "carol": ["not attempted", "not attempted"],
        "dave": ["right", "not run"],
    }
    bob_bytes = grades["bob"][0]
    assert "precision='fp32'" in bob_bytes.reason and "return 2 * x" not in bob_bytes.reason
    assert "time limit" in grades["dave"][1].reason


def test_table_csv_and_json(course, tmp_path):
    root, grades = course
    text = grade.table(grades)
    assert (
        "alice        score 2/2" in text
        and "bob          score 1/2" in text
        and "carol        score 0/2" in text
    )
    grade.write_csv(grades, tmp_path / "g.csv")
    rows = list(csv.reader(open(tmp_path / "g.csv", encoding="utf-8")))
    assert rows[0] == [
        "learner",
        "99_toy.ipynb:check_full_finetuning_bytes",
        "99_toy.ipynb:check_lora_count",
        "score",
    ]
    assert rows[1:] == [
        ["alice", "1", "1", "2"],
        ["bob", "0", "1", "1"],
        ["carol", "0", "0", "0"],
        ["dave", "1", "0", "1"],
    ]


def test_command_line_and_bad_input(course, tmp_path, capsys):
    root, _ = course
    out = tmp_path / "g.json"
    code = grade.main([str(root / "submissions" / "alice" / "99_toy.ipynb"), "--solutions", str(root / "solutions"),
                       "--json", str(out), "--timeout", "60"])  # fmt: skip
    assert code == 0 and json.loads(out.read_text())["-"][0]["status"] == "right"
    assert grade.main([str(tmp_path / "missing")]) == 2
    assert "No notebook or folder" in capsys.readouterr().err


def test_a_checker_of_two_parts_is_right_only_when_both_are():
    from utils.checks.core import verdict

    def part(invocation, result, message=""):
        return {
            "checker": "check_blockwise_absmax",
            "invocation": invocation,
            "result": result,
            "message": message,
        }

    assert verdict([]) == ("not run", "its check did not run")
    assert verdict([part(1, False, "codes off"), part(1, True)]) == ("wrong", "codes off")  # quantize wrong
    assert verdict([part(1, True), part(1, None)]) == ("not attempted", "")  # dequantize still a stub
    assert verdict([part(1, False, "x"), part(1, True), part(2, True), part(2, True)]) == (
        "right",
        "",
    )  # re-run


def test_invocations_tell_two_calls_of_one_checker_apart(capsys):
    from utils.checks import core

    def check_two_parts(a, b):
        core.run_check("part a", a, lambda f: f())
        core.run_check("part b", b, lambda f: f())

    start = len(core.RESULTS)
    check_two_parts(lambda: None, lambda: None)
    check_two_parts(lambda: None, lambda: None)
    calls = [r.invocation for r in core.RESULTS[start:]]
    assert calls[0] == calls[1] and calls[2] == calls[3] and calls[1] != calls[2]
    assert core.last_check_passed()
