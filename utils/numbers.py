"""Every measured number in the course's prose, traced to a cell that printed it or to a cited source.

The rule (what a figure is, what is exempt, how a figure matches a printed value, which files are in scope)
is written down in ``tests/test_numbers.py``, which runs it on every chapter. This module implements it:

* ``prose_passages(markdown, location)`` splits markdown into sentences, table rows, list items and headings,
  with line numbers, and blanks out what is not prose (fenced code, inline code, LaTeX, link targets, quotes);
* ``figures(passage)`` lists a passage's measured figures, exemptions applied (``exemption`` says why not);
* ``OutputPool(texts)`` holds every number some outputs printed; ``pool.supports(figure)`` says whether one
  of them rounds to the figure as written;
* ``Course().check_file(path)`` checks one lesson, solution notebook or bank file; ``check_text`` checks a
  string against given outputs; ``python -m utils.numbers`` prints every violation, grouped by file.
"""

from __future__ import annotations

import bisect
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# --- what a figure looks like ------------------------------------------------------------------------------

SIZE_UNITS = {
    "bit": 1 / 8, "bits": 1 / 8, "byte": 1, "bytes": 1,
    "KB": 1e3, "kB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
    "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40,
}  # fmt: skip
DURATION_UNITS = {
    "ms": 1e-3, "s": 1, "sec": 1, "second": 1, "seconds": 1,
    "min": 60, "minute": 60, "minutes": 60, "h": 3600, "hour": 3600, "hours": 3600,
}  # fmt: skip
COUNT_UNITS = {
    "K": 1e3,
    "k": 1e3,
    "M": 1e6,
    "B": 1e9,
    "T": 1e12,
    "thousand": 1e3,
    "million": 1e6,
    "billion": 1e9,
}

_UNIT = (
    r"(?P<unit>%|percent\b"
    r"|-?(?:bytes?|bits?)\b|(?:KB|kB|MB|GB|TB|KiB|MiB|GiB|TiB)\b"
    r"|(?:ms|sec|seconds?|min|minutes?|hours?)\b|[sh]\b"
    r"|(?:thousand|million|billion)\b|[KkMBT](?![\w'])"
    r"|[x×](?![\w(])|times(?= (?:smaller|larger|bigger|faster|slower|more|less|fewer|as)\b))?"
)
# A number (1,967,808 | 88.7 | 3.6e-06) not glued to a word or a number on its left (Qwen2.5, 10^6, 1/8)
# and not the start of a version on its right (5.23.0); ``numbers_in`` also drops the numbers of names.
NUMBER = re.compile(
    r"(?<![\w.,/^\\])(?P<num>(?:\d{1,3}(?:,\d{3})+|\d+)(?P<frac>\.\d+)?(?:[eE](?P<exp>[-+]?\d+))?)"
    r"(?![\d,]*\.\d)(?!,\d)\s?" + _UNIT
)

APPROX = re.compile(
    r"(?:\babout|\baround|\broughly|\bapproximately|\bnearly|\balmost|\bnear|~|≈|∼)\s*$", re.I
)
UPPER = re.compile(r"(?:\bunder|\bbelow|\bless than|\bat most|\bup to|\bno more than|<=?|≤)\s*$", re.I)
LOWER = re.compile(r"(?:\bover|\babove|\bmore than|\bat least|\bexceeds?|>=?|≥)\s*$", re.I)

# Configuration and specifications: a number right after one of these words (and an optional =, :, of, at,
# to, in, is, or the opening of a {1, 2, 4} list) is a setting, not a measurement.
CONFIG_WORDS = (
    r"r|rank|ranks|[Aa]lpha|lora_alpha|α|lora_dropout|[Dd]ropout|[Bb]atch|batch size|micro-batch|batch_size"
    r"|lr|[Ll]earning rate|epochs?|steps?|seeds?|block_size|block size|max_length|max length|d_in|d_out|d_ff"
    r"|d_model|hidden size|hidden_size|[Ww]armup|warmup_steps|warmup_ratio|clip|clipping|clipping at"
    r"|gradient norm|max_grad_norm|max_norm|norm to|[Tt]emperature|top_p|top-k|weight decay|weight_decay"
    r"|stride|beta\d?"
    r"|eps|capability|threshold|tolerance|patience|scale|scaling|gamma|quantile|defaults? to|by default"
)
CONFIG = re.compile(
    rf"(?:^|[^\w])(?:{CONFIG_WORDS})\s*(?:=|:|≥|>=|\bof\b|\bat\b|\bto\b|\bin\b|\bis\b)?\s*(?:\{{[\d.,\s]*)?$"
)
VERSION_BEFORE = re.compile(
    r"\b(?:transformers|peft|torch|pytorch|python|cuda|cudnn|bitsandbytes|datasets|accelerate|numpy|trl"
    r"|tokenizers|safetensors|jupyterlab|nbval|ruff|pytest|version|versions|release|v)\s*$",
    re.I,
)
SECTION_BEFORE = re.compile(
    r"(?:^|§|\bsections?|\bin|\bsee|\band|\bor|\bto|\bfrom|\blesson \d\d|\bnotebook(?:'s)?|\bchapter \d\d"
    r"|[,:(])\s*$",
    re.I,
)
DERIVATION = re.compile(
    r"(?:[\d)\]]\s*(?:\*\*|[-+*/×·^]|\bx\b)\s*-?[\d(\[][^=≈;:]*"  # 7e9 x 16, 8/64 + 32/(64 x 256), 2**-7
    r"|\b(?:exp|log|ln|sqrt)\([^=≈]*\)\s*"  # exp(3.8)
    r"|\b\d+(?:\.\d+)?\s*(?:[A-Za-z]\b\s*){1,4})"  # 4 N D
    r"(?:=|≈)\s*(?:about\s+|~)?$"
)
HARDWARE_AFTER = re.compile(
    r"\s*(?:GPUs?|T4|A100|A10G?|L4|H100|V100|RTX|cards?|VRAM|of VRAM|of GPU memory|RAM|memory)\b", re.I
)
MODEL_SIZE_AFTER = re.compile(
    r"(?:-\d+(?:\.\d+)?\s?[KMBT])?[-\s]?(?:instruct|base|chat|models?|parameters?|params?|LLMs?)\b", re.I
)
PER_ELEMENT_AFTER = re.compile(r"\s*(?:per\b|/\s?(?:param|parameter|weight|element|token|value))", re.I)
BUDGET_AFTER = re.compile(r"\s*(?:epochs?|steps?)\b", re.I)

# A citation: an arXiv id, an author-year reference, a URL, or a library source path.
ARXIV = re.compile(r"\b\d{4}\.\d{4,5}(?:v\d+)?\b")
_NOT_AUTHORS = r"(?!(?:In|Since|By|From|Until|Before|After|As|The|Early|Late|Mid|And|Or|Of|Up)\b)"
CITATION = re.compile(
    r"\barXiv\b|\b\d{4}\.\d{4,5}\b|https?://|\bet al\.|"
    rf"\b{_NOT_AUTHORS}[A-Z][a-z][\w'\-]*(?: (?:and|&) [A-Z][\w'\-]+)?,? \(?(?:19|20)\d\d[a-z]?\b|"
    r"\b[\w\-]+(?:/[\w.\-]+)*/[\w\-]+\.py\b"
)
REDUCTION = re.compile(
    r"\b(?:sav\w*|shrinks?|shrunk|smaller|less|fewer|reduc\w*|cuts?|drops?|lower|compress\w*)\b", re.I
)
CHAPTER_REF = re.compile(
    r"\b(?:chapters?|lessons?|notebooks?)\s(\d\d)\b|\b(?:solutions|notebooks|lessons)/(\d\d)[_-]", re.I
)


@dataclass(frozen=True)
class Figure:
    """A measured figure as written: ``value`` in its own unit, ``factor`` from that unit to the base unit
    (percent, second, byte, or 1), ``half`` half of its last written digit, ``qualifier`` about/under/over."""

    text: str
    kind: str  # percent | duration | size | ratio | count | plain
    value: float
    factor: float
    half: float
    qualifier: str = ""

    def interval(self) -> tuple[float, float]:
        """The values, in the figure's own unit, that the figure as written stands for."""
        v, h = self.value, self.half * (1 + 1e-9) + 1e-12
        if self.qualifier == "about":
            h = max(h, 0.05 * v)
        if self.qualifier == "under":
            return v / 2 - h, v + h
        if self.qualifier == "over":
            return v - h, 2 * v + h
        return v - h, v + h


@dataclass
class Passage:
    """A sentence, table row, list item or heading: ``raw`` as written, ``masked`` with what is not prose
    blanked out (same length, same offsets), a ``location`` for messages, and the line of every offset."""

    raw: str
    masked: str
    location: str
    first_line: int = 1
    line_starts: list[int] = field(default_factory=lambda: [0])
    snippet: OutputPool | None = None  # a bank entry's runnable code, which asserts its numbers
    lined: bool = True

    def line(self, offset: int) -> int:
        return self.first_line + bisect.bisect_right(self.line_starts, offset) - 1

    def where(self, offset: int) -> str:
        return f"{self.location}:{self.line(offset)}" if self.lined else self.location

    @property
    def cited(self) -> bool:
        return bool(CITATION.search(self.raw))

    @property
    def chapters(self) -> set[str]:
        return {a or b for a, b in CHAPTER_REF.findall(self.raw)}

    def snippet_at(self, offset: int, width: int = 90) -> str:
        flat = " ".join(self.raw.split())
        at = len(" ".join(self.raw[:offset].split()))
        start = max(0, at - width // 2)
        return (
            ("..." if start else "")
            + flat[start : start + width]
            + ("..." if start + width < len(flat) else "")
        )


# --- prose --------------------------------------------------------------------------------------------------


def _blank(match: re.Match) -> str:
    return re.sub(r"[^\n]", " ", match.group(0))


def mask_document(text: str) -> str:
    """Blank out, keeping every newline: fenced code blocks, display math and HTML comments."""
    text = re.sub(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", _blank, text, flags=re.S | re.M)
    text = re.sub(r"\$\$.*?\$\$", _blank, text, flags=re.S)
    return re.sub(r"<!--.*?-->", _blank, text, flags=re.S)


def mask_inline(text: str) -> str:
    """Blank out inline code, inline math, link targets, bare URLs and double-quoted text (a quoted wrong
    answer is not the course's claim)."""
    text = re.sub(r"(`+)(?:.|\n)*?\1", _blank, text)
    text = re.sub(r"(?<!\\)\$[^$]+?(?<!\\)\$", _blank, text)
    text = re.sub(r"\]\([^)\s]*\)", _blank, text)
    text = re.sub(r"https?://\S+", _blank, text)
    return re.sub(r"\"[^\"\n]{1,300}\"|“[^”\n]{1,300}”", _blank, text)


_ABBREVIATIONS = ("e.g.", "i.e.", "et al.", "vs.", "cf.", "Fig.", "approx.", "resp.", "etc.", "No.")
_SENTENCE_END = re.compile(r"(?<=[.!?])([)*_\"'”]*)\s+(?=[A-Z(*\"“\[_])")


def _sentences(block: str) -> list[tuple[int, int]]:
    spans, start = [], 0
    for m in _SENTENCE_END.finditer(block):
        end = m.start() + len(m.group(1))
        if block[start : m.start()].endswith(_ABBREVIATIONS) or re.search(
            r"\b[A-Z]\.$", block[start : m.start()]
        ):
            continue
        spans.append((start, end))
        start = m.end()
    spans.append((start, len(block)))
    return [(a, b) for a, b in spans if block[a:b].strip()]


def prose_passages(markdown: str, location: str, first_line: int = 1) -> list[Passage]:
    """Sentences of paragraphs and list items; whole table rows and headings; with their line numbers."""
    raw_lines, masked_lines = markdown.split("\n"), mask_document(markdown).split("\n")
    blocks: list[list[int]] = [[]]
    for i, line in enumerate(masked_lines):
        stripped = line.strip()
        previous = masked_lines[blocks[-1][-1]].strip() if blocks[-1] else ""
        if not stripped:
            blocks.append([])
        elif (
            stripped.startswith(("|", "#"))
            or re.match(r"([*+-]|\d+[.)])\s", stripped)
            or previous[:1] in "|#"
        ):
            blocks.append([i])
        else:
            blocks[-1].append(i)
    passages = []
    for lines in filter(None, blocks):
        raw = "\n".join(raw_lines[i] for i in lines)
        masked = mask_inline("\n".join(masked_lines[i] for i in lines))
        starts = [0]
        for i in lines[:-1]:
            starts.append(starts[-1] + len(raw_lines[i]) + 1)
        spans = [(0, len(raw))] if raw.lstrip().startswith(("|", "#")) else _sentences(masked)
        for a, b in spans:
            passages.append(
                Passage(
                    raw=raw[a:b],
                    masked=masked[a:b],
                    location=location,
                    first_line=first_line + lines[0] + bisect.bisect_right(starts, a) - 1,
                    line_starts=[0] + [s - a for s in starts if a < s < b],
                )
            )
    return passages


# --- figures ------------------------------------------------------------------------------------------------


def _value(num: str) -> float:
    return abs(float(num.replace(",", "")))


def _half(m: re.Match) -> float:
    decimals = len(m.group("frac")) - 1 if m.group("frac") else 0
    return 0.5 * 10.0 ** (int(m.group("exp") or 0) - decimals)


def _kind(unit: str | None) -> tuple[str, float]:
    u = (unit or "").lstrip("-")
    if not u:
        return "plain", 1.0
    if u in ("%", "percent"):
        return "percent", 1.0
    if u in SIZE_UNITS:
        return "size", SIZE_UNITS[u]
    if u in DURATION_UNITS:
        return "duration", DURATION_UNITS[u]
    if u in COUNT_UNITS:
        return "count", COUNT_UNITS[u]
    return "ratio", 1.0


def _is_product(text: str, end: int) -> bool:
    """After an ``x``: a digit, a one-letter variable or a parenthesis make a product (4096 x 4096, 3 x d)."""
    return bool(re.match(r"\s*(?:\d|\(|[A-Za-z](?![A-Za-z]))", text[end:]))


def _figure_kind(text: str, m: re.Match, unit: str | None) -> tuple[str, float]:
    kind, factor = _kind(unit)
    if kind == "ratio" and unit in ("x", "×") and _is_product(text, m.end()):
        return "product", 1.0
    if unit in ("s", "h") and re.match(r"\s+[b-z](?:\s|$|[),.])", text[m.end() :]):
        return "plain", 1.0  # "2 s b h bytes": algebra, not seconds
    return kind, factor


def exemption(passage: Passage, m: re.Match, sections: frozenset[str] = frozenset(), unit: str | None = None):
    """Why the number at ``m`` is not a measured figure (a short reason), or None when it is one. ``unit``:
    the unit it takes from the end of a range ("95 to 100%") when it has none of its own."""
    text, num, frac = passage.masked, m.group("num"), m.group("frac")
    before, after = text[max(0, m.start() - 60) : m.start()], text[m.end() :]
    flat_before = " ".join(before.split()) + (" " if before[-1:].isspace() else "")
    unit = unit or m.group("unit")
    kind, factor = _figure_kind(text, m, unit)
    if ARXIV.fullmatch(num):
        return "arXiv id"
    if re.search(r"(?:^|\n)\s*#{1,6}\s+$", text[: m.start()]):
        return "section number"
    if VERSION_BEFORE.search(before) or re.match(r"x?\s+(?:series|releases?)\b", text[m.end("num") :]):
        return "version"
    if (
        kind == "plain"
        and re.fullmatch(r"\d\.\d", num)
        and re.search(r"compute capabilit", passage.raw, re.I)
    ):
        return "version (a compute capability)"
    if kind == "product":
        return "operand of a product (4096 x 4096)"
    if kind == "plain" and not frac:
        return "setting (1e-5, 5e-4)" if m.group("exp") else "integer without a unit"
    if kind == "count" and (not frac or MODEL_SIZE_AFTER.match(after)):
        return "model size or integer count"
    if kind == "size" and not frac and _value(num) * factor <= 16:
        return "width of a number format (4 bytes, 8-bit)"
    if kind == "size" and PER_ELEMENT_AFTER.match(after):
        return "bytes per element (a number format)"
    if kind == "size" and HARDWARE_AFTER.match(after):
        return "hardware capacity (a 16 GB T4)"
    range_start = re.sub(r"(?:\d[\d.,]*(?:[eE][-+]?\d+)?\s?\S{0,3}\s*(?:to|–|-|/)\s*)+$", "", before)
    if CONFIG.search(range_start) or (
        kind == "plain" and BUDGET_AFTER.match(after)
    ):  # also "lr 1e-4 to 3e-4"
        return "configuration"
    if DERIVATION.search(flat_before):
        return "result of a derivation shown before it"
    if (
        kind == "plain"
        and re.match(r"\s*(?:[-+*/×·]|x\s)\s*[\d(]", after)
        and re.search(r"=|≈", after.split("\n")[0])
    ):
        return "operand of a derivation shown after it"
    if kind == "plain" and re.search(r"\b(?:exp|log|ln|sqrt)\($", before):
        return "operand of a derivation shown after it"
    if kind == "plain" and re.search(r"(?:§|\bsections?)\s*$", before):
        return "section number"
    if kind == "plain" and num in sections and (SECTION_BEFORE.search(before) or re.match(r"[)\],]", after)):
        return "section number"
    return None


def numbers_in(text: str) -> list[re.Match]:
    """Every number of a text, less those that belong to a name: a letter earlier in the same token
    (Llama-2-7B, Qwen2.5-0.5B, v0.21, sm_80); 0.6-0.8 is a range, not a name."""
    found = []
    for m in NUMBER.finditer(text):
        token = re.search(r"[\w.\-]*$", text[: m.start()]).group(0)
        if not re.search(r"[A-Za-z_]", token):
            found.append(m)
    return found


def figures(passage: Passage, sections: frozenset[str] = frozenset()) -> list[tuple[int, Figure]]:
    """(offset, figure) for every measured figure of a passage; in a range or list ("95 to 100%", "0.01-1%",
    "14 / 26 / 66 GB") each number without a unit takes the unit of the first one after it that has one."""
    found = []
    matches = numbers_in(passage.masked)
    for i, m in enumerate(matches):
        unit = m.group("unit")
        j = i
        while not unit and j + 1 < len(matches):
            gap, nxt = passage.masked[matches[j].end() : matches[j + 1].start()], matches[j + 1]
            if matches[j].group("unit") or not re.fullmatch(r"\s*(?:to|–|-|/)\s*", gap):
                break
            if _figure_kind(passage.masked, nxt, nxt.group("unit"))[0] not in ("plain", "product"):
                unit = nxt.group("unit")
            j += 1
        if exemption(passage, m, sections, unit) is not None:
            continue
        kind, factor = _figure_kind(passage.masked, m, unit)
        before = passage.masked[max(0, m.start() - 30) : m.start()]
        qualifier = next(
            (q for q, rx in (("about", APPROX), ("under", UPPER), ("over", LOWER)) if rx.search(before)), ""
        )
        written = " ".join(passage.masked[m.start() : m.end()].split())
        if unit != m.group("unit"):  # the first end of a range
            written = m.group("num") + ("" if unit == "%" else " ") + unit
        found.append((m.start(), Figure(written, kind, _value(m.group("num")), factor, _half(m), qualifier)))
    return found


# --- outputs ------------------------------------------------------------------------------------------------


class OutputPool:
    """Every number some outputs printed, by kind: percentages, seconds, bytes and ratios in base units;
    ``plain`` every printed unitless decimal (0.887 can be 88.7 %, 93.2 can be 93 s); ``count`` every
    numeral, integers too (4,194,304 is 4.2 M). ``snippet``: the outputs are a bank entry's runnable code,
    whose few literals are each asserted, so its integers count as plain values too."""

    def __init__(self, texts: list[str], snippet: bool = False):
        self.snippet = snippet
        pools: dict[str, list[float]] = {
            k: [] for k in ("percent", "duration", "size", "ratio", "plain", "count")
        }
        for text in texts:
            for m in numbers_in(text):
                value = _value(m.group("num"))
                kind, factor = _figure_kind(text, m, m.group("unit"))
                if kind == "plain" and re.search(r"%\W{0,3}$", text[max(0, m.start() - 4) : m.start()]):
                    kind = "percent"  # trainable%: 5.6001
                pools["count"].append(value * factor)
                if kind in pools and kind not in ("plain", "count"):
                    pools[kind].append(value * factor)
                if kind == "plain" and (snippet or m.group("frac") or m.group("exp")):
                    pools["plain"].append(value)  # unitless decimals only: a printed 2 stands for nothing
        self.pools = {k: sorted(v) for k, v in pools.items()}

    def add(self, kind: str, value: float) -> None:
        bisect.insort(self.pools[kind], value)
        bisect.insort(self.pools["count"], value)

    def _has(self, kind: str, lo: float, hi: float) -> bool:
        values = self.pools[kind]
        i = bisect.bisect_left(values, lo)
        return i < len(values) and values[i] <= hi

    def supports(self, figure: Figure, reduction: bool = False) -> bool:
        """Whether a printed value rounds to the figure as written. ``reduction``: the figure's passage speaks
        of a saving (saves, shrinks, smaller, ...), so 8% may have been printed as its complement, 92%."""
        lo, hi = figure.interval()
        if figure.kind == "plain":
            return any(self._has(k, lo, hi) for k in ("plain", "ratio", "percent"))
        if figure.kind == "count":
            return self._has("count", lo * figure.factor, hi * figure.factor)
        if figure.kind == "percent":
            spans = [(lo, hi)] + ([(100 - hi, 100 - lo)] if reduction else [])
            bare = self.snippet or not figure.qualifier  # a bare 0.887 for 88.7%, unless the figure is loose
            return any(
                self._has("percent", a, b) or (bare and self._has("plain", a / 100, b / 100))
                for a, b in spans
            )
        if figure.kind == "ratio":
            return self._has("ratio", lo, hi) or self._has("plain", lo, hi)
        return self._has(figure.kind, lo * figure.factor, hi * figure.factor) or self._has("plain", lo, hi)


# --- checking -----------------------------------------------------------------------------------------------


@dataclass
class Violation:
    location: str
    snippet: str
    figure: str
    reason: str

    def __str__(self) -> str:
        return f'{self.location}: "{self.snippet}" -> {self.figure} {self.reason}'


@dataclass
class Report:
    checked: int = 0
    violations: list[Violation] = field(default_factory=list)


WORD_NUMBERS = {
    "one": 1,
    "two": 2,
    "three": 3,
    "four": 4,
    "five": 5,
    "six": 6,
    "seven": 7,
    "eight": 8,
    "nine": 9,
    "ten": 10,
}
BUDGET = re.compile(
    r"\b(\d[\d,]*|" + "|".join(WORD_NUMBERS) + r")\s+(epochs?|steps|conversations|examples|questions)\b", re.I
)


def budget_claims(text: str) -> set[tuple[int, str]]:
    """(number, unit) for every "2 epochs", "two epochs", "2,940 conversations" in a text."""
    claims = set()
    for m in BUDGET.finditer(text):
        n = m.group(1).lower()
        claims.add((WORD_NUMBERS.get(n) or int(n.replace(",", "")), m.group(2).lower().rstrip("s")))
    return claims


def check_passages(
    passages: list[Passage],
    own: OutputPool,
    own_name: str,
    sections: frozenset[str] = frozenset(),
    chapter: str = "",
    other_pool=lambda number: None,
    other_text=lambda number: None,
) -> Report:
    """Every figure of ``passages`` against ``own`` (chapter ``chapter``'s outputs, called ``own_name`` in
    messages), the passage's bank snippet, and the outputs of any other chapter the passage names; and every
    budget ("3 epochs") a passage quotes for another chapter against what that chapter itself says."""
    report = Report()
    for p in passages:
        named = sorted(p.chapters - {chapter})
        cited, reduction = p.cited, bool(REDUCTION.search(p.raw))
        for offset, fig in figures(p, sections):
            report.checked += 1
            pools = [own, p.snippet] + [other_pool(n) for n in named]
            if cited or any(q is not None and q.supports(fig, reduction) for q in pools):
                continue
            where = " or ".join([own_name] + [f"chapter {n}'s" for n in named if other_pool(n) is not None])
            where += " outputs" + (" or the entry's snippet" if p.snippet else "")
            report.violations.append(
                Violation(
                    p.where(offset), p.snippet_at(offset), fig.text, f"not found in {where} and no citation"
                )
            )
        for n in named:
            said = other_text(n)
            if said is None:
                continue
            said_claims = budget_claims(said)
            for m in BUDGET.finditer(p.masked):
                report.checked += 1
                if not cited and not budget_claims(m.group(0)) <= said_claims:
                    report.violations.append(
                        Violation(
                            p.where(m.start()),
                            p.snippet_at(m.start()),
                            m.group(0),
                            f"is not what chapter {n} says (its lesson, notebook and outputs never say it)",
                        )
                    )
    return report


def check_text(markdown: str, outputs: list[str], location: str = "text") -> Report:
    """Check one piece of markdown against some printed outputs, as a chapter's files are checked."""
    return check_passages(prose_passages(markdown, location), OutputPool(outputs), "the")


# --- the course's files ------------------------------------------------------------------------------------

BANK_FIELDS = ("answer_en", "correction", "evidence")  # questions pose hypotheticals; wrong_claim is the myth


def _source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def _rel(path: Path) -> str:
    return str(path.resolve().relative_to(ROOT))


def notebook_cells(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def notebook_outputs(path: Path) -> list[str]:
    """Text outputs of the code cells (stream, text/plain, text/markdown), leaving out the quiz cells: they
    print the question bank, which is prose, not a measurement."""
    texts = []
    for cell in notebook_cells(path):
        if cell["cell_type"] != "code" or re.search(r"\bquiz\(", _source(cell)):
            continue
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                texts.append("".join(out.get("text", "")))
            for key in ("text/plain", "text/markdown"):
                if key in out.get("data", {}):
                    texts.append("".join(out["data"][key]))
    return texts


def lesson_passages(path: Path) -> list[Passage]:
    text = path.read_text(encoding="utf-8")
    # Lesson 09's bank block is generated from utils/questions/*.json, which is checked at its source.
    text = re.sub(r"<!-- BEGIN BANK -->.*?<!-- END BANK -->", _blank, text, flags=re.S)
    return prose_passages(text, _rel(path))


def notebook_passages(path: Path) -> list[Passage]:
    passages = []
    for i, cell in enumerate(notebook_cells(path)):
        if cell["cell_type"] == "markdown":
            passages += prose_passages(_source(cell), f"{_rel(path)}[cell {i}]")
    return passages


def bank_passages(path: Path) -> list[Passage]:
    """The English answers, corrections and evidence of a bank file; each passage carries the pool of its
    entry's runnable snippet (``code_runs``: tests/test_quiz.py runs it; comments are left out)."""
    passages = []
    for entry in json.loads(path.read_text(encoding="utf-8")):
        snippet = None
        if entry.get("code_runs") and entry.get("code"):
            snippet = OutputPool([re.sub(r"#.*", "", entry["code"])], snippet=True)
        for key in BANK_FIELDS:
            for p in prose_passages(entry.get(key) or "", f"{_rel(path)}:{entry['id']}.{key}"):
                p.lined, p.snippet = False, snippet  # the location names the field: no line numbers
                passages.append(p)
    return passages


class Course:
    """The course's chapters as the rule sees them, each file read once."""

    def __init__(self, root: Path = ROOT):
        self.root = root
        self._pools: dict[str, OutputPool | None] = {}
        self._texts: dict[str, str | None] = {}
        self.sections = self._section_numbers()

    def files(self, number: str) -> dict[str, Path | None]:
        lessons = sorted((self.root / "lessons").glob(f"{number}-*.md"))
        solutions = sorted((self.root / "solutions").glob(f"{number}_*.ipynb"))
        bank = self.root / "utils" / "questions" / f"ch{number}.json"
        return {
            "lesson": lessons[0] if lessons else None,
            "solution": solutions[0] if solutions else None,
            "bank": bank if bank.exists() else None,
        }

    def chapters(self) -> list[str]:
        """Chapters with a solution notebook: only they have outputs to trace numbers to."""
        return sorted(p.name[:2] for p in (self.root / "solutions").glob("[0-9][0-9]_*.ipynb"))

    def checked_files(self) -> list[Path]:
        return [p for n in self.chapters() for p in self.files(n).values() if p is not None]

    def unchecked_banks(self) -> list[Path]:
        """Bank files of chapters without a notebook yet: their figures have nothing to be traced to."""
        done = set(self.chapters())
        return [
            p for p in sorted((self.root / "utils" / "questions").glob("ch*.json")) if p.stem[2:] not in done
        ]

    def _section_numbers(self) -> frozenset[str]:
        texts = [p.read_text(encoding="utf-8") for p in sorted((self.root / "lessons").glob("*.md"))]
        for nb in sorted((self.root / "solutions").glob("*.ipynb")):
            texts += [_source(c) for c in notebook_cells(nb) if c["cell_type"] == "markdown"]
        return frozenset(
            m.group(1) for t in texts for m in re.finditer(r"^#{1,6}\s+(\d+(?:\.\d+)+)\b", t, re.M)
        )

    def pool(self, number: str) -> OutputPool | None:
        """What chapter ``number``'s solution notebook printed, and what its execution measured
        (utils/measurements.json: wall seconds and peak memory, written by ``make execute``)."""
        if number not in self._pools:
            solution = self.files(number)["solution"]
            self._pools[number] = None if solution is None else OutputPool(notebook_outputs(solution))
            measured = self.root / "utils" / "measurements.json"
            if solution is not None and measured.exists():
                for key, value in json.loads(measured.read_text()).get(number, {}).items():
                    if isinstance(value, (int, float)):
                        kind, factor = _measurement_unit(key)
                        self._pools[number].add(kind, value * factor)
        return self._pools[number]

    def text(self, number: str) -> str | None:
        """Everything chapter ``number`` says and prints: lesson, notebook markdown, outputs."""
        if number not in self._texts:
            f = self.files(number)
            if f["solution"] is None:
                self._texts[number] = None
            else:
                parts = [f["lesson"].read_text(encoding="utf-8")] if f["lesson"] else []
                parts += [_source(c) for c in notebook_cells(f["solution"]) if c["cell_type"] == "markdown"]
                self._texts[number] = "\n".join(parts + notebook_outputs(f["solution"]))
        return self._texts[number]

    def check_file(self, path: Path) -> Report:
        """One lesson, solution notebook or bank file, against its chapter's outputs."""
        number = path.stem[2:4] if path.suffix == ".json" else path.name[:2]
        own = self.pool(number)
        if own is None:
            raise ValueError(f"chapter {number} has no solution notebook to trace {path.name} to")
        reader = {".md": lesson_passages, ".ipynb": notebook_passages, ".json": bank_passages}[path.suffix]
        return check_passages(
            reader(path),
            own,
            _rel(self.files(number)["solution"]),
            self.sections,
            number,
            self.pool,
            self.text,
        )


def _measurement_unit(key: str) -> tuple[str, float]:
    key = key.lower()
    if key.endswith(("seconds", "_s")):
        return "duration", 1.0
    for unit in ("gib", "mib", "gb", "mb"):
        if key.endswith(unit):
            return "size", next(f for u, f in SIZE_UNITS.items() if u.lower() == unit)
    return "plain", 1.0


def main() -> int:
    course = Course()
    total = 0
    for path in course.checked_files():
        report = course.check_file(path)
        total += len(report.violations)
        print(f"## {_rel(path)}: {report.checked} figures checked, {len(report.violations)} untraced")
        print("".join(f"{v}\n" for v in report.violations))
    print(f"{total} untraced figures")
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())
