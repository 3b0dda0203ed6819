"""The course's chapters, in one place: number, slug, title, files, what each needs, what it measured.

Everything that names a chapter reads this manifest: the notebooks' titles and setup cells
(``utils.workbook``), the quiz's chapter titles (``utils.quiz``), the README's course map (written by
``make notebooks`` from this table and from ``measurements.json``), and the consistency tests.

``measurements.json`` beside this file holds what ``make execute`` measured for each solution notebook:
wall seconds on this course's reference machine (2 CPU cores, one thread per notebook) and the kernel's
peak resident memory in GiB. It is written by the execution, never by hand.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MEASUREMENTS = Path(__file__).resolve().parent / "measurements.json"


@dataclass(frozen=True)
class Chapter:
    """One chapter. ``slug`` names its files: ``lessons/NN-<lesson_slug>.md`` and
    ``solutions/NN_<slug>.ipynb``; ``packages`` are the versions its setup cell prints; ``cpu_budget_s``
    is the wall time the default profile must stay under (checked by ``make execute`` and ``make bench``)."""

    number: int
    slug: str
    lesson_slug: str
    title: str
    short_title: str
    packages: tuple[str, ...] = ("torch", "transformers")
    needs_gpu: bool = False
    written: bool = True
    cpu_budget_s: int = 90
    bank_title: str | None = None  # the heading of this chapter's part of the question bank, if not ``title``

    @property
    def id(self) -> str:
        return f"{self.number:02d}"

    @property
    def notebook_name(self) -> str:
        return f"{self.id}_{self.slug}.ipynb"

    @property
    def lesson(self) -> Path:
        return ROOT / "lessons" / f"{self.id}-{self.lesson_slug}.md"

    @property
    def solution(self) -> Path:
        return ROOT / "solutions" / self.notebook_name

    @property
    def notebook(self) -> Path:
        return ROOT / "notebooks" / self.notebook_name

    @property
    def heading(self) -> str:
        """The notebook's first line: ``# 03 LoRA: the math and parameter counting``."""
        return f"# {self.id} {self.title}"


CHAPTERS: tuple[Chapter, ...] = (
    Chapter(0, "setup", "setup", "Setup and tour", "Setup and tour", cpu_budget_s=60),
    Chapter(1, "sft", "sft", "Supervised fine-tuning (SFT)", "Supervised fine-tuning"),
    Chapter(
        2,
        "full_vs_peft",
        "full-vs-peft",
        "Full fine-tuning vs parameter-efficient fine-tuning",
        "Full fine-tuning vs PEFT",
        packages=("torch", "transformers", "peft"),
    ),
    Chapter(
        3,
        "lora_math",
        "lora-math",
        "LoRA: the math and parameter counting",
        "LoRA: the math and parameter counting",
        packages=("torch", "transformers", "peft"),
    ),
    Chapter(
        4,
        "lora_peft",
        "lora-peft",
        "LoRA in practice with peft",
        "LoRA in practice with peft",
        packages=("torch", "transformers", "peft"),
        cpu_budget_s=60,
    ),
    Chapter(
        5,
        "qlora",
        "qlora",
        "QLoRA",
        "QLoRA",
        packages=("torch", "transformers", "peft", "bitsandbytes"),
        written=True,
    ),
    Chapter(6, "freezing", "freezing", "Freezing", "Freezing", packages=("torch", "transformers", "peft")),
    Chapter(
        7,
        "memory_speed",
        "memory-speed",
        "Memory and speed: gradient checkpointing, accumulation, mixed precision",
        "Memory and speed",
        written=True,
    ),
    Chapter(
        8,
        "training_hygiene",
        "training-hygiene",
        "Early stopping, perplexity and training hygiene",
        "Early stopping, perplexity, training hygiene",
        packages=("torch", "transformers", "peft", "optuna"),
    ),
    Chapter(
        9,
        "interview_questions",
        "interview-questions",
        "Interview question bank",
        "Interview question bank",
        cpu_budget_s=30,
        bank_title="General interview topics",
    ),
    Chapter(
        10,
        "capstone",
        "capstone",
        "Capstone: QLoRA SFT end to end",
        "Capstone on a GPU",
        packages=("torch", "transformers", "peft", "bitsandbytes", "trl"),
        written=True,
        cpu_budget_s=120,
    ),
)


def chapter(number: int) -> Chapter:
    """The chapter with this number; an unknown number lists the valid ones."""
    for ch in CHAPTERS:
        if ch.number == number:
            return ch
    raise ValueError(f"No chapter {number!r}: chapters are {', '.join(str(c.number) for c in CHAPTERS)}.")


def by_notebook(name: str) -> Chapter:
    """The chapter whose notebook file is ``name`` (``"03_lora_math.ipynb"``)."""
    for ch in CHAPTERS:
        if ch.notebook_name == name:
            return ch
    raise ValueError(f"No chapter has the notebook {name!r}.")


def load_measurements() -> dict[str, dict]:
    """``{"03": {"seconds": 78.1, "peak_gib": 0.8}, ...}`` as ``make execute`` last wrote it."""
    return json.loads(MEASUREMENTS.read_text()) if MEASUREMENTS.exists() else {}


def record_measurement(ch: Chapter, seconds: float, peak_gib: float) -> None:
    """Store one chapter's measured wall time and peak memory (``make execute`` calls this)."""
    data = load_measurements()
    data[ch.id] = {"seconds": round(seconds, 1), "peak_gib": round(peak_gib, 2)}
    MEASUREMENTS.write_text(json.dumps(dict(sorted(data.items())), indent=1) + "\n")


COURSE_MAP_BEGIN, COURSE_MAP_END = "<!-- BEGIN COURSE MAP -->", "<!-- END COURSE MAP -->"


def course_map(repo: str) -> str:
    """The README's course map table, from the manifest and the measurements."""
    measured = load_measurements()
    lines = [
        "| # | chapter | lesson | workbook | solution | CPU time | CPU memory | Colab |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for ch in CHAPTERS:
        if not ch.written:
            lines.append(f"| {ch.id} | {ch.short_title} | planned | | | | | |")
            continue
        m = measured.get(ch.id)
        seconds = f"{m['seconds']:.0f} s" if m else "not measured"
        memory = f"{m['peak_gib']:.2f} GiB" if m else ""
        badge = (
            "[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
            f"(https://colab.research.google.com/github/{repo}/blob/main/notebooks/{ch.notebook_name})"
        )
        lines.append(
            f"| {ch.id} | {ch.short_title} | [lesson](lessons/{ch.lesson.name}) | "
            f"[notebook](notebooks/{ch.notebook_name}) | [solution](solutions/{ch.notebook_name}) | "
            f"{seconds} | {memory} | {badge} |"
        )
    return "\n".join(lines)
