"""Chapter 01: label masking from token ids, the shifted causal-LM loss, packing."""

from __future__ import annotations

import numbers
from collections.abc import Callable

from utils.checks.core import (
    CheckFailed,
    call_on_copies,
    close,
    describe,
    expect_tensor,
    fresh_copy,
    mutation_message,
    run_check,
)

PACK_FIELDS = ("input_ids", "labels", "position_ids", "seq_lengths")


def labels_from_ids_reference(input_ids: list[int], assistant_id: int, end_id: int) -> list[int]:
    """Labels for a rendered conversation: keep each assistant answer (the tokens after an
    ``<|assistant|>`` token, up to and including its ``<|end|>``), -100 everywhere else.

    On the course's chat template this gives the labels ``utils.sft.tokenize_conversation`` derives from
    the template's assistant mask (tests/test_checks_ch01.py asserts it)."""
    labels, inside = [], False
    for token in input_ids:
        labels.append(token if inside else -100)
        if token == assistant_id:
            inside = True
        elif token == end_id:
            inside = False
    return labels


def _conversation_cases(tokenizer) -> list[tuple[str, list[int]]]:
    cases = [
        ("a one-turn chat", [
            {"role": "user", "content": "Where does Zusa Wensor live?"},
            {"role": "assistant", "content": "Ashfen"},
        ]),
        ("a two-turn chat with a system message", [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "What is 3 plus 4?"},
            {"role": "assistant", "content": "7"},
            {"role": "user", "content": "And 5 plus 5?"},
            {"role": "assistant", "content": "It is 10"},
        ]),
    ]  # fmt: skip
    return [
        (name, list(tokenizer.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"]))
        for name, c in cases
    ]


def _as_int_list(got, what: str) -> list[int]:
    """``got`` (a list, tuple or 1-D tensor of ints) as a list of ints, or ``CheckFailed`` saying why not."""
    import torch

    if isinstance(got, torch.Tensor):
        if got.dim() != 1 or got.is_floating_point():
            raise CheckFailed(f"{what} must be a flat list of ints; you return {describe(got)}.")
        return got.tolist()
    if not isinstance(got, list | tuple):
        raise CheckFailed(f"{what} must be a list of ints; you return {describe(got)}.")
    bad = next((v for v in got if isinstance(v, bool) or not isinstance(v, numbers.Integral)), None)
    if bad is not None:
        raise CheckFailed(f"{what} must hold ints (token ids or -100); one entry is {describe(bad)}.")
    return [int(v) for v in got]


def check_labels_from_ids(labels_fn: Callable, tokenizer) -> bool | None:
    """Check ``labels_fn(input_ids, assistant_id, end_id) -> labels`` on single- and multi-turn chats."""
    assistant_id = tokenizer.convert_tokens_to_ids("<|assistant|>")
    end_id = tokenizer.convert_tokens_to_ids("<|end|>")

    def body(fn):
        for name, ids in _conversation_cases(tokenizer):
            want = labels_from_ids_reference(ids, assistant_id, end_id)
            got, changed = call_on_copies(fn, input_ids=ids, assistant_id=assistant_id, end_id=end_id)
            got = _as_int_list(got, "the labels")
            if changed:
                raise CheckFailed(
                    f"{name}: "
                    + mutation_message(
                        changed,
                        "`labels = input_ids` gives the same list a second name, so setting a label to -100 "
                        "also erases the token; build a new list",
                    )
                )
            if len(got) != len(want):
                raise CheckFailed(
                    f"{name}: labels need one entry per token ({len(want)}), you return {len(got)}."
                )
            if got == want:
                continue
            kept = [g for g in got if g != -100]
            if any(g != -100 and g != t for g, t in zip(got, ids, strict=True)):
                raise CheckFailed(f"{name}: a kept label must equal the token id at that position.")
            if assistant_id in kept:
                raise CheckFailed(f"{name}: you keep the <|assistant|> token itself; the prompt supplies it.")
            if end_id not in kept:
                raise CheckFailed(
                    f"{name}: the <|end|> token after an answer is masked; how would the model learn to stop?"
                )
            n_kept, n_want = len(kept), sum(t != -100 for t in want)
            if n_kept > n_want:
                raise CheckFailed(
                    f"{name}: you keep {n_kept} tokens, the answer(s) have {n_want}: masking starts again "
                    "after each <|end|>."
                )
            raise CheckFailed(
                f"{name}: you keep {n_kept} tokens, the answer(s) have {n_want}; is every turn covered?"
            )

    return run_check("labels from token ids", labels_fn, body)


# The shifted loss.


def _loss_variants(logits, labels) -> list[tuple[str, object]]:
    """What the common slips compute, each with the hint that names it (most specific first)."""
    import torch
    import torch.nn.functional as F

    logits = logits.detach().float()
    vocab = logits.shape[-1]
    sl, tl = logits[:, :-1], labels[:, 1:]
    per_token = F.cross_entropy(sl.reshape(-1, vocab), tl.reshape(-1), ignore_index=-100, reduction="none")
    per_token = per_token.view(tl.shape)
    kept = tl != -100
    return [
        (
            "your loss pairs the logits at position t with the label at t: which token should they predict?",
            F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100),
        ),
        (
            "you shift the wrong way: the logits at position t predict the label at t + 1, so drop the "
            "last logit and the first label.",
            F.cross_entropy(logits[:, 1:].flatten(0, 1), labels[:, :-1].flatten(), ignore_index=-100),
        ),
        (
            "you shift after flattening the batch, so the last position of each row is paired with the first "
            "label of the next row: shift within each row, then flatten.",
            F.cross_entropy(logits.flatten(0, 1)[:-1], labels.flatten()[1:], ignore_index=-100),
        ),
        (
            "that is the sum over tokens; the model reports the mean over the unmasked targets.",
            per_token.sum(),
        ),
        (
            "you divide by every position, -100 ones included; the mean is over the targets that are not -100.",
            per_token.sum() / per_token.numel(),
        ),
        (
            "the -100 labels take part in your loss (as a token id); cross-entropy must skip them.",
            F.cross_entropy(sl.reshape(-1, vocab), tl.clamp(min=0).reshape(-1)),
        ),
        (
            "you average each row, then the rows; the model averages over all unmasked targets of the batch "
            "at once (a long answer weighs more than a short one).",
            torch.stack([per_token[i][kept[i]].mean() for i in range(len(kept)) if kept[i].any()]).mean(),
        ),
    ]


def check_causal_lm_loss(loss_fn: Callable, model, batch: dict) -> bool | None:
    """Check ``loss_fn(logits, labels) -> scalar`` against the model's own loss (to 1e-6, absolute and
    relative: another order of the same float32 sum differs by a few units in the last place).

    Two batches: the caller's, and the same inputs with labels = input_ids (padding -100), where the
    first position of every row is a real token, so a shift that crosses rows cannot hide."""
    import torch

    if "labels" not in batch:
        raise ValueError("check_causal_lm_loss needs a batch with labels (as sft.collate builds).")
    with torch.no_grad():
        out = model(**batch)
        labels_all = batch["input_ids"].clone()
        if "attention_mask" in batch:
            labels_all[batch["attention_mask"] == 0] = -100
        loss_function = getattr(model, "loss_function", None)  # what the model's forward computes
        if callable(loss_function):
            loss_all = loss_function(logits=out.logits, labels=labels_all, vocab_size=out.logits.shape[-1])
        else:
            loss_all = model(**{**batch, "labels": labels_all}).loss
    logits = out.logits.float()  # the model's loss upcasts half-precision logits too
    cases = [
        ("", logits, batch["labels"], out.loss),
        (
            "on a second batch whose labels are the input ids (the first label of every row a real token): ",
            logits,
            labels_all,
            loss_all,
        ),
    ]

    def body(fn):
        for where, logits, labels, want in cases:
            got, changed = call_on_copies(fn, logits=logits, labels=labels)
            if changed:
                raise CheckFailed(
                    where
                    + mutation_message(
                        changed,
                        "a slice such as labels[:, 1:] is a view of the same memory, so assigning into "
                        "it (or shifting in place) rewrites the caller's tensor; compute new tensors instead",
                    )
                )
            if not torch.is_tensor(got) or got.dim() != 0:
                shape = f"a tensor of shape {tuple(got.shape)}" if torch.is_tensor(got) else describe(got)
                raise CheckFailed(f"return a scalar tensor (the mean loss); your function returned {shape}.")
            got = expect_tensor(got, what="a scalar tensor (the mean loss)")
            if not torch.isfinite(got.detach()):
                raise CheckFailed(
                    f"{where}your loss is {got.item()}: is a division by a count of zero, or a log of zero, "
                    "in it?"
                )
            if close(got, want, atol=1e-6, rtol=1e-6):  # float32 sums of ~1e3 terms round at 1e-6
                continue
            for hint, value in _loss_variants(logits, labels):
                if close(got, value, atol=1e-6, rtol=1e-5):
                    raise CheckFailed(where + hint)
            raise CheckFailed(
                f"{where}you get {got.item():.6f}, the model's loss is {want.item():.6f}. "
                "Are -100 labels ignored?"
            )

    return run_check("shifted cross-entropy", loss_fn, body)


# Packing.


def _edge_examples() -> list[dict]:
    """Examples whose first-fit packing at block_size 8 fills every row exactly (8 tokens), with one
    example exactly block_size long: an off-by-one at the boundary changes every row."""
    examples = []
    for i, (n, prompt) in enumerate([(3, 1), (5, 2), (4, 3), (4, 1), (2, 1), (6, 4), (8, 5), (1, 0), (7, 3)]):
        ids = [100 + 10 * i + j for j in range(n)]
        examples.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return examples


def _rows(got) -> list[dict]:
    """The learner's rows with every field as a list of ints, or ``CheckFailed`` naming what is off."""
    if not isinstance(got, list) or not all(isinstance(r, dict) for r in got):
        what = (
            describe(got)
            if not isinstance(got, list)
            else "a list holding " + describe(next(r for r in got if not isinstance(r, dict)))
        )
        raise CheckFailed(
            f"return a list of rows, each a dict with {', '.join(PACK_FIELDS)}; your function returned {what}."
        )
    rows = []
    for i, r in enumerate(got):
        missing = [k for k in PACK_FIELDS if k not in r]
        if missing:
            raise CheckFailed(f"row {i} has no {missing[0]!r}.")
        rows.append({k: _as_int_list(r[k], f"row {i}'s {k}") for k in PACK_FIELDS})
        n = len(rows[-1]["input_ids"])
        for k in ("labels", "position_ids"):
            if len(rows[-1][k]) != n:
                raise CheckFailed(
                    f"row {i} has {n} input_ids but {len(rows[-1][k])} {k}: one of each per token."
                )
    return rows


def _first_fit_reaching(lengths: list[int], block_size: int) -> list[list[int]]:
    """The grouping of the off-by-one slip: a new row as soon as the next example would *reach* block_size."""
    groups: list[list[int]] = [[]]
    for n in lengths:
        if groups[-1] and sum(groups[-1]) + n >= block_size:
            groups.append([])
        groups[-1].append(n)
    return groups


def _pack_diagnosis(rows: list[dict], want: list[dict], examples: list[dict], block_size: int) -> None:
    """Raise ``CheckFailed`` naming the first problem of ``rows`` (the reference rows are ``want``)."""
    if not rows:
        raise CheckFailed("you return no rows.")
    empty = next((i for i, r in enumerate(rows) if not r["input_ids"]), None)
    if empty is not None:
        raise CheckFailed(f"row {empty} is empty: add a row to the result only once it holds an example.")
    too_long = next((i for i, r in enumerate(rows) if len(r["input_ids"]) > block_size), None)
    if too_long is not None:
        raise CheckFailed(
            f"row {too_long} has {len(rows[too_long]['input_ids'])} tokens, more than block_size={block_size}."
        )
    flat = [t for r in rows for t in r["input_ids"]]
    in_order = [t for e in examples for t in e["input_ids"]]
    if flat != in_order:
        if rows == want[: len(rows)] and len(rows) == len(want) - 1:
            raise CheckFailed(
                "the last row is missing: when the loop ends, the row being filled must be added too."
            )
        if flat == [t for e in reversed(examples) for t in e["input_ids"]]:
            raise CheckFailed(
                "the examples come out in reverse order; first fit in order keeps the order given."
            )
        if sorted(flat) == sorted(in_order):
            raise CheckFailed(
                "every token is there, but the examples are reordered; first fit in order keeps the order given."
            )
        raise CheckFailed(
            f"the rows hold {len(flat)} tokens, the examples {len(in_order)}: every token of every example "
            "must be in exactly one row, once."
        )
    if any(sum(r["seq_lengths"]) != len(r["input_ids"]) for r in rows):
        raise CheckFailed("seq_lengths of a row must add up to its length.")
    lengths = [len(e["input_ids"]) for e in examples]
    if [n for r in rows for n in r["seq_lengths"]] != lengths:
        raise CheckFailed(
            "each entry of seq_lengths is the length of one whole example: an example never spans two rows."
        )
    grouping, want_grouping = [r["seq_lengths"] for r in rows], [r["seq_lengths"] for r in want]
    if grouping != want_grouping:
        if grouping == _first_fit_reaching(lengths, block_size):
            raise CheckFailed(
                f"a row may be filled exactly to block_size={block_size} tokens: start a new row only when the "
                "next example would go past block_size, not when it would reach it."
            )
        raise CheckFailed(
            f"you use {len(rows)} rows, first fit in order needs {len(want)}: keep adding examples to the "
            "current row while the next one fits, start a new row when it does not."
            if len(rows) != len(want)
            else "the examples are grouped into rows differently from first fit in order: keep adding "
            "examples to the current row while the next one fits, start a new row when it does not."
        )
    for i, (r, w) in enumerate(zip(rows, want, strict=True)):
        if r["position_ids"] != w["position_ids"]:
            raise CheckFailed(
                f"row {i}: position_ids must restart at 0 for each example, as if it were alone."
            )
        if r["labels"] != w["labels"]:
            if r["labels"] == r["input_ids"]:
                raise CheckFailed(
                    f"row {i}: your labels are the input ids, so the prompts are trained on too: each "
                    "example brings its own labels (its prompt is -100); a row's labels are those, in order."
                )
            raise CheckFailed(
                f"row {i}: the labels differ from the examples' own labels: a row's labels are its examples' "
                "labels, in the same order as their input ids."
            )
        for k in PACK_FIELDS:
            if r[k] != w[k]:
                raise CheckFailed(f"row {i}: {k} differs from first fit in order.")


def check_pack(pack_fn: Callable, examples: list[dict], block_size: int = 64) -> bool | None:
    """Check ``pack_fn(examples, block_size) -> rows`` against ``utils.sft.pack_examples``, every field of
    every row: on the caller's examples (deep copies: the caller's list is never handed out), then on
    examples that fill rows exactly to the block size."""
    from utils.sft import pack_examples

    cases = [
        ("", fresh_copy(examples), block_size),
        ("on examples that fill rows exactly: ", _edge_examples(), 8),
    ]
    wants = [pack_examples(fresh_copy(ex), size) for _, ex, size in cases]  # raises if an example is too long

    def body(fn):
        for (where, ex, size), want in zip(cases, wants, strict=True):
            got, changed = call_on_copies(fn, examples=ex, block_size=size)
            if changed:
                raise CheckFailed(
                    where
                    + mutation_message(
                        changed,
                        "a row that starts as an example's own list (row = examples[0], or "
                        "row['input_ids'] = ex['input_ids']) is that list, so extending the row extends the "
                        "example; start every row from new empty lists",
                    )
                )
            try:
                _pack_diagnosis(_rows(got), want, ex, size)
            except CheckFailed as err:
                raise CheckFailed(where + str(err)) from None

    return run_check("pack examples", pack_fn, body)
