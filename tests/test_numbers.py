"""Every measured number in the course's prose is traced to a cell that printed it, or to a cited source.

A lesson that says "8.4 MB", "3 epochs" or "about equal" where no cell printed it teaches a number nobody
measured. This test lists every such figure. The rule, implemented in ``utils/numbers.py``:

**Scope.** For every chapter NN that has a solution notebook ``solutions/NN_*.ipynb``:

* the lesson ``lessons/NN-*.md`` and the markdown cells of ``solutions/NN_*.ipynb`` are checked against the
  text outputs (stream text, ``text/plain``, ``text/markdown``) of that notebook's code cells, plus what its
  execution measured in ``utils/measurements.json`` (wall seconds, peak GiB) when that file exists. Outputs
  of the quiz cells (``quiz(...)``) are left out: they print the question bank, prose, not a measurement.
  The student copies in ``notebooks/`` are generated from the solutions (same markdown, no outputs).
* A figure may also be matched by the outputs of another chapter only when its sentence names that chapter
  ("chapter 01 measured ...", "lesson 03", a link to ``solutions/03_...``). A budget that a sentence quotes
  for another chapter ("chapter 01 trains 3 epochs on 2,940 conversations": a number of epochs, steps,
  conversations, examples or questions) must be one that chapter's own lesson, notebook or outputs state.
* **Lesson 09 and the bank.** Lesson 09's bank block is generated from ``utils/questions/chNN.json``, so it is
  checked once, at its source: the English ``answer_en``, ``correction`` and ``evidence`` of each entry
  (``question_en`` poses hypotheticals; ``wrong_claim`` is the myth, wrong on purpose; the Chinese text is the
  translation, whose agreement is another test's business). An entry of chapter NN is checked against chapter
  NN's outputs, and also against the literals of the entry's own ``code`` when ``code_runs`` is true:
  tests/test_quiz.py runs that snippet and it asserts its numbers, so the bank's derived arithmetic
  ("about 3.6 GB" with ``assert round(qlora_base_gb, 1) == 3.6``) is traced to a cell of its own. Its cited
  facts pass as citations. Bank files of chapters that have no notebook yet are skipped (nothing to trace
  to); they come into scope when the notebook lands. The hand-written part of lesson 09 (9.1, 9.2) is
  checked against ``solutions/09_*.ipynb`` like any lesson.

**What counts as a measured figure** (in prose: fenced code blocks, inline code and ``$...$`` / ``$$...$$``
math are not prose; lesson code runs in its own test):

* percentages: ``88.7%``, ``0.062 %``; durations: ``93 s``, ``184 ms``, ``1.5 min``; sizes: ``16.8 MB``,
  ``0.81 GiB``, ``100,360 bytes``, ``0.127 bits``; ratios: ``1.16x``, ``0.12x``, ``15x``, ``800 times
  smaller``; counts with decimals: ``4.2 M``, ``6.74 B``; and bare decimals: ``1.714``, ``4.05``, ``3.6e-06``
  (losses, perplexities, differences).

**Exempt** (not a measurement, so nothing to trace):

* configuration: a number right after ``r =``, ``rank``, ``alpha``, ``batch``, ``lr``/``learning rate``,
  ``epochs``, ``steps``, ``seed``, ``block_size``, ``max_length``, ``d_in``/``d_out``/``d_ff``,
  ``hidden_size``, ``dropout``, ``warmup``, ``clipping at``, ``max_grad_norm``, ``scale``/``scaling``, ``temperature``,
  ``threshold``, ``defaults to``... (with an optional ``=``, ``:``, ``of``, ``at``, ``to``, ``in``, ``is``, or
  inside an ``{1, 2, 4}`` list; both ends of a range: ``max_grad_norm 0.3-1.0``), a decimal followed by
  ``epochs``/``steps``; powers of ten written ``5e-4``, ``1e-5`` (learning rates, tolerances: a measured
  ``3.6e-06`` has a decimal mantissa);
* integers without a unit (counts such as 2,940 conversations, shapes, years, chapter and myth numbers),
  model sizes (``7B``, ``135 M-parameter``, ``a 0.5B-1.5B instruct model``), numbers inside names
  (``Llama-2-7B``, ``Qwen2.5-0.5B``, ``v0.21``), section numbers (headings, ``section 1.11``, ``§3.7``, and
  ``(3.10)``, ``see 3.9``, ``3.7 showed`` when a heading has that number), arXiv ids, versions (``5.23.0``,
  ``transformers 5``, ``the 4.4x series``, compute capability ``8.0``);
* number formats and hardware: sizes of at most 16 bytes (``4 bytes``, ``8-bit``), sizes per element
  (``0.5 bits per weight``, ``2 bytes/param``), capacities (``a 16 GB T4``, ``a 24 GB GPU``);
* arithmetic shown with its derivation: the result of an ``=`` or ``≈`` whose left side shows the operands in
  the same sentence (``7e9 x 16 = 112 GB``, ``8/64 + 32/(64 x 256) = 0.127 bits``, ``2**-7 ≈ 0.0078``,
  ``exp(3.8) ≈ 44.7``, ``4 N D = 2.8e18``; a line break may fall anywhere in it), the operands of such a
  derivation, and the operands of products (``4096 x 4096``, ``64 x 3 + 3 = 195``);
* text in double quotes (a wrong answer being refuted is not the course's claim);
* every figure of a sentence (a table row, a list item, a heading) that carries a citation: an arXiv id
  (``arXiv 2305.14314``, ``2305.14314``), an author-year reference (``(Hu et al., 2021)``, ``Kalajdzievski
  2023``), a URL, or a library source path (``peft/tuners/lora/layer.py``).

**Matching, "within its printed rounding".** Both sides are read as numbers in one unit: percent (a printed
fraction 0.887 is 88.7 %; a value printed after a ``%`` label, ``trainable%: 5.6001``, is a percentage),
seconds (ms, min, h converted), bytes (KB/MB/GB are 10^3/10^6/10^9, KiB/MiB/GiB 2^10/2^20/2^30: the prose
may use the printed unit or a correct conversion, 7.5 MiB is 7.9 MB but not 7.5 MB), and plain numbers
(a printed decimal stands for any unit: 93.2 can be 93 s). A prose value v written with d decimals (for
``3.6e-06``, at that exponent) matches when some printed value rounds to v at d decimals, i.e. lies within
half a unit of its last digit: ``88.7%`` is matched by 88.7%, 88.69% or 0.8869, not by 88.64% nor by a
printed 89% (which is less precise than the prose); ``1.0x`` by 1.04x but ``1.00x`` not; ``15x`` by 14.6x.
Printed integers match only figures with a unit of their own kind (a printed "2" stands for nothing but
itself); counts match any printed numeral (4,194,304 is 4.2 M). Qualifiers: ``about``/``around``/
``roughly``/``nearly``/``near``/``~``/``≈`` allow a 5% relative difference; ``under``/``below``/``less than``/
``at most``/``up to`` v need a printed value in [v/2, v], ``over``/``above``/``more than``/``at least`` one in
[v, 2v]; a loose figure is not matched by a bare fraction. In a sentence about a reduction (saves, shrinks,
smaller, less, ...) a percentage may be printed as its complement (saves 8% <- 92%). In a range or list
("95 to 100%", "0.01-1%", "14 / 26 / 66 GB") a number without a unit takes the unit after it, and each
number is checked. Matching is by value, anywhere in the chapter's outputs, not by
row: the test proves that a cell printed the number, not that the sentence describes that cell.
"""

import json

import pytest

from utils import numbers
from utils.numbers import Course, OutputPool, check_passages, check_text, figures, prose_passages

COURSE = Course()
FILES = COURSE.checked_files()


def _id(path):
    return str(path.relative_to(numbers.ROOT))


@pytest.mark.parametrize("path", FILES, ids=_id)
def test_every_measured_figure_is_printed_by_a_cell_or_cited(path):
    report = COURSE.check_file(path)
    if report.violations:
        listing = "\n".join(str(v) for v in report.violations)
        pytest.fail(
            f"{len(report.violations)} of {report.checked} figures in {_id(path)} are neither printed by a "
            f"cell of their chapter nor cited (the rule: tests/test_numbers.py):\n{listing}",
            pytrace=False,
        )


def test_every_bank_is_traced_to_its_chapters_notebook():
    """Every chapter has its notebook now, so every bank file is checked above; a bank file for a chapter without a
    solution notebook would have nothing to trace its figures to."""
    waiting = {
        path.name: sum(len(figures(p)) for p in numbers.bank_passages(path))
        for path in COURSE.unchecked_banks()
    }
    assert waiting == {}, f"bank files whose chapter has no solution notebook (figures untraced): {waiting}"


def test_the_rule_sees_the_course_figures():
    """Guards against an extractor that silently finds nothing: the course's prose holds dozens of figures."""
    assert sum(COURSE.check_file(p).checked for p in FILES) >= 50


# --- the extractor ---------------------------------------------------------------------------------------


SECTIONS = frozenset({"3.9", "3.10"})  # the course's headings, in the real test


def _figures(text: str) -> list[tuple[str, str]]:
    return [(f.text, f.kind) for p in prose_passages(text, "t") for _, f in figures(p, SECTIONS)]


def test_extractor_finds_every_kind_of_figure():
    text = (
        "It reached 88.7% and 0.062 % in 93 s, 184 ms or 1.5 min; the file is 16.8 MB, 0.81 GiB, "
        "100,360 bytes; LoRA is 1.16x slower, the update 0.12x and 15x; perplexity 1.714, logits 4.05 "
        "and 3.6e-06; 4.2 M trained."
    )
    assert _figures(text) == [
        ("88.7%", "percent"),
        ("0.062 %", "percent"),
        ("93 s", "duration"),
        ("184 ms", "duration"),
        ("1.5 min", "duration"),
        ("16.8 MB", "size"),
        ("0.81 GiB", "size"),
        ("100,360 bytes", "size"),
        ("1.16x", "ratio"),
        ("0.12x", "ratio"),
        ("15x", "ratio"),
        ("1.714", "plain"),
        ("4.05", "plain"),
        ("3.6e-06", "plain"),
        ("4.2 M", "count"),
    ]


@pytest.mark.parametrize(
    "text",
    [
        "LoRA at r = 8, alpha 16, lr 5e-3, batch 16, dropout 0.05, gradient clipping at 1.0, r in {1, 2, 4}.",
        "Train 2 epochs over 2,940 conversations, batch 16, 0.5 epochs of warmup, a 7B model, 135 M-params.",
        "Inline `trainable%: 5.6001` and math $\\sqrt{128} \\approx 11.3$ are not prose.",
        "```python\nprint('88.7%')  # 1.5 s\n```\n",
        "Full fine-tuning: 7e9 x 16 = 112 GB, and 8/64 + 32/(64 x 256) = 0.127 bits; a 4096 x 4096 layer.",
        "fp32 is 4 bytes, bf16 has an 8-bit exponent, NF4 costs 0.5 bits per weight, 2 bytes/param.",
        "It fits a 16 GB T4 or a 24 GB GPU.",
        "transformers 5.23.0 (transformers 5, the 4.4x series); arXiv 2305.14314; in 2023; myth 19; see 3.9.",
        "## 3.7 The scale",
        "Measured in section 1.11 and (3.10).",
        'The myth says "LoRA makes each step 10x cheaper".',
        "The layer is a dozen lines; it matched to 1e-5.",
        "k_proj maps 896 to 2 x 64 = 128, not to 896.",
        "Use max_grad_norm 0.3-1.0 and a learning rate of 1.5e-4 to 2.5e-4; dropout defaults to 0.0.",
    ],
)
def test_exempt_numbers_are_not_figures(text):
    assert _figures(text) == []


def test_a_range_gives_both_ends_the_unit():
    assert _figures("Fact questions fell to 25 to 40%.") == [("25%", "percent"), ("40%", "percent")]


# --- the matcher -----------------------------------------------------------------------------------------


def _untraced(text: str, *outputs: str) -> list[str]:
    report = check_text(text, list(outputs))
    assert report.checked, f"no figure found in {text!r}"
    return [v.figure for v in report.violations]


def test_a_printed_figure_passes_and_an_absent_one_fails():
    assert _untraced("The loop reaches 88.7% exact match.", "exact match 88.7%") == []
    assert _untraced("The adapter is 8.4 MB.", "adapter 16.8 MB") == ["8.4 MB"]
    assert _untraced("It trains in 93 s.") == ["93 s"]  # nothing printed at all


@pytest.mark.parametrize(
    ("prose", "printed", "traced"),
    [
        ("88.7%", "88.7%", True),
        ("88.7%", "0.8869", True),  # a fraction is a percentage
        ("88.7%", "88.69%", True),
        ("88.7%", "88.64%", False),  # rounds to 88.6
        ("88.69%", "88.7%", False),  # the prose claims a digit no cell printed
        ("89%", "88.7%", True),
        ("1.0x", "1.04 x", True),
        ("1.00x", "1.04 x", False),
        ("15x", "14.6x", True),
        ("15x", "14.4x", False),
        ("1.16x", "full 159 ms, LoRA 184 ms (1.16 x)", True),
        ("184 ms", "0.184 s", True),
        ("1.5 min", "90 s", True),
        ("7.9 MB", "7.88 MB", True),
        ("7.9 MB", "7.5 MiB", True),  # a correct conversion
        ("7.5 MB", "7.5 MiB", False),  # MB is not MiB
        ("100,360 bytes", "100.36 KB", True),
        ("4.2 M", "4,194,304 trainable", True),
        ("3.6e-06", "max |difference| = 3.6e-06", True),
        ("3.6e-06", "max |difference| = 3.4e-06", False),
        ("1.714", "perplexity 1.7141", True),
        ("1.714", "perplexity 1.72", False),
        ("5.6 %", "trainable%: 5.6001", True),
        ("2 %", "2 layers", False),  # a printed integer is no percentage
        ("about 25 s", "24 s", True),  # about: 5%
        ("about 25 s", "22 s", False),
        ("under 2%", "1.9%", True),
        ("under 2%", "0.0%", False),  # a bound must be near: [v/2, v]
        ("over 80%", "88.7%", True),
    ],
)
def test_matching_within_printed_rounding(prose, printed, traced):
    assert (_untraced(f"It measured {prose} here.", printed) == []) is traced


def test_a_saving_may_be_printed_as_its_complement():
    assert _untraced("gzip saves 8% of the file.", "gzip -9: 433,813 bytes (92%)") == []
    assert _untraced("gzip leaves 8% of the file.", "gzip -9: 433,813 bytes (92%)") == ["8%"]


@pytest.mark.parametrize(
    "citation",
    [
        "(Dettmers et al. 2023, arXiv:2305.14314)",
        "(arXiv 2305.14314)",
        "(Hu et al., 2021)",
        "(Kalajdzievski 2023)",
        "([source](https://github.com/huggingface/peft))",
        "(`peft/tuners/lora/layer.py`)",
    ],
)
def test_a_cited_figure_passes_without_output(citation):
    report = check_text(f"QLoRA reaches 99.3% of ChatGPT {citation}.", [])
    assert report.checked == 1 and report.violations == []


def test_a_citation_covers_its_sentence_only():
    text = "QLoRA reaches 99.3% of ChatGPT (arXiv 2305.14314). Our run reaches 41.2%."
    assert [v.figure for v in check_text(text, []).violations] == ["41.2%"]


def test_another_chapter_counts_only_when_named():
    chapter_01 = OutputPool(["exact match 88.7%"])
    text = "Chapter 01 measured 88.7%. The loop reaches 88.7%."
    report = check_passages(
        prose_passages(text, "t"), OutputPool([]), "own", chapter="03", other_pool={"01": chapter_01}.get
    )
    assert [(v.location, v.figure) for v in report.violations] == [("t:1", "88.7%")]


def test_a_budget_quoted_for_another_chapter_must_be_that_chapter_s():
    said = "Same budget for every run (2 epochs over 2,940 conversations, batch 16)."
    for claim, ok in [("trains 2 epochs on all 2,940 conversations", True), ("trains 3 epochs", False)]:
        report = check_passages(
            prose_passages(f"Chapter 01 {claim}.", "t"),
            OutputPool([]),
            "own",
            chapter="03",
            other_text={"01": said}.get,
        )
        assert (report.violations == []) is ok, claim
    violation = str(report.violations[0])
    assert "3 epochs" in violation and "chapter 01" in violation


def test_violation_names_file_line_sentence_and_figure():
    text = "# Title\n\nThe adapter of Llama-2-7B\nis 8.4 MB in bf16."
    (violation,) = check_passages(
        prose_passages(text, "lessons/04-lora-peft.md"), OutputPool([]), "solutions/04.ipynb"
    ).violations
    assert str(violation) == (
        'lessons/04-lora-peft.md:4: "The adapter of Llama-2-7B is 8.4 MB in bf16." -> 8.4 MB not found in '
        "solutions/04.ipynb outputs and no citation"
    )


# --- the course's files ------------------------------------------------------------------------------------


def test_quiz_cells_are_not_measurements(tmp_path):
    nb = {
        "cells": [
            {
                "cell_type": "code",
                "source": "print(x)",
                "outputs": [{"output_type": "stream", "text": "1.714\n"}],
            },
            {
                "cell_type": "code",
                "source": "quiz(chapter=1)",
                "outputs": [{"output_type": "stream", "text": "8.4 MB"}],
            },
            {
                "cell_type": "code",
                "source": "x",
                "outputs": [{"output_type": "execute_result", "data": {"text/plain": "0.5"}}],
            },
        ]
    }
    (tmp_path / "nb.ipynb").write_text(json.dumps(nb))
    assert numbers.notebook_outputs(tmp_path / "nb.ipynb") == ["1.714\n", "0.5"]


def test_a_bank_figure_is_traced_by_its_runnable_snippet(tmp_path, monkeypatch):
    monkeypatch.setattr(numbers, "ROOT", tmp_path)
    entry = {"id": "04-size", "answer_en": "It is about 16.8 MB, 13.5 GB for the model.", "link": "x"}
    path = tmp_path / "ch04.json"
    path.write_text(json.dumps([{**entry, "code": "assert round(x, 1) == 16.8  # 13.5", "code_runs": True}]))
    report = check_passages(numbers.bank_passages(path), OutputPool([]), "own")
    assert [v.figure for v in report.violations] == ["13.5 GB"]  # a comment asserts nothing
    assert report.violations[0].location == "ch04.json:04-size.answer_en"
    path.write_text(json.dumps([{**entry, "code": "assert round(x, 1) == 16.8", "code_runs": False}]))
    assert len(check_passages(numbers.bank_passages(path), OutputPool([]), "own").violations) == 2
