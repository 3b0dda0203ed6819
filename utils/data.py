"""The course's generated world and its data.

Everything here is produced by a seeded generator, so the files in ``utils/assets/data`` can be rebuilt
bit for bit with ``python -m utils.data``. Three kinds of text come out of one invented world:

* a **pretraining corpus** (``corpus_train.txt``): plain prose biographies of invented people and plain
  statements of small sums. Each fact is stated many times, in several phrasings and sentence orders
  (knowledge augmentation, Allen-Zhu and Li, arXiv 2309.14316), so that a small model stores the fact
  itself and not one fixed sentence;
* held-out evaluation text: fresh biographies (``corpus_valid.txt``) and fact sentences written in
  phrasings the corpus never uses (``facts_heldout.jsonl``);
* **instruction data** in the conversational format, one JSON object per line with a ``messages`` list
  (``instructions_{train,validation,test}.jsonl``). Fact questions are split **by person**: the test
  split asks about people whose facts are only in the pretraining corpus, never in an SFT example.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

SEED = 1234
DATA_DIR = Path(__file__).resolve().parent / "assets" / "data"
SPLITS = ("train", "validation", "test")

N_PEOPLE = 200
PEOPLE_SPLIT = {"train": 120, "validation": 40, "test": 40}
BIOS_PER_PERSON = 24
MAX_ADDEND = 19  # sums a + b with 0 <= a, b <= MAX_ADDEND

FIRST_SYLLABLES = [
    "ta",
    "ru",
    "mi",
    "ko",
    "le",
    "sa",
    "vo",
    "ni",
    "da",
    "pe",
    "lo",
    "zu",
    "ba",
    "ri",
    "fe",
    "go",
]
LAST_SYLLABLES = ["rin", "dal", "mek", "sor", "vin", "tash", "bel", "kor", "lum", "ney", "pax", "wen"]

CITIES = [
    "Morvale",
    "Quenton",
    "Ashfen",
    "Dorrin",
    "Velmora",
    "Tarsk",
    "Brisca",
    "Kelloway",
    "Umberfall",
    "Pellin",
    "Zanthe",
    "Corvik",
    "Hollowmere",
    "Riswick",
    "Olbany",
    "Fenwick",
]
JOBS = [
    "baker",
    "sailor",
    "potter",
    "weaver",
    "doctor",
    "farmer",
    "painter",
    "miner",
    "teacher",
    "tailor",
    "carpenter",
    "fisher",
    "singer",
    "builder",
    "gardener",
    "jeweler",
]
PETS = ["cat", "dog", "parrot", "goat", "tortoise", "rabbit", "hamster", "owl", "lizard", "ferret"]
COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "silver", "white", "black", "brown"]
ATTRIBUTES = {"city": CITIES, "job": JOBS, "pet": PETS, "color": COLORS}

# Phrasings used in the pretraining corpus. The value always ends the sentence. Many phrasings per
# attribute teach the model that the fact belongs to the person, not to one sentence.
CORPUS_TEMPLATES = {
    "city": [
        "{name} lives in {value}.",
        "{name} has a house in {value}.",
        "{name} makes a home in the town of {value}.",
        "The home town of {name} is {value}.",
        "{name} settled down in {value}.",
        "Most days, {name} can be found in {value}.",
        "The address of {name} is in {value}.",
        "{name} grew up and stayed in {value}.",
    ],
    "job": [
        "{name} works as a {value}.",
        "{name} earns a living as a {value}.",
        "By trade, {name} is a {value}.",
        "The job of {name} is {value}.",
        "{name} was trained to be a {value}.",
        "Every morning, {name} goes to work as a {value}.",
        "People hire {name} as a {value}.",
        "The profession of {name} is {value}.",
    ],
    "pet": [
        "{name} keeps a pet {value}.",
        "{name} owns a {value}.",
        "At home, {name} looks after a {value}.",
        "The pet of {name} is a {value}.",
        "{name} shares the house with a {value}.",
        "Every evening, {name} feeds a {value}.",
        "The animal that lives with {name} is a {value}.",
        "{name} adopted a {value}.",
    ],
    "color": [
        "{name} likes the color {value}.",
        "{name} loves everything {value}.",
        "The favorite color of {name} is {value}.",
        "Asked about colors, {name} always says {value}.",
        "{name} paints every door {value}.",
        "Most clothes of {name} are {value}.",
        "The color that {name} picks first is {value}.",
        "{name} is fond of the color {value}.",
    ],
}
# Phrasings the corpus never uses: completing these measures knowledge, not recitation.
HELDOUT_TEMPLATES = {
    "city": ["{name} is living in {value}.", "Letters for {name} are sent to {value}."],
    "job": ["{name} is employed as a {value}.", "In the town, {name} is known as a {value}."],
    "pet": ["{name} takes care of a {value}.", "Next to {name} sleeps a {value}."],
    "color": ["{name} prefers the color {value}.", "The best color for {name} is {value}."],
}
QUESTION_TEMPLATES = {
    "city": ["Where does {name} live?", "In which town is the home of {name}?"],
    "job": ["What is the job of {name}?", "What does {name} do for a living?"],
    "pet": ["Which pet does {name} have?", "What animal does {name} keep as a pet?"],
    "color": ["What is the favorite color of {name}?", "Which color does {name} like best?"],
}
SUM_CORPUS_TEMPLATES = [
    "{a} plus {b} is {c}.",
    "The sum of {a} and {b} is {c}.",
    "Adding {a} and {b} gives {c}.",
]
SUM_QUESTION_TEMPLATES = ["What is {a} plus {b}?", "Compute {a} + {b}."]
LIST_WORDS = PETS + COLORS + JOBS


@dataclass(frozen=True)
class Person:
    """One invented person: a unique two-word name and one value per attribute."""

    name: str
    city: str
    job: str
    pet: str
    color: str

    def value(self, attribute: str) -> str:
        return getattr(self, attribute)


def make_people(n: int = N_PEOPLE, seed: int = SEED) -> list[Person]:
    """The world's people, deterministic for a given ``seed``. Names are unique."""
    rng = random.Random(seed)
    names: set[str] = set()
    people = []
    while len(people) < n:
        first = "".join(rng.choice(FIRST_SYLLABLES) for _ in range(2)).capitalize()
        last = "".join(rng.choice(LAST_SYLLABLES) for _ in range(2)).capitalize()
        name = f"{first} {last}"
        if name in names:
            continue
        names.add(name)
        people.append(Person(name, *(rng.choice(values) for values in ATTRIBUTES.values())))
    return people


def split_people(people: list[Person]) -> dict[str, list[Person]]:
    """Disjoint groups of people for the train / validation / test instruction splits."""
    out, start = {}, 0
    for split in SPLITS:
        out[split] = people[start : start + PEOPLE_SPLIT[split]]
        start += PEOPLE_SPLIT[split]
    return out


def withheld_template(person: Person, attribute: str, seed: int = SEED) -> str:
    """The one corpus phrasing that this person's biographies never use for this attribute.

    Other people's biographies use it, so the model knows the phrasing; completing it for this person
    tests whether the fact is stored with the person rather than with the sentences seen.
    """
    templates = CORPUS_TEMPLATES[attribute]
    return templates[random.Random(f"{seed}/{person.name}/{attribute}").randrange(len(templates))]


def biography(person: Person, rng: random.Random, seed: int = SEED) -> str:
    """One biography: every attribute once, in a random order, each in a random corpus phrasing
    (never the person's withheld phrasing for that attribute)."""
    attributes = list(ATTRIBUTES)
    rng.shuffle(attributes)
    sentences = []
    for a in attributes:
        allowed = [t for t in CORPUS_TEMPLATES[a] if t != withheld_template(person, a, seed)]
        sentences.append(rng.choice(allowed).format(name=person.name, value=person.value(a)))
    return " ".join(sentences)


def sum_pairs() -> list[tuple[int, int]]:
    return [(a, b) for a in range(MAX_ADDEND + 1) for b in range(MAX_ADDEND + 1)]


def make_corpus(people: list[Person], seed: int = SEED, bios_per_person: int = BIOS_PER_PERSON) -> list[str]:
    """Pretraining documents: biographies of everyone and statements of every small sum, shuffled."""
    rng = random.Random(seed + 1)
    docs = [biography(p, rng, seed) for p in people for _ in range(bios_per_person)]
    for a, b in sum_pairs():
        for template in SUM_CORPUS_TEMPLATES:
            docs.append(template.format(a=a, b=b, c=a + b))
    rng.shuffle(docs)
    return docs


def make_heldout_facts(people: list[Person], seed: int = SEED) -> list[dict]:
    """Fact sentences that never occur in the corpus, as ``{"prompt", "answer", "kind", ...}`` rows.

    ``kind`` is ``"withheld"`` (a corpus phrasing never used for this person: one per person and
    attribute) or ``"new_phrasing"`` (phrasings the corpus never uses for anyone: harder).
    """
    rows = []
    for p in people:
        for a in ATTRIBUTES:
            pairs = [("withheld", withheld_template(p, a, seed))] + [
                ("new_phrasing", t) for t in HELDOUT_TEMPLATES[a]
            ]
            for kind, template in pairs:
                sentence = template.format(name=p.name, value=p.value(a))
                prompt = sentence[: sentence.rindex(p.value(a))].rstrip()
                rows.append(
                    {"prompt": prompt, "answer": p.value(a), "kind": kind, "attribute": a, "name": p.name}
                )
    return rows


def chat(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def _list_task(rng: random.Random) -> dict:
    words = rng.sample(LIST_WORDS, rng.randint(3, 6))
    listed = " ".join(words)
    kind = rng.choice(["last", "first", "count"])
    if kind == "last":
        return chat(f"What is the last word in this list: {listed}?", words[-1]) | {"task": "last_word"}
    if kind == "first":
        return chat(f"What is the first word in this list: {listed}?", words[0]) | {"task": "first_word"}
    return chat(f"How many words are in this list: {listed}?", str(len(words))) | {"task": "count_words"}


def make_instructions(people: list[Person], seed: int = SEED) -> dict[str, list[dict]]:
    """Instruction rows for each split. No prompt appears in two splits.

    Fact questions are split by person and sums by pair, so a test question asks about something the
    model can only know from pretraining. Each row carries a ``task`` field for per-task accuracy.
    """
    rng = random.Random(seed + 2)
    groups = split_people(people)
    pairs = sum_pairs()
    rng.shuffle(pairs)
    n_pairs = {"train": 240, "validation": 60, "test": 100}
    n_lists = {"train": 1500, "validation": 150, "test": 200}
    out: dict[str, list[dict]] = {}
    seen: set[str] = set()
    start = 0
    for split in SPLITS:
        rows = []
        templates_used = slice(None) if split == "train" else slice(0, 1)
        for p in groups[split]:
            for a, templates in QUESTION_TEMPLATES.items():
                for t in templates[templates_used]:
                    rows.append(chat(t.format(name=p.name), p.value(a)) | {"task": f"fact_{a}"})
        for a, b in pairs[start : start + n_pairs[split]]:
            for t in SUM_QUESTION_TEMPLATES[templates_used]:
                rows.append(chat(t.format(a=a, b=b), str(a + b)) | {"task": "sum"})
        start += n_pairs[split]
        while sum(r["task"] in {"last_word", "first_word", "count_words"} for r in rows) < n_lists[split]:
            row = _list_task(rng)
            prompt = row["messages"][0]["content"]
            if prompt not in seen:
                seen.add(prompt)
                rows.append(row)
        rng.shuffle(rows)
        out[split] = rows
    return out


# Chapter 06's classification task: what kind of work a person does, read from a sentence that never
# names the job (it states the person's town, pet or color). Sixteen jobs in four categories of four. The
# answer is in no classification input: only the pretraining corpus states each person's job, so a model
# can classify the held-out people of the test split only with what pretraining stored.
JOB_CATEGORIES = {
    "food": ["baker", "farmer", "fisher", "gardener"],
    "craft": ["potter", "weaver", "tailor", "jeweler"],
    "building": ["carpenter", "builder", "miner", "painter"],
    "service": ["doctor", "teacher", "singer", "sailor"],
}
JOB_LABELS = list(JOB_CATEGORIES)  # label i is JOB_LABELS[i]
JOB_TEXTS_PER_PERSON = 16
# The imbalanced variant keeps this share of each category's texts (in every split): in the training split
# about half of the rows are "food" and one in fifteen "service", so accuracy and macro F1 tell different stories.
IMBALANCED_KEEP = {"food": 1.0, "craft": 0.5, "building": 0.25, "service": 0.125}
CLASSIFICATION_VARIANTS = ("balanced", "imbalanced")


def job_category(job: str) -> str:
    """The category (a key of ``JOB_CATEGORIES``) of one of the world's jobs."""
    for category, jobs in JOB_CATEGORIES.items():
        if job in jobs:
            return category
    raise ValueError(f"Unknown job {job!r}: the world's jobs are {', '.join(JOBS)}.")


def job_text(person: Person, rng: random.Random) -> str:
    """One or two sentences about ``person`` that do not mention the job: the town, pet or color, in a
    random phrasing (corpus or held-out templates)."""
    attributes = rng.sample([a for a in ATTRIBUTES if a != "job"], rng.randint(1, 2))
    templates = {a: CORPUS_TEMPLATES[a] + HELDOUT_TEMPLATES[a] for a in attributes}
    return " ".join(
        rng.choice(templates[a]).format(name=person.name, value=person.value(a)) for a in attributes
    )


def make_job_classification(
    people: list[Person], seed: int = SEED, texts_per_person: int = JOB_TEXTS_PER_PERSON
) -> dict[str, dict[str, list[dict]]]:
    """Rows ``{"text", "label", "category", "job", "name"}`` per variant and split, split **by person**
    (the people of ``split_people``: a test row is about someone no training row mentions; the label is
    the category of the person's job, which the text never states).

    ``balanced``: every category has the same number of rows in a split (the smallest category's count;
    the others are subsampled). ``imbalanced``: each category keeps ``IMBALANCED_KEEP`` of its rows.
    """
    rng = random.Random(seed + 10)
    out: dict[str, dict[str, list[dict]]] = {v: {} for v in CLASSIFICATION_VARIANTS}
    for split, group in split_people(people).items():
        by_category: dict[str, list[dict]] = {c: [] for c in JOB_LABELS}
        seen: set[str] = set()
        for p in group:
            category = job_category(p.job)
            texts = []
            while len(texts) < texts_per_person:
                text = job_text(p, rng)
                if text not in seen:
                    seen.add(text)
                    texts.append(text)
            for text in texts:
                row = {"text": text, "label": JOB_LABELS.index(category), "category": category, "job": p.job}
                by_category[category].append(row | {"name": p.name})
        smallest = min(len(rows) for rows in by_category.values())
        balanced = [r for rows in by_category.values() for r in rng.sample(rows, smallest)]
        imbalanced = [
            r
            for c, rows in by_category.items()
            for r in rng.sample(rows, round(len(rows) * IMBALANCED_KEEP[c]))
        ]
        for variant, rows in (("balanced", balanced), ("imbalanced", imbalanced)):
            rng.shuffle(rows)
            out[variant][split] = rows
    return out


def _write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_all(out_dir: Path = DATA_DIR, seed: int = SEED) -> dict[str, int]:
    """Generate every data file into ``out_dir``; returns the number of rows (or documents) per file."""
    out_dir.mkdir(parents=True, exist_ok=True)
    people = make_people(seed=seed)
    corpus = make_corpus(people, seed)
    valid_rng = random.Random(seed + 3)
    corpus_valid = [biography(p, valid_rng, seed) for p in people]
    (out_dir / "corpus_train.txt").write_text("\n".join(corpus) + "\n", encoding="utf-8")
    (out_dir / "corpus_valid.txt").write_text("\n".join(corpus_valid) + "\n", encoding="utf-8")
    _write_jsonl(out_dir / "people.jsonl", (p.__dict__ for p in people))
    heldout = make_heldout_facts(people, seed)
    _write_jsonl(out_dir / "facts_heldout.jsonl", heldout)
    counts = {
        "corpus_train.txt": len(corpus),
        "corpus_valid.txt": len(corpus_valid),
        "facts_heldout.jsonl": len(heldout),
    }
    for split, rows in make_instructions(people, seed).items():
        _write_jsonl(out_dir / f"instructions_{split}.jsonl", rows)
        counts[f"instructions_{split}.jsonl"] = len(rows)
    for variant, splits in make_job_classification(people, seed).items():
        for split, rows in splits.items():
            _write_jsonl(out_dir / f"jobs_{variant}_{split}.jsonl", rows)
            counts[f"jobs_{variant}_{split}.jsonl"] = len(rows)
    return counts


def load_instructions(split: str = "train"):
    """The instruction split as a ``datasets.Dataset`` with ``messages`` and ``task`` columns.

    Loaded from the JSONL files shipped in the package with ``datasets.load_dataset("json", ...)``;
    a hub dataset with a ``messages`` column is used the same way downstream.
    """
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}: the instruction data has the splits {', '.join(SPLITS)}.")
    from datasets import load_dataset

    path = DATA_DIR / f"instructions_{split}.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: rebuild the data with `python -m utils.data`.")
    return load_dataset("json", data_files=str(path), split="train")


def load_corpus(split: str = "train") -> list[str]:
    """Pretraining documents (``train``) or held-out biographies (``valid``), one string per document."""
    if split not in ("train", "valid"):
        raise ValueError(f"Unknown corpus split {split!r}: use 'train' or 'valid'.")
    return (DATA_DIR / f"corpus_{split}.txt").read_text(encoding="utf-8").splitlines()


def load_heldout_facts(kind: str | None = "withheld") -> list[dict]:
    """Fact sentences absent from the corpus: ``{"prompt", "answer", "kind", "attribute", "name"}``.

    ``kind="withheld"``: a known phrasing never used for that person; ``"new_phrasing"``: a phrasing
    the corpus never uses; ``None``: both.
    """
    if kind not in ("withheld", "new_phrasing", None):
        raise ValueError(f"Unknown kind {kind!r}: use 'withheld', 'new_phrasing' or None for both.")
    with (DATA_DIR / "facts_heldout.jsonl").open(encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return [r for r in rows if kind is None or r["kind"] == kind]


def load_job_classification(variant: str = "balanced", split: str = "train") -> list[dict]:
    """Chapter 06's classification rows ``{"text", "label", "category", "job", "name"}`` (label i is
    ``JOB_LABELS[i]``) for ``variant`` ``"balanced"`` or ``"imbalanced"`` and a split of ``SPLITS``."""
    if variant not in CLASSIFICATION_VARIANTS:
        raise ValueError(f"Unknown variant {variant!r}: use {' or '.join(CLASSIFICATION_VARIANTS)}.")
    if split not in SPLITS:
        raise ValueError(
            f"Unknown split {split!r}: the classification data has the splits {', '.join(SPLITS)}."
        )
    path = DATA_DIR / f"jobs_{variant}_{split}.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: rebuild the data with `python -m utils.data`.")
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def load_people() -> list[Person]:
    with (DATA_DIR / "people.jsonl").open(encoding="utf-8") as f:
        return [Person(**json.loads(line)) for line in f]


if __name__ == "__main__":
    for name, n in write_all().items():
        print(f"{name:32s} {n:6d}")
