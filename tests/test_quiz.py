"""The interview question bank: schema, languages, links, coverage, myths, and every way to use it."""

import csv
import difflib
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from utils import quiz

ROOT = Path(__file__).resolve().parent.parent
QUESTION_FILES = sorted((ROOT / "utils" / "questions").glob("ch*.json"))
BANK = quiz.load_questions()


def _plain_env() -> dict[str, str]:
    """The environment of a plain Python process: no CI markers, no forced text mode."""
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_CURRENT_TEST", "COURSE_QUIZ_TEXT")}
    return {**env, "PYTHONIOENCODING": "utf-8"}


def _run(args: list[str], stdin: str = "", env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        input=stdin,
        capture_output=True,
        text=True,
        encoding="utf-8",
        cwd=ROOT,
        env=env or _plain_env(),
        timeout=120,
    )


# ---------------------------------------------------------------- schema


def _good_entry() -> dict:
    return {
        "id": "03-example",
        "chapter": 3,
        "difficulty": "easy",
        "tags": ["parameter-counting"],
        "question_en": "How many parameters?",
        "question_zh": "有多少参数？",
        "answer_en": "r (d_in + d_out).",
        "answer_zh": "r (d_in + d_out) 个。",
        "link": quiz.chapter_link(3),
    }


def test_validate_entry_accepts_a_good_entry_and_names_each_problem():
    assert quiz.validate_entry(_good_entry()) == []
    bad = {
        **_good_entry(),
        "id": "04-example",
        "difficulty": "trivial",
        "tags": ["Not A Tag"],
        "answer_zh": "only English here",
        "answer_en": "   ",
        "colour": "red",
        "myth": True,
        "myth_number": 21,
        "link": "lessons/09-interview-questions.md#no-such-heading",
    }
    problems = "\n".join(quiz.validate_entry(bad))
    for expected in (
        "must start with the chapter number 03",
        "difficulty must be one of",
        "tag 'Not A Tag'",
        "answer_zh must be written in Chinese",
        "answer_en must be a non-empty string",
        "unknown key 'colour'",
        "myth_number must be an integer 1..20",
        "a myth needs a non-empty evidence",
        "no heading in lessons/09-interview-questions.md has the anchor #no-such-heading",
    ):
        assert expected in problems
    assert "no file" in quiz.validate_entry({**_good_entry(), "link": "lessons/nope.md"})[0]
    assert "belongs only to myth entries" in quiz.validate_entry({**_good_entry(), "correction": "x"})[0]


@pytest.mark.parametrize("path", QUESTION_FILES, ids=lambda p: p.name)
def test_each_file_is_a_list_of_its_own_chapter(path):
    entries = json.loads(path.read_text(encoding="utf-8"))
    assert isinstance(entries, list) and entries
    assert {e["chapter"] for e in entries} == {int(path.stem[2:])}


@pytest.mark.parametrize("entry", BANK, ids=lambda e: str(e.get("id")))
def test_entry_is_valid(entry):
    assert quiz.validate_entry(entry) == []


def test_every_entry_has_both_languages():
    for entry in BANK:
        for key in ("question_en", "answer_en", "question_zh", "answer_zh"):
            assert entry[key].strip(), f"{entry['id']}: empty {key}"
        assert quiz._CJK_RE.search(entry["question_zh"]) and quiz._CJK_RE.search(entry["answer_zh"])


def test_ids_are_unique():
    ids = [e["id"] for e in BANK]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)


def test_no_near_duplicate_questions():
    pairs = []
    for a, b in itertools.combinations(BANK, 2):
        matcher = difflib.SequenceMatcher(None, a["question_en"].lower(), b["question_en"].lower())
        if matcher.real_quick_ratio() > 0.9 and matcher.quick_ratio() > 0.9 and matcher.ratio() > 0.9:
            pairs.append((a["id"], b["id"]))
    assert pairs == []


@pytest.mark.parametrize("chapter", list(quiz.CHAPTERS))
def test_at_least_eight_entries_per_chapter(chapter):
    assert len(quiz.load_questions(chapter)) >= 8


# ---------------------------------------------------------------- links


def test_github_anchor_and_heading_scan():
    assert quiz.github_anchor("Chapter 03: LoRA: the math and parameter counting") == (
        "chapter-03-lora-the-math-and-parameter-counting"
    )
    assert quiz.github_anchor("9.2.1 LoRA `r` (d_in + d_out)") == "921-lora-r-d_in--d_out"
    text = "# Title\n\n```python\n# not a heading\n```\n\n## Same\n\n## Same\n\n    # indented code\n"
    assert quiz.markdown_anchors(text) == {"title", "same", "same-1"}


def test_every_chapter_link_points_at_a_heading_of_lesson_09():
    anchors = quiz.markdown_anchors(quiz.LESSON_PATH.read_text(encoding="utf-8"))
    for chapter in quiz.CHAPTERS:
        assert quiz.chapter_link(chapter).split("#")[1] in anchors
    assert {e["id"] for e in BANK} <= anchors  # every entry has its own heading


def test_links_resolve():
    problems = [f"{e['id']}: {quiz.link_problem(e['link'])}" for e in BANK if quiz.link_problem(e["link"])]
    assert problems == []


# ---------------------------------------------------------------- myths and coverage


def test_all_twenty_myths_appear_exactly_once():
    numbers = sorted(e["myth_number"] for e in BANK if e.get("myth"))
    assert numbers == list(range(1, quiz.N_MYTHS + 1))


def test_myth_evidence_is_concrete():
    for entry in (e for e in BANK if e.get("myth")):
        evidence = entry["evidence"]
        assert len(evidence) >= 40 and ("code" in entry or "`" in evidence or "(" in evidence), entry["id"]


def _covered(entries: list[dict], tags: tuple[str, ...]) -> bool:
    return any(set(tags) <= set(e["tags"]) for e in entries)


def test_topic_map_names_every_chapter():
    assert set(quiz.SYLLABUS_TOPICS) == set(quiz.CHAPTERS)
    assert _covered([{"tags": ["a", "b"]}], ("a", "b")) and not _covered([{"tags": ["a"]}], ("a", "b"))


@pytest.mark.parametrize(
    "chapter, topic",
    [(ch, topic) for ch, topics in quiz.SYLLABUS_TOPICS.items() for topic in topics],
    ids=lambda value: str(value),
)
def test_every_syllabus_topic_of_a_chapter_has_an_entry(chapter, topic):
    assert _covered(quiz.load_questions(chapter), quiz.SYLLABUS_TOPICS[chapter][topic])


@pytest.mark.parametrize("topic", list(quiz.BANK_TOPICS))
def test_every_cross_chapter_topic_has_an_entry(topic):
    assert _covered(BANK, quiz.BANK_TOPICS[topic])


# ---------------------------------------------------------------- runnable snippets

_SNIPPET_RUNNER = """
import json, sys, traceback
failed = []
for name, code in json.load(sys.stdin):
    try:
        exec(compile(code, name, "exec"), {"__name__": "__snippet__"})
    except Exception:
        failed.append(name)
        traceback.print_exc()
print(json.dumps(failed))
"""


def _failing_snippets(snippets: list[tuple[str, str]]) -> list[str]:
    """Run each snippet in a fresh namespace of one subprocess; the names of those that raised."""
    result = _run(["-c", _SNIPPET_RUNNER], stdin=json.dumps(snippets))
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_runnable_snippets_run_standalone():
    snippets = [(e["id"], e["code"]) for e in BANK if e.get("code_runs")]
    assert len(snippets) >= 40
    assert _failing_snippets(snippets + [("deliberately-wrong", "assert 1 + 1 == 3")]) == [
        "deliberately-wrong"
    ]


# ---------------------------------------------------------------- loading and the notebook quiz


def test_load_questions_filters_and_rejects_unknown_values():
    chapter_3 = quiz.load_questions(3)
    assert chapter_3 and {e["chapter"] for e in chapter_3} == {3}
    assert all("scaling" in e["tags"] for e in quiz.load_questions(tags="scaling"))
    either = quiz.load_questions(tags=["rslora", "merge"])
    assert {e["id"] for e in either} >= {"03-rslora", "03-merge-unmerge"}
    with pytest.raises(ValueError, match=r"0\.\.10"):
        quiz.load_questions(11)
    with pytest.raises(ValueError, match="valid tags: .*parameter-counting"):
        quiz.load_questions(tags=["no-such-tag"])
    with pytest.raises(ValueError, match="language"):
        quiz.quiz(lang="fr")


def test_select_questions_shuffles_reproducibly():
    first = [e["id"] for e in quiz.select_questions(3, seed=0, n=5)]
    assert first == [e["id"] for e in quiz.select_questions(3, seed=0, n=5)]
    assert first != [e["id"] for e in quiz.select_questions(3, seed=None, n=5)]
    assert len(first) == 5


def test_widgets_render_only_in_a_live_kernel_outside_ci(monkeypatch):
    import IPython

    class Kernel:
        kernel = object()

    for name in ("CI", "PYTEST_CURRENT_TEST", "COURSE_QUIZ_TEXT"):
        monkeypatch.delenv(name, raising=False)
    assert not quiz.widgets_can_render()  # no IPython kernel in a pytest process
    monkeypatch.setattr(IPython, "get_ipython", lambda: Kernel())
    assert quiz.widgets_can_render()
    monkeypatch.setenv("COURSE_QUIZ_TEXT", "1")
    assert not quiz.widgets_can_render()
    monkeypatch.delenv("COURSE_QUIZ_TEXT")
    monkeypatch.setenv("CI", "true")
    assert not quiz.widgets_can_render()


def test_quiz_prints_text_in_a_plain_process():
    code = "from utils.quiz import quiz; quiz(chapter=3, n=2, seed=0)"
    result = _run(["-c", code])
    assert result.returncode == 0, result.stderr
    first = quiz.select_questions(3, seed=0, n=2)[0]
    assert first["question_en"] in result.stdout and first["answer_en"] in result.stdout
    assert "2 questions from chapter 03" in result.stdout
    chinese = _run(["-c", code.replace("seed=0)", "seed=0, lang='zh')")])
    assert first["question_zh"] in chinese.stdout


def test_quiz_falls_back_to_text_under_pytest(capsys):
    quiz.quiz(tags="rslora")
    assert "03-rslora" in capsys.readouterr().out


def test_quiz_in_a_kernel_shows_widgets_and_a_line_for_static_views(monkeypatch, capsys):
    import IPython.display

    shown = []
    monkeypatch.setattr(quiz, "widgets_can_render", lambda: True)
    monkeypatch.setattr(IPython.display, "display", lambda obj, **kwargs: shown.append(obj))
    quiz.quiz(chapter=4, n=3)
    assert "3 questions from chapter 04" in capsys.readouterr().out
    assert len(shown) == 1
    bundle = shown[0]  # the widget's own display data, with the text quiz as its plain-text form
    assert "application/vnd.jupyter.widget-view+json" in bundle
    entries = quiz.select_questions(4, seed=0, n=3)
    assert bundle["text/plain"].startswith(quiz.WIDGET_FALLBACK)
    assert all(
        e["question_en"] in bundle["text/plain"] and e["answer_en"] in bundle["text/plain"] for e in entries
    )
    assert "VBox" not in bundle["text/plain"]
    assert bundle["application/vnd.jupyter.widget-view+json"][
        "model_id"
    ]  # the deck's model, for a widget front end


def test_text_true_forces_text_and_a_broken_widget_library_falls_back(monkeypatch, capsys):
    import IPython.display

    shown = []
    monkeypatch.setattr(quiz, "widgets_can_render", lambda: True)
    monkeypatch.setattr(IPython.display, "display", lambda obj, **kwargs: shown.append(obj))
    quiz.quiz(chapter=4, n=2, text=True)
    assert shown == [] and "text mode" in capsys.readouterr().out

    def broken(*args):
        raise RuntimeError("no comm")

    monkeypatch.setattr(quiz, "_quiz_widget", broken)
    quiz.quiz(chapter=4, n=2)
    out = capsys.readouterr().out
    assert "widgets unavailable: no comm; showing text" in out and "text mode" in out


def test_quiz_widget_reveals_grades_and_switches_language():
    entries = quiz.select_questions(3, seed=0, n=2)
    deck = quiz._quiz_widget(entries, "en")
    language, card, buttons, score = deck.children
    show, knew, missed, again = buttons.children
    assert entries[0]["question_en"] in card.value and entries[0]["answer_en"] not in card.value
    assert knew.disabled and not show.disabled
    show.click()
    assert quiz._inline_html(entries[0]["answer_en"]) in card.value and not knew.disabled
    knew.click()
    assert "1/1" in score.value and "2/2" in card.value
    language.value = "zh"
    assert quiz._inline_html(entries[1]["question_zh"]) in card.value and show.description == "显示答案"
    show.click()
    missed.click()
    assert "1/2" in score.value and show.disabled
    again.click()
    assert "0/0" in score.value and not show.disabled


# ---------------------------------------------------------------- terminal, CSV, markdown


def test_terminal_flashcards_with_piped_input():
    result = _run(["-m", "utils.quiz", "--chapter", "3", "--n", "2"], stdin="\ny\n\nn\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip().endswith("Score: 1/2")
    first = quiz.select_questions(3, seed=0, n=2)[0]
    assert first["question_en"] in result.stdout and first["answer_en"] in result.stdout


def test_terminal_flashcards_end_gracefully_at_eof_and_reask_bad_grades():
    result = _run(["-m", "utils.quiz", "--chapter", "3", "--n", "3"], stdin="\nmaybe\ny\n")
    assert result.returncode == 0, result.stderr
    assert "Please answer y or n" in result.stdout
    assert result.stdout.rstrip().endswith("Score: 1/1")
    chinese = _run(["-m", "utils.quiz", "--chapter", "2", "--lang", "zh"], stdin="")
    assert chinese.stdout.rstrip().endswith("得分: 0/0")
    assert quiz.select_questions(2)[0]["question_zh"] in chinese.stdout


def test_terminal_rejects_an_unknown_chapter():
    result = _run(["-m", "utils.quiz", "--chapter", "12"])
    assert result.returncode == 2 and "0..10" in result.stderr


def _read_cards(path: Path) -> list[list[str]]:
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    assert [line.strip() for line in lines[:4]] == [
        "#separator:comma",
        "#html:false",
        "#columns:front,back,tags",
        "#tags column:3",
    ]
    return list(csv.reader(lines[4:]))


def test_csv_export_round_trips(tmp_path):
    path = tmp_path / "cards.csv"
    assert quiz.export_csv(path, chapter=3) == len(quiz.load_questions(3))
    rows = _read_cards(path)
    entries = quiz.load_questions(3)
    assert len(rows) == len(entries)
    for row, entry in zip(rows, entries, strict=True):
        front, back, tags = row
        assert front == entry["question_en"]
        assert back.startswith(entry["answer_en"]) and (entry.get("code", "").strip() in back)
        assert tags.split()[0] == "ch03" and set(entry["tags"]) <= set(tags.split())
        assert ("myth" in tags.split()) == bool(entry.get("myth"))


def test_csv_export_from_the_command_line_in_chinese(tmp_path):
    path = tmp_path / "zh.csv"
    result = _run(["-m", "utils.quiz", "--export-csv", str(path), "--lang", "zh"])
    assert result.returncode == 0, result.stderr
    rows = _read_cards(path)
    assert len(rows) == len(BANK)
    assert [r[0] for r in rows] == [e["question_zh"] for e in BANK]


def test_bank_markdown_groups_chapters_and_marks_myths():
    text = quiz.bank_markdown()
    positions = [text.index(f"## {quiz.chapter_heading(ch)}\n") for ch in quiz.CHAPTERS]
    assert positions == sorted(positions)
    myths = [e for e in BANK if e.get("myth")]
    assert text.count("> **Wrong claim:**") == len(myths) == text.count("**Evidence:**")
    assert "**Myth 2** ·" in text
    assert text.count("```python\n") == sum(1 for e in BANK if e.get("code_runs"))
    assert text.count("```py\n") == sum(1 for e in BANK if e.get("code") and not e.get("code_runs"))
    for entry in BANK:
        assert entry["question_en"] in text and entry["answer_zh"] in text


def test_lesson_09_bank_block_is_current():
    lesson = quiz.LESSON_PATH.read_text(encoding="utf-8")
    assert lesson.startswith("# 09 Interview question bank\n")
    assert quiz.lesson_bank_block(lesson) == quiz.bank_markdown(), "run: python -m utils.quiz --write-lesson"


def test_update_lesson_rewrites_a_stale_block(tmp_path):
    stale = tmp_path / "lesson.md"
    stale.write_text(f"# Title\n\n{quiz.BANK_BEGIN}\nold\n{quiz.BANK_END}\n\nAfter.\n", encoding="utf-8")
    assert quiz.update_lesson(stale) is True
    text = stale.read_text(encoding="utf-8")
    assert quiz.lesson_bank_block(text) == quiz.bank_markdown() and text.endswith("\n\nAfter.\n")
    assert quiz.update_lesson(stale) is False
    stale.write_text("no markers", encoding="utf-8")
    with pytest.raises(ValueError, match="BEGIN BANK"):
        quiz.update_lesson(stale)


def test_check_command_reports_no_problems():
    result = _run(["-m", "utils.quiz", "--check"])
    assert result.returncode == 0 and "no problems" in result.stdout, result.stdout[-2000:]
