"""The interview question bank: load and validate it, quiz yourself, export it.

The bank is data: ``utils/questions/chNN.json`` holds one JSON list of entries per chapter (the schema is
in ``utils/questions/README.md``). In a notebook ``quiz(chapter=3)`` shows flashcards as widgets, or plain
text where widgets cannot render (CI, nbval, a static page). From a terminal::

    python -m utils.quiz --chapter 3 --lang zh --n 5    # flashcards: Enter reveals, y/n grades
    python -m utils.quiz --export-csv cards.csv          # for Anki and other spaced-repetition tools
    python -m utils.quiz --export-markdown               # the whole bank as one markdown page
    python -m utils.quiz --write-lesson                  # regenerate the bank block of lesson 09
    python -m utils.quiz --check                         # validate every entry and link
"""

from __future__ import annotations

import argparse
import csv
import functools
import html
import json
import os
import random
import re
import sys
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Any, TextIO

from utils import course

REPO_ROOT = Path(__file__).resolve().parent.parent
LESSON_PATH = REPO_ROOT / "lessons" / "09-interview-questions.md"
LESSON_LINK = "lessons/09-interview-questions.md"
BANK_BEGIN = "<!-- BEGIN BANK -->"
BANK_END = "<!-- END BANK -->"

CHAPTERS = range(len(course.CHAPTERS))
DIFFICULTIES = ("easy", "medium", "hard")
LANGS = ("en", "zh")
N_MYTHS = 20

# The bank's section headings: each chapter's title from the manifest (chapter 09's part of the bank holds
# the general topics, hence its own heading).
CHAPTER_TITLES: dict[int, str] = {ch.number: ch.bank_title or ch.title for ch in course.CHAPTERS}

# Every topic SYLLABUS.md lists, per chapter, mapped to the tags an entry must carry to cover it: a topic
# is covered when at least one entry of that chapter has all of its tags. tests/test_quiz.py asserts it.
SYLLABUS_TOPICS: dict[int, dict[str, tuple[str, ...]]] = {
    0: {
        "device detection (CUDA / MPS / CPU)": ("device",),
        "Colab detection and bootstrap": ("colab",),
        "offline tiny model vs hub model switch": ("tiny-model",),
        "seeding": ("seeding",),
        "what each later chapter needs (RAM/VRAM, minutes)": ("requirements",),
    },
    1: {
        "SFT vs pre-training (objective, data size, cost, what changes)": ("sft-vs-pretraining",),
        "the fine-tuning workflow": ("workflow",),
        "instruction data as prompt/completion JSON(L)": ("instruction-data",),
        "multi-turn chat data and chat templates": ("chat-template",),
        "label masking (-100 on prompt tokens) and why": ("label-masking",),
        "padding vs packing": ("packing",),
        "training loop in plain PyTorch": ("training-loop",),
        "the same loop with Trainer": ("trainer",),
        "exact-match evaluation before and after": ("exact-match",),
        "base-model choice criteria": ("base-model-choice",),
    },
    2: {
        "what is trained (full vs PEFT)": ("full-vs-peft",),
        "memory: the 16 bytes/param rule for mixed-precision Adam": ("memory-16-bytes",),
        "speed": ("speed",),
        "data needs": ("data-needs",),
        "catastrophic forgetting measured on the pre-training distribution": ("catastrophic-forgetting",),
        "the PEFT family": ("peft-family",),
        "adapters": ("adapters",),
        "prompt tuning": ("prompt-tuning",),
        "prefix tuning": ("prefix-tuning",),
        "P-tuning": ("p-tuning",),
        "IA3": ("ia3",),
        "BitFit": ("bitfit",),
        "fine-tuning vs RAG": ("rag",),
        "continual pre-training vs task fine-tuning": ("continual-pretraining",),
        "RLHF pipeline (reward model, PPO)": ("rlhf",),
    },
    3: {
        "h = W x + (alpha/r) B A x and the shapes": ("lora-formula",),
        "parameter count r (d_in + d_out) and its ratio to d_in d_out": ("parameter-counting",),
        "counting whole real architectures (GPT-2, Llama-2-7B, Qwen2.5-0.5B)": ("real-architectures",),
        "initialization (A random, B zero) and what goes wrong otherwise": ("initialization",),
        "alpha/r scaling": ("scaling",),
        "rsLoRA's alpha/sqrt(r)": ("rslora",),
        "LoRA from scratch in PyTorch, equal to peft": ("from-scratch",),
        "merge and unmerge": ("merge",),
        "which modules to target": ("target-modules",),
        "choosing r": ("choosing-rank",),
        "expressiveness limit of a rank-r update (SVD, Eckart-Young)": ("expressiveness",),
        "approaching full fine-tuning beyond raising r (DoRA, more modules, LR)": ("beyond-rank",),
    },
    4: {
        "LoraConfig, get_peft_model, print_trainable_parameters": ("peft-api",),
        "training with Trainer": ("trainer",),
        "saving only the adapter (file size vs full model)": ("save-adapter",),
        "loading with PeftModel.from_pretrained": ("load-adapter",),
        "merge_and_unload": ("merge-and-unload",),
        "several adapters on one base, switching": ("multi-adapter",),
        "LoRA for a classification head (SEQ_CLS, modules_to_save)": ("seq-cls",),
    },
    5: {
        "absmax int8 quantization": ("absmax",),
        "block-wise quantization": ("block-wise-quantization",),
        "the NF4 code book": ("nf4",),
        "double quantization (0.5 -> 0.127 bits/param)": ("double-quantization",),
        "paged optimizers": ("paged-optimizers",),
        "own NF4 compared with bitsandbytes": ("nf4", "bitsandbytes"),
        "BitsAndBytesConfig (nf4, double quant, compute dtype)": ("bitsandbytesconfig",),
        "prepare_model_for_kbit_training": ("prepare-model-for-kbit-training",),
        "LoRA on top of the 4-bit base": ("qlora", "lora"),
        "memory tables 7B-65B (full FT vs LoRA vs QLoRA)": ("memory", "full-fine-tuning"),
        "8-bit loading": ("llm-int8",),
        "quantization vs distillation": ("distillation",),
    },
    6: {
        "requires_grad=False": ("requires-grad",),
        "counting trainable parameters": ("parameter-counting", "freezing"),
        "freezing all but the head (an encoder classifier)": ("head-only", "encoder-classifier"),
        "freezing the bottom k layers": ("bottom-k-freezing",),
        "gradual unfreezing": ("gradual-unfreezing",),
        "BitFit (bias-only)": ("bitfit",),
        "what freezing saves (no weight gradients, no optimizer state)": (
            "freezing-memory",
            "optimizer-state",
        ),
        "what freezing does not save (activations)": ("freezing-memory", "activations"),
    },
    7: {
        "activation memory at long sequences": ("activation-memory",),
        "gradient checkpointing": ("gradient-checkpointing",),
        "gradient_checkpointing_enable and use_reentrant=False": ("use-reentrant",),
        "the manual torch.utils.checkpoint version": ("torch-utils-checkpoint",),
        "memory saved and time paid": ("gradient-checkpointing", "speed"),
        "gradient accumulation": ("gradient-accumulation",),
        "where accumulation is not exact (padding-weighted losses)": ("gradient-accumulation", "padding"),
        "mixed precision (fp16 / bf16)": ("mixed-precision", "bf16", "fp16"),
        "loss scaling": ("loss-scaling",),
        "DeepSpeed ZeRO": ("zero",),
        "FSDP": ("fsdp",),
    },
    8: {
        "perplexity = exp(mean token NLL)": ("perplexity",),
        "shifted (n - 1) targets, padding excluded": ("perplexity", "label-shift", "padding"),
        "sliding-window perplexity": ("perplexity", "sliding-window"),
        "early stopping with EarlyStoppingCallback": ("early-stopping", "trainer"),
        "a custom callback": ("callbacks",),
        "checkpointing and resuming": ("resume",),
        "learning rate": ("learning-rate",),
        "warmup, linear and cosine schedules": ("warmup", "lr-schedule", "cosine-schedule"),
        "AdamW and weight decay": ("adamw", "weight-decay"),
        "dropout": ("dropout",),
        "gradient clipping (exploding gradients)": ("gradient-clipping", "exploding-gradients"),
        "overfitting signs and remedies": ("overfitting",),
        "evaluation metrics (accuracy, F1, exact match, BLEU/ROUGE)": ("metrics", "f1", "bleu", "rouge"),
        "hyperparameter search": ("hyperparameter-search",),
    },
    9: {},  # general topics: covered bank-wide through BANK_TOPICS below, plus the 20 myths
    10: {
        "end to end QLoRA SFT of a small instruct model": ("capstone", "qlora"),
        "on a free Colab GPU": ("colab-t4",),
        "evaluation: perplexity, exact match": ("perplexity", "exact-match"),
        "sample generations": ("generation",),
        "saving the adapter": ("save-adapter",),
        "reloading the adapter": ("load-adapter",),
        "merging": ("merge-and-unload",),
        "the same notebook offline on CPU with the tiny model": ("offline", "cpu"),
    },
}

# The syllabus topics that live in lessons and the bank rather than in one chapter: covered anywhere.
BANK_TOPICS: dict[str, tuple[str, ...]] = {
    "data cleaning and de-duplication": ("data-cleaning",),
    "class imbalance": ("class-imbalance",),
    "data augmentation for text": ("data-augmentation",),
    "few-shot learning vs fine-tuning": ("few-shot",),
    "limited labelled data": ("limited-data",),
    "adding domain tokens": ("domain-tokens",),
    "long inputs (truncation, chunking, sliding windows, RoPE scaling)": ("long-inputs",),
    "elastic weight consolidation": ("ewc",),
    "replay / mixed data against forgetting": ("replay",),
    "multi-task fine-tuning": ("multi-task",),
    "scaling laws": ("scaling-laws",),
    "question answering fine-tuning (start/end positions)": ("extractive-qa",),
    "interpretability tools": ("interpretability",),
}

_REQUIRED_TEXT = ("id", "question_en", "question_zh", "answer_en", "answer_zh", "link")
_MYTH_TEXT = ("wrong_claim", "correction", "evidence")
_ALLOWED_KEYS = {
    "chapter",
    "difficulty",
    "tags",
    "code",
    "code_runs",
    "myth",
    "myth_number",
    *_REQUIRED_TEXT,
    *_MYTH_TEXT,
}
_ID_RE = re.compile(r"^(\d{2})-[a-z0-9]+(?:-[a-z0-9]+)*$")
_TAG_RE = re.compile(r"^[a-z0-9]+(?:[.-][a-z0-9]+)*$")
_CJK_RE = re.compile(r"[\u4e00-\u9fff]")

_LABELS = {
    "en": {
        "q": "Q",
        "a": "A",
        "show": "Show answer",
        "knew": "I knew it",
        "missed": "I didn't",
        "again": "Start again",
        "score": "Score",
        "myth": "Myth",
        "done": "Done",
        "reveal": "(Enter to show the answer) ",
        "grade": "Did you know it? [y/n] ",
        "reask": "Please answer y or n: ",
    },
    "zh": {
        "q": "问",
        "a": "答",
        "show": "显示答案",
        "knew": "我会",
        "missed": "我不会",
        "again": "重新开始",
        "score": "得分",
        "myth": "误区",
        "done": "完成",
        "reveal": "（按 Enter 显示答案）",
        "grade": "你答对了吗？[y/n] ",
        "reask": "请输入 y 或 n：",
    },
}


# ---------------------------------------------------------------- loading and filtering


def _bank_files() -> list[tuple[str, str]]:
    """(file name, text) of every ``questions/chNN.json``, in chapter order."""
    folder = resources.files(__package__ or "utils").joinpath("questions")
    files = [f for f in folder.iterdir() if re.fullmatch(r"ch\d{2}\.json", f.name)]
    return [(f.name, f.read_text(encoding="utf-8")) for f in sorted(files, key=lambda f: f.name)]


def _load_bank() -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = []
    for name, text in _bank_files():
        data = json.loads(text)
        if not isinstance(data, list) or not all(isinstance(e, dict) for e in data):
            raise ValueError(f"utils/questions/{name} must hold a JSON list of objects.")
        entries.extend(data)
    return entries


def all_tags(entries: Iterable[dict[str, Any]] | None = None) -> set[str]:
    """Every tag used in ``entries`` (default: the whole bank)."""
    entries = _load_bank() if entries is None else entries
    return {tag for entry in entries for tag in entry.get("tags", [])}


def load_questions(chapter: int | None = None, tags: list[str] | str | None = None) -> list[dict[str, Any]]:
    """Entries of the bank, in file order, filtered by chapter and by tags (an entry with any of them).

    Raises ValueError for a chapter outside 0..10 or a tag the bank does not use, naming the valid values.
    """
    entries = _load_bank()
    if chapter is not None:
        if isinstance(chapter, bool) or not isinstance(chapter, int) or chapter not in CHAPTERS:
            raise ValueError(f"Unknown chapter {chapter!r}: chapters are the integers 0..10.")
        entries = [e for e in entries if e.get("chapter") == chapter]
    if tags is not None:
        wanted = [tags] if isinstance(tags, str) else list(tags)
        known = all_tags()
        unknown = [t for t in wanted if t not in known]
        if unknown:
            raise ValueError(
                f"Unknown tag(s) {', '.join(map(repr, unknown))}; valid tags: {', '.join(sorted(known))}."
            )
        entries = [e for e in entries if set(e.get("tags", [])) & set(wanted)]
    return entries


def select_questions(
    chapter: int | None = None,
    tags: list[str] | str | None = None,
    seed: int | None = 0,
    n: int | None = None,
) -> list[dict[str, Any]]:
    """``load_questions`` shuffled with ``seed`` (None keeps file order) and cut to the first ``n``."""
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"n must be a positive integer or None, got {n!r}.")
    entries = load_questions(chapter, tags)
    if seed is not None:
        random.Random(seed).shuffle(entries)
    return entries[:n] if n is not None else entries


# ---------------------------------------------------------------- validation and links


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lowercase, punctuation except '-' and '_' removed, spaces -> '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link shows its text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)  # \w is Unicode-aware: letters (CJK too), digits, underscore
    return text.replace(" ", "-")


def markdown_anchors(text: str) -> set[str]:
    """Anchors of every ATX heading outside code fences (duplicates get -1, -2, ...) and explicit ids."""
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    fence: str | None = None
    for line in text.splitlines():
        stripped = line.lstrip(" ")
        marker = re.match(r"(`{3,}|~{3,})", stripped) if len(line) - len(stripped) < 4 else None
        if fence is not None:
            if marker and marker.group(1)[0] == fence[0] and len(marker.group(1)) >= len(fence):
                fence = None
            continue
        if marker:
            fence = marker.group(1)
            continue
        heading = re.match(r"^ {0,3}#{1,6}(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$", line)
        if heading:
            base = github_anchor(heading.group(1) or "")
            count = seen.get(base, 0)
            seen[base] = count + 1
            anchors.add(base if count == 0 else f"{base}-{count}")
        anchors.update(re.findall(r"<a\s+(?:id|name)=\"([^\"]+)\"", line))
    return anchors


def _file_anchors(path: Path) -> frozenset[str]:
    return _cached_anchors(str(path), path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _cached_anchors(path_name: str, mtime_ns: int) -> frozenset[str]:
    """Anchors of a markdown file or of a notebook's markdown cells (cached until the file changes)."""
    path = Path(path_name)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".ipynb":
        cells = json.loads(text).get("cells", [])
        sources = [
            "".join(c["source"]) if isinstance(c["source"], list) else c["source"]
            for c in cells
            if c.get("cell_type") == "markdown"
        ]
        text = "\n\n".join(sources)
    return frozenset(markdown_anchors(text))


def link_problem(link: str, root: Path = REPO_ROOT) -> str | None:
    """Why ``link`` (relative to the repo root, optional #anchor) does not resolve, or None when it does."""
    path_part, _, anchor = link.partition("#")
    if not path_part or path_part.startswith(("/", "http:", "https:")) or ".." in Path(path_part).parts:
        return f"link {link!r} must be a relative path inside the repository"
    path = root / path_part
    if not path.is_file():
        return f"link {link!r}: no file {path_part}"
    if anchor and anchor not in _file_anchors(path):
        return f"link {link!r}: no heading in {path_part} has the anchor #{anchor}"
    return None


def validate_entry(entry: Any, root: Path = REPO_ROOT) -> list[str]:
    """Problems with one bank entry (empty when it is fine): schema, languages, myth fields, link."""
    if not isinstance(entry, dict):
        return [f"entry must be an object, got {type(entry).__name__}"]
    name = entry.get("id", "<no id>")
    problems = [f"unknown key {key!r}" for key in sorted(set(entry) - _ALLOWED_KEYS)]
    for key in _REQUIRED_TEXT:
        if not isinstance(entry.get(key), str) or not entry[key].strip():
            problems.append(f"{key} must be a non-empty string")
    chapter = entry.get("chapter")
    if isinstance(chapter, bool) or not isinstance(chapter, int) or chapter not in CHAPTERS:
        problems.append(f"chapter must be an integer 0..10, got {chapter!r}")
    if isinstance(entry.get("id"), str):
        match = _ID_RE.match(entry["id"])
        if not match:
            problems.append(f"id {entry['id']!r} must look like '03-lora-param-count' (NN-lowercase-words)")
        elif isinstance(chapter, int) and int(match.group(1)) != chapter:
            problems.append(f"id {entry['id']!r} must start with the chapter number {chapter:02d}")
    if entry.get("difficulty") not in DIFFICULTIES:
        problems.append(f"difficulty must be one of {DIFFICULTIES}, got {entry.get('difficulty')!r}")
    tags = entry.get("tags")
    if not isinstance(tags, list) or not tags:
        problems.append("tags must be a non-empty list")
    else:
        problems += [
            f"tag {t!r} must be short lowercase words joined by '-'"
            for t in tags
            if not isinstance(t, str) or not _TAG_RE.match(t) or len(t) > 40
        ]
        if len(set(map(str, tags))) != len(tags):
            problems.append("tags must not repeat")
    for key in ("question_zh", "answer_zh"):
        if isinstance(entry.get(key), str) and not _CJK_RE.search(entry[key]):
            problems.append(f"{key} must be written in Chinese")
    for key in ("question_en", "answer_en"):
        if isinstance(entry.get(key), str) and _CJK_RE.search(entry[key]):
            problems.append(f"{key} must be written in English")
    if "code" in entry and (not isinstance(entry["code"], str) or not entry["code"].strip()):
        problems.append("code, when present, must be a non-empty string")
    if "code_runs" in entry and (not isinstance(entry["code_runs"], bool) or "code" not in entry):
        problems.append("code_runs must be true or false, and only next to code")
    myth = entry.get("myth", False)
    if myth is True:
        number = entry.get("myth_number")
        if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number <= N_MYTHS:
            problems.append(f"myth_number must be an integer 1..{N_MYTHS}, got {number!r}")
        for key in _MYTH_TEXT:
            if not isinstance(entry.get(key), str) or not entry[key].strip():
                problems.append(f"a myth needs a non-empty {key}")
    elif myth is False:
        problems += [
            f"{key} belongs only to myth entries" for key in ("myth_number", *_MYTH_TEXT) if key in entry
        ]
    else:
        problems.append(f"myth must be true or false, got {myth!r}")
    if isinstance(entry.get("link"), str) and entry["link"].strip():
        problem = link_problem(entry["link"], root)
        if problem:
            problems.append(problem)
    return [f"{name}: {p}" for p in problems]


def validate_bank(entries: list[dict[str, Any]] | None = None) -> list[str]:
    """Problems across the bank: every entry's own problems plus duplicate ids and repeated myths."""
    entries = _load_bank() if entries is None else entries
    problems = [p for entry in entries for p in validate_entry(entry)]
    ids = [e.get("id") for e in entries]
    problems += [f"duplicate id {i!r}" for i in sorted({i for i in ids if ids.count(i) > 1}, key=str)]
    myths = [e.get("myth_number") for e in entries if e.get("myth") is True]
    problems += [
        f"myth {m} appears {myths.count(m)} times" for m in sorted({m for m in myths if myths.count(m) > 1})
    ]
    return problems


def chapter_heading(chapter: int) -> str:
    """The heading text of a chapter's section in lesson 09, e.g. 'Chapter 03: LoRA: the math and ...'."""
    return f"Chapter {chapter:02d}: {CHAPTER_TITLES[chapter]}"


def chapter_link(chapter: int) -> str:
    """The link an entry of ``chapter`` uses: lesson 09's section for that chapter."""
    return f"{LESSON_LINK}#{github_anchor(chapter_heading(chapter))}"


# ---------------------------------------------------------------- markdown, text and CSV


def _question(entry: dict[str, Any], lang: str) -> str:
    return entry[f"question_{lang}"]


def _answer(entry: dict[str, Any], lang: str) -> str:
    return entry[f"answer_{lang}"]


def _entry_markdown(entry: dict[str, Any]) -> str:
    meta = f"*{entry['difficulty']} · {', '.join(entry['tags'])}*"
    if entry.get("myth"):
        meta = f"**Myth {entry['myth_number']}** · {meta}"
    parts = [
        f"### {entry['id']}",
        meta,
        f"**Q:** {entry['question_en']}",
        f"**问：** {entry['question_zh']}",
    ]
    if entry.get("myth"):
        parts += [
            f"> **Wrong claim:** {entry['wrong_claim']}",
            f"**Correction:** {entry['correction']}",
            f"**Evidence:** {entry['evidence']}",
        ]
    parts += [f"**A:** {entry['answer_en']}", f"**答：** {entry['answer_zh']}"]
    if entry.get("code"):
        # `python` blocks of a lesson are executed by the lesson test; fragments are shown as `py`.
        fence = "python" if entry.get("code_runs") else "py"
        parts.append(f"```{fence}\n{entry['code'].rstrip()}\n```")
    return "\n\n".join(parts) + "\n"


def bank_markdown() -> str:
    """The whole bank as one markdown page, grouped by chapter, both languages, myths marked."""
    entries = _load_bank()
    by_chapter = {ch: [e for e in entries if e.get("chapter") == ch] for ch in CHAPTERS}
    myths = sorted((e for e in entries if e.get("myth")), key=lambda e: e["myth_number"])
    lines = [
        "<!-- Generated by `python -m utils.quiz --write-lesson` from utils/questions/*.json -->",
        "",
        f"{len(entries)} questions. Per chapter: "
        + ", ".join(
            f"[{ch:02d}](#{github_anchor(chapter_heading(ch))}) {len(by_chapter[ch])}" for ch in CHAPTERS
        )
        + ".",
        "",
    ]
    if myths:
        lines += ["**Myths corrected in the bank** (numbered as in the syllabus):", ""]
        lines += [
            f"{e['myth_number']}. [{e['id']}](#{github_anchor(e['id'])}): {e['wrong_claim']}" for e in myths
        ]
        lines.append("")
    for ch in CHAPTERS:
        lines += [f"## {chapter_heading(ch)}", ""]
        if not by_chapter[ch]:
            lines += ["*No questions for this chapter yet.*", ""]
        lines += [_entry_markdown(e) for e in by_chapter[ch]]
    return "\n".join(lines).rstrip("\n") + "\n"


def lesson_bank_block(text: str) -> str:
    """The text between the BEGIN/END BANK markers of a lesson (without the newline after BEGIN)."""
    if text.count(BANK_BEGIN) != 1 or text.count(BANK_END) != 1:
        raise ValueError(f"The lesson must contain {BANK_BEGIN} and {BANK_END} exactly once each.")
    block = text.split(BANK_BEGIN, 1)[1].split(BANK_END, 1)[0]
    return block[1:] if block.startswith("\n") else block


def update_lesson(path: Path = LESSON_PATH) -> bool:
    """Rewrite the bank block of lesson 09 from the JSON files; True when the file changed."""
    text = path.read_text(encoding="utf-8")
    lesson_bank_block(text)  # checks the markers
    head, rest = text.split(BANK_BEGIN, 1)
    tail = rest.split(BANK_END, 1)[1]
    new = f"{head}{BANK_BEGIN}\n{bank_markdown()}{BANK_END}{tail}"
    if new != text:
        path.write_text(new, encoding="utf-8")
    return new != text


def questions_text(entries: list[dict[str, Any]], lang: str = "en", answers: bool = True) -> str:
    """Plain text of ``entries``: numbered questions, each followed by its answer when ``answers``."""
    labels = _LABELS[lang]
    blocks = []
    for i, entry in enumerate(entries, 1):
        myth = f" · {labels['myth']} {entry['myth_number']}" if entry.get("myth") else ""
        block = [
            f"{i}. [{entry['id']} · {entry['difficulty']}{myth}]",
            f"{labels['q']}: {_question(entry, lang)}",
        ]
        if answers:
            block.append(f"{labels['a']}: {_answer(entry, lang)}")
            if entry.get("code"):
                block.append("\n".join("    " + line for line in entry["code"].rstrip().splitlines()))
        blocks.append("\n".join(block))
    return "\n\n".join(blocks) + "\n"


def export_csv(path: str | os.PathLike[str], chapter: int | None = None, lang: str = "en") -> int:
    """Write the bank as a UTF-8 CSV (columns front, back, tags) that Anki imports; returns the card count.

    The first lines are Anki's file headers (``#separator:comma`` ...); other tools skip lines starting '#'.
    Tags are space-separated, as Anki expects: the chapter (``ch03``), the entry's tags, ``myth`` for myths.
    """
    _check_lang(lang)
    entries = load_questions(chapter)
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write("#separator:comma\n#html:false\n#columns:front,back,tags\n#tags column:3\n")
        writer = csv.writer(f)
        for entry in entries:
            back = _answer(entry, lang)
            if entry.get("code"):
                back += "\n\n" + entry["code"].rstrip()
            tags = [f"ch{entry['chapter']:02d}", *entry["tags"], *(["myth"] if entry.get("myth") else [])]
            writer.writerow([_question(entry, lang), back, " ".join(tags)])
    return len(entries)


def _count(entries: list[dict[str, Any]]) -> str:
    return f"{len(entries)} question{'' if len(entries) == 1 else 's'}"


def _check_lang(lang: str) -> None:
    if lang not in LANGS:
        raise ValueError(f"Unknown language {lang!r}: choose one of {', '.join(LANGS)}.")


# ---------------------------------------------------------------- notebook quiz


def widgets_can_render() -> bool:
    """Conservatively, whether ipywidgets will show: a live IPython kernel, not CI, not forced to text.

    ``COURSE_QUIZ_TEXT=1`` forces text; ``CI`` or ``PYTEST_CURRENT_TEST`` (nbval runs under pytest) does too.
    """
    if os.environ.get("COURSE_QUIZ_TEXT", "").lower() not in ("", "0", "false"):
        return False
    if os.environ.get("CI", "").lower() not in ("", "0", "false") or os.environ.get("PYTEST_CURRENT_TEST"):
        return False
    try:
        import ipywidgets  # noqa: F401
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def _inline_html(text: str) -> str:
    """Escaped HTML of a bank string, with `backticks` shown as code."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def _card_html(entry: dict[str, Any], lang: str, revealed: bool, position: str) -> str:
    labels = _LABELS[lang]
    myth = f" · <b>{labels['myth']} {entry['myth_number']}</b>" if entry.get("myth") else ""
    parts = [
        f"<p><small>{position} · {entry['id']} · {entry['difficulty']}{myth}</small></p>",
        f"<p><b>{labels['q']}:</b> {_inline_html(_question(entry, lang))}</p>",
    ]
    if revealed:
        parts.append(f"<p><b>{labels['a']}:</b> {_inline_html(_answer(entry, lang))}</p>")
        if entry.get("code"):
            parts.append(f"<pre>{html.escape(entry['code'].rstrip())}</pre>")
    return "\n".join(parts)


def _quiz_widget(entries: list[dict[str, Any]], lang: str) -> Any:
    """An ipywidgets flashcard deck: show answer, self-grade, running score, en/zh toggle."""
    import ipywidgets as widgets

    state = {"index": 0, "known": 0, "graded": 0, "revealed": False}
    language = widgets.ToggleButtons(options=[("English", "en"), ("中文", "zh")], value=lang)
    card = widgets.HTML()
    score = widgets.HTML()
    show = widgets.Button()
    knew = widgets.Button(button_style="success")
    missed = widgets.Button(button_style="warning")
    again = widgets.Button()

    def render(*_: Any) -> None:
        labels = _LABELS[language.value]
        show.description, knew.description = labels["show"], labels["knew"]
        missed.description, again.description = labels["missed"], labels["again"]
        done = state["index"] >= len(entries)
        if done:
            card.value = f"<p><b>{labels['done']}.</b></p>"
        else:
            position = f"{state['index'] + 1}/{len(entries)}"
            card.value = _card_html(entries[state["index"]], language.value, state["revealed"], position)
        show.disabled = done or state["revealed"]
        knew.disabled = missed.disabled = done or not state["revealed"]
        score.value = f"<b>{labels['score']}:</b> {state['known']}/{state['graded']}"

    def reveal(_: Any) -> None:
        state["revealed"] = True
        render()

    def grade(known: bool) -> None:
        state["known"] += int(known)
        state["graded"] += 1
        state["index"] += 1
        state["revealed"] = False
        render()

    def restart(_: Any) -> None:
        state.update(index=0, known=0, graded=0, revealed=False)
        render()

    show.on_click(reveal)
    knew.on_click(lambda _: grade(True))
    missed.on_click(lambda _: grade(False))
    again.on_click(restart)
    language.observe(render, names="value")
    render()
    return widgets.VBox([language, card, widgets.HBox([show, knew, missed, again]), score])


def _show(markdown: str, plain: str) -> None:
    """Display markdown in an IPython kernel (plain text as its fallback), or print plain text elsewhere."""
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:
        print(plain)
        return
    if get_ipython() is None:
        print(plain)
    else:
        display({"text/markdown": markdown, "text/plain": plain}, raw=True)


WIDGET_FALLBACK = (
    "The flashcards did not render here: this front end shows no ipywidgets (no widget manager: VS Code "
    "without the Jupyter extension's widget support, an old JupyterLab, a static viewer). The questions and "
    "answers follow as text; quiz(..., text=True) prints only this."
)


def widget_bundle(deck: Any, entries: list[dict[str, Any]], lang: str) -> dict[str, Any]:
    """The deck's display data with the text quiz as its ``text/plain``: a front end that cannot render the
    widget shows the text instead of the widget's bare repr (``VBox(children=...)``)."""
    bundle = dict(deck._repr_mimebundle_())
    bundle["text/plain"] = f"{WIDGET_FALLBACK}\n\n{questions_text(entries, lang)}"
    return bundle


def quiz(
    chapter: int | None = None,
    tags: list[str] | str | None = None,
    lang: str = "en",
    seed: int | None = 0,
    n: int | None = None,
    text: bool | None = None,
) -> None:
    """Quiz yourself on the bank: widgets in a live notebook, readable text everywhere else.

    Bad arguments (chapter, tag, language, n) raise ValueError; rendering never does: if widgets cannot
    show (no kernel, CI, nbval, ``COURSE_QUIZ_TEXT=1``) or fail, the questions and answers print as text.
    ``text=True`` asks for text, ``text=False`` for the widgets. A front end that has a kernel but cannot draw
    widgets shows the text too: it is the widget output's plain-text form (``widget_bundle``).
    """
    _check_lang(lang)
    entries = select_questions(chapter, tags, seed, n)
    scope = "the whole bank" if chapter is None else f"chapter {chapter:02d}"
    if tags is not None:
        scope += f", tags {tags if isinstance(tags, str) else ', '.join(tags)}"
    if not entries:
        _show(f"*No questions for {scope}.*", f"No questions for {scope}.")
        return
    if text is None:
        text = not widgets_can_render()
    if not text:
        try:
            deck = _quiz_widget(entries, lang)
            from IPython.display import display

            note = (
                f"{_count(entries)} from {scope}. The flashcards below need a live Jupyter kernel; "
                f"in a static view read {LESSON_LINK} or run `python -m utils.quiz` in a terminal."
            )
            _show(f"*{note}*", note)
            display(widget_bundle(deck, entries, lang), raw=True)
            return
        except Exception as error:  # a broken widget library must not stop the notebook
            print(f"(widgets unavailable: {error}; showing text)")
    header = f"{_count(entries)} from {scope} (text mode: widgets need a live Jupyter kernel)."
    plain = f"{header}\n\n{questions_text(entries, lang)}"
    _show(f"**{header}**\n\n```text\n{questions_text(entries, lang)}```", plain)


# ---------------------------------------------------------------- terminal flashcards


def flashcards(
    entries: list[dict[str, Any]], lang: str = "en", stdin: TextIO | None = None, stdout: TextIO | None = None
) -> tuple[int, int]:
    """Terminal flashcards: Enter reveals, y/n self-grades, EOF ends early. Returns (known, graded)."""
    _check_lang(lang)
    stdin = sys.stdin if stdin is None else stdin
    stdout = sys.stdout if stdout is None else stdout
    labels = _LABELS[lang]

    def ask(prompt: str) -> str | None:
        stdout.write(prompt)
        stdout.flush()
        line = stdin.readline()
        if line == "" or not getattr(stdin, "isatty", lambda: False)():
            stdout.write("\n")  # a terminal echoes the Enter; piped input and EOF do not
        return None if line == "" else line.strip().lower()

    known = graded = 0
    for i, entry in enumerate(entries, 1):
        myth = f" · {labels['myth']} {entry['myth_number']}" if entry.get("myth") else ""
        stdout.write(f"\n[{i}/{len(entries)}] {entry['id']} · {entry['difficulty']}{myth}\n")
        stdout.write(f"{labels['q']}: {_question(entry, lang)}\n")
        if ask(labels["reveal"]) is None:
            break
        stdout.write(f"{labels['a']}: {_answer(entry, lang)}\n")
        if entry.get("code"):
            stdout.write("".join(f"    {line}\n" for line in entry["code"].rstrip().splitlines()))
        reply = ask(labels["grade"])
        while reply is not None and reply not in ("y", "yes", "n", "no"):
            reply = ask(labels["reask"])
        if reply is None:
            break
        graded += 1
        known += reply in ("y", "yes")
    stdout.write(f"\n{labels['score']}: {known}/{graded}\n")
    return known, graded


def main(argv: list[str] | None = None) -> int:
    """Command line: flashcards by default; --export-csv, --export-markdown, --write-lesson, --check."""
    parser = argparse.ArgumentParser(prog="python -m utils.quiz", description=__doc__.splitlines()[0])
    parser.add_argument("--chapter", type=int, help="chapter 0..10 (default: all)")
    parser.add_argument("--tags", nargs="+", help="only entries with any of these tags")
    parser.add_argument("--lang", choices=LANGS, default="en")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
    parser.add_argument("--n", type=int, help="number of cards (default: all)")
    parser.add_argument("--export-csv", metavar="PATH", help="write an Anki-ready CSV and exit")
    parser.add_argument("--export-markdown", action="store_true", help="print the bank as markdown and exit")
    parser.add_argument("--write-lesson", action="store_true", help="regenerate the bank block of lesson 09")
    parser.add_argument("--check", action="store_true", help="validate every entry and link")
    args = parser.parse_args(argv)
    if hasattr(sys.stdout, "reconfigure") and (sys.stdout.encoding or "").lower().replace("-", "") != "utf8":
        sys.stdout.reconfigure(encoding="utf-8")  # Chinese text through pipes and odd locales
    try:
        if args.check:
            problems = validate_bank()
            print("\n".join(problems) if problems else f"{len(_load_bank())} entries, no problems.")
            return 1 if problems else 0
        if args.export_csv:
            count = export_csv(args.export_csv, args.chapter, args.lang)
            print(f"Wrote {count} cards to {args.export_csv}.")
            return 0
        if args.export_markdown:
            sys.stdout.write(bank_markdown())
            return 0
        if args.write_lesson:
            changed = update_lesson()
            print(f"{LESSON_LINK}: {'bank block rewritten' if changed else 'already current'}.")
            return 0
        entries = select_questions(args.chapter, args.tags, args.seed, args.n)
    except ValueError as error:
        parser.error(str(error))
    if not entries:
        print("No questions match.")
        return 1
    flashcards(entries, args.lang)
    return 0


if __name__ == "__main__":
    sys.exit(main())
