"""Chapter 01's checkers: labels from token ids, the shifted loss, packing. Each gets the right answer in
more than one style, the untouched stub, a body left above the stub's raise, and the common mistakes."""

import copy

import pytest
import torch
import torch.nn.functional as F

from utils import checks, data, sft


@pytest.fixture(scope="module")
def tokenizer(tiny):
    return tiny[1]


@pytest.fixture(scope="module")
def examples(tokenizer):
    return sft.tokenize_rows(tokenizer, data.load_instructions("train").select(range(60)))


@pytest.fixture(scope="module")
def batch(tokenizer, examples):
    return sft.collate(examples[:16], tokenizer.pad_token_id)


# Labels from token ids.


def labels_loop_style(input_ids, assistant_id, end_id):  # the reference's twin, written with indices
    labels = [-100] * len(input_ids)
    start = None
    for i, t in enumerate(input_ids):
        if t == assistant_id:
            start = i + 1
        elif t == end_id and start is not None:
            labels[start : i + 1] = input_ids[start : i + 1]
            start = None
    return labels


def labels_stub(input_ids: list[int], assistant_id: int, end_id: int) -> list[int]:
    """Labels for a rendered conversation: the answers (and their <|end|>) kept, -100 elsewhere."""
    # YOUR CODE HERE
    raise NotImplementedError("Exercise: write this part, then run the check below.")


def labels_body_left_above_the_raise(input_ids, assistant_id, end_id):
    labels = checks.labels_from_ids_reference(input_ids, assistant_id, end_id)
    raise NotImplementedError("Exercise: write this part, then run the check below.")
    return labels


def keeps_the_assistant_token(input_ids, assistant_id, end_id):
    labels, inside = [], False
    for t in input_ids:
        if t == assistant_id:
            inside = True
        labels.append(t if inside else -100)
        if t == end_id:
            inside = False
    return labels


def masks_the_end_token(input_ids, assistant_id, end_id):
    labels, inside = [], False
    for t in input_ids:
        if t == end_id:
            inside = False
        labels.append(t if inside else -100)
        if t == assistant_id:
            inside = True
    return labels


def first_turn_only(input_ids, assistant_id, end_id):
    labels, inside, done = [], False, False
    for t in input_ids:
        labels.append(t if inside else -100)
        if t == assistant_id and not done:
            inside = True
        elif t == end_id and inside:
            inside, done = False, True
    return labels


def never_stops(input_ids, assistant_id, end_id):
    labels, inside = [], False
    for t in input_ids:
        labels.append(t if inside else -100)
        inside = inside or t == assistant_id
    return labels


def shifted_labels(input_ids, assistant_id, end_id):
    right = checks.labels_from_ids_reference(input_ids, assistant_id, end_id)
    return [
        input_ids[i + 1] if lab != -100 and i + 1 < len(input_ids) else lab for i, lab in enumerate(right)
    ]


def aliases_the_input(input_ids, assistant_id, end_id):
    labels, inside = input_ids, False  # a second name for the same list
    for i, t in enumerate(input_ids):
        keep = inside
        if t == assistant_id:
            inside = True
        elif t == end_id:
            inside = False
        if not keep:
            labels[i] = -100
    return labels


@pytest.mark.parametrize("fn", [checks.labels_from_ids_reference, labels_loop_style])
def test_labels_right_answers_pass(fn, tokenizer, capsys):
    assert checks.check_labels_from_ids(fn, tokenizer) is True
    assert "[labels from token ids] correct." in capsys.readouterr().out


def test_labels_reference_agrees_with_the_templates_assistant_mask(tokenizer):
    a, e = tokenizer.convert_tokens_to_ids("<|assistant|>"), tokenizer.convert_tokens_to_ids("<|end|>")
    for row in data.load_instructions("train").select(range(20)):
        ex = sft.tokenize_conversation(tokenizer, row["messages"])
        assert checks.labels_from_ids_reference(ex["input_ids"], a, e) == ex["labels"]


def test_labels_stub_and_left_raise(tokenizer, capsys):
    assert checks.check_labels_from_ids(labels_stub, tokenizer) is None
    assert "not attempted yet" in capsys.readouterr().out
    assert checks.check_labels_from_ids(labels_body_left_above_the_raise, tokenizer) is None
    assert "delete that line" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("fn", "reason"),
    [
        (keeps_the_assistant_token, "you keep the <|assistant|> token itself"),
        (masks_the_end_token, "the <|end|> token after an answer is masked"),
        (first_turn_only, "a two-turn chat with a system message: you keep 2 tokens"),
        (first_turn_only, "is every turn covered?"),
        (never_stops, "masking starts again after each <|end|>"),
        (shifted_labels, "a kept label must equal the token id at that position"),
        (aliases_the_input, "changes its input `input_ids` in place"),
        (lambda ids, a, e: None, "the labels must be a list of ints; you return None"),
        (lambda ids, a, e: [-100] * (len(ids) - 1), "labels need one entry per token"),
        (lambda ids, a, e: [float(t) for t in ids], "must hold ints"),
    ],
)
def test_labels_wrong_answers_are_named(fn, reason, tokenizer, capsys):
    assert checks.check_labels_from_ids(fn, tokenizer) is False
    out = capsys.readouterr().out
    assert "[labels from token ids] not yet right" in out and reason in out


# The shifted loss.


def loss_solution(logits, labels):
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


def loss_by_hand(logits, labels):  # log-softmax, gather, mask, mean
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    targets = labels[:, 1:]
    kept = targets != -100
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return -(picked * kept).sum() / kept.sum()


def loss_class_dim_style(logits, labels):
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:])


def loss_stub(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits: (batch, seq, vocab), labels: (batch, seq) with -100 = ignore. Returns the mean loss."""
    # YOUR CODE HERE
    raise NotImplementedError("Exercise: write this part, then run the check below.")


def loss_body_left_above_the_raise(logits, labels):
    loss = loss_solution(logits, labels)
    raise NotImplementedError("Exercise: write this part, then run the check below.")
    return loss


def no_shift(logits, labels):
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten())


def shifted_the_wrong_way(logits, labels):
    return F.cross_entropy(logits[:, 1:].flatten(0, 1), labels[:, :-1].flatten())


def summed(logits, labels):
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="sum")


def mean_over_every_position(logits, labels):
    per_token = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="none")
    return per_token.sum() / per_token.numel()


def minus_100_as_a_token(logits, labels):
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten().clamp(min=0))


def per_row_mean(logits, labels):
    rows = [F.cross_entropy(lg[:-1], lb[1:]) for lg, lb in zip(logits, labels, strict=True)]
    return torch.stack(rows).mean()


def flatten_then_shift(logits, labels):
    return F.cross_entropy(logits.flatten(0, 1)[:-1], labels.flatten()[1:])


def shifts_labels_in_place(logits, labels):
    labels[:, :-1] = labels[:, 1:].clone()
    labels[:, -1] = -100
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten())


def shifts_only_the_logits(logits, labels):
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten())


@pytest.mark.parametrize("fn", [loss_solution, loss_by_hand, loss_class_dim_style])
def test_loss_right_answers_pass(fn, tiny, batch, capsys):
    before = copy.deepcopy(batch)
    assert checks.check_causal_lm_loss(fn, tiny[0], batch) is True
    assert "[shifted cross-entropy] correct." in capsys.readouterr().out
    assert all(torch.equal(batch[k], before[k]) for k in batch)


def test_loss_stub_and_left_raise(tiny, batch, capsys):
    assert checks.check_causal_lm_loss(loss_stub, tiny[0], batch) is None
    assert "not attempted yet" in capsys.readouterr().out
    assert checks.check_causal_lm_loss(loss_body_left_above_the_raise, tiny[0], batch) is None
    assert "delete that line" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("fn", "reason"),
    [
        (no_shift, "pairs the logits at position t with the label at t"),
        (shifted_the_wrong_way, "you shift the wrong way"),
        (summed, "that is the sum over tokens"),
        (mean_over_every_position, "you divide by every position, -100 ones included"),
        (minus_100_as_a_token, "the -100 labels take part in your loss"),
        (per_row_mean, "you average each row, then the rows"),
        (flatten_then_shift, "on a second batch whose labels are the input ids"),
        (flatten_then_shift, "you shift after flattening the batch"),
        (shifts_labels_in_place, "changes its input `labels` in place"),
        (lambda logits, labels: loss_solution(logits, labels).item(), "your function returned a float"),
        (
            lambda logits, labels: F.cross_entropy(
                logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="none"
            ),
            "return a scalar tensor (the mean loss); your function returned a tensor of shape",
        ),
        (lambda logits, labels: torch.tensor(float("nan")), "your loss is nan"),
        (lambda logits, labels: torch.tensor(3), "floating-point"),
    ],
)
def test_loss_wrong_answers_are_named(fn, reason, tiny, batch, capsys):
    before = copy.deepcopy(batch)
    assert checks.check_causal_lm_loss(fn, tiny[0], batch) is False
    out = capsys.readouterr().out
    assert "[shifted cross-entropy] not yet right" in out and reason in out
    assert all(torch.equal(batch[k], before[k]) for k in batch)  # the caller's batch is never changed


def test_flatten_then_shift_passes_on_the_callers_batch_alone(tiny, batch):
    # Why the checker's second batch exists: on the notebook's batch every row starts with -100.
    logits = tiny[0](**batch).logits.detach()
    assert bool((batch["labels"][:, 0] == -100).all())
    assert torch.isclose(flatten_then_shift(logits, batch["labels"]), loss_solution(logits, batch["labels"]))


def test_loss_crash_reports_the_learners_line_not_torch(tiny, batch, capsys):
    assert checks.check_causal_lm_loss(shifts_only_the_logits, tiny[0], batch) is False
    out = capsys.readouterr().out
    assert "your function raised ValueError" in out
    assert "return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten())" in out
    assert "functional.py" not in out


# Packing.


def pack_solution(examples, block_size):  # the notebook's solution
    rows, row = [], {"input_ids": [], "labels": [], "position_ids": [], "seq_lengths": []}
    for ex in examples:
        n = len(ex["input_ids"])
        if len(row["input_ids"]) + n > block_size:
            rows.append(row)
            row = {"input_ids": [], "labels": [], "position_ids": [], "seq_lengths": []}
        row["input_ids"] += ex["input_ids"]
        row["labels"] += ex["labels"]
        row["position_ids"] += list(range(n))
        row["seq_lengths"].append(n)
    return rows + [row] if row["input_ids"] else rows


def pack_groups_first(examples, block_size):  # group the examples, then build each row at once
    groups, size = [[]], 0
    for ex in examples:
        n = len(ex["input_ids"])
        if size + n > block_size:
            groups.append([])
            size = 0
        groups[-1].append(ex)
        size += n
    return [
        {
            "input_ids": [t for e in g for t in e["input_ids"]],
            "labels": [t for e in g for t in e["labels"]],
            "position_ids": [p for e in g for p in range(len(e["input_ids"]))],
            "seq_lengths": [len(e["input_ids"]) for e in g],
        }
        for g in groups
        if g
    ]


def pack_stub(examples: list[dict], block_size: int) -> list[dict]:
    """Pack tokenized examples into rows of at most block_size tokens."""
    # YOUR CODE HERE
    raise NotImplementedError("Exercise: write this part, then run the check below.")


def pack_body_left_above_the_raise(examples, block_size):
    rows = pack_solution(examples, block_size)
    raise NotImplementedError("Exercise: write this part, then run the check below.")
    return rows


def labels_are_input_ids(examples, block_size):
    rows = pack_solution(examples, block_size)
    for r in rows:
        r["labels"] = list(r["input_ids"])
    return rows


def off_by_one(examples, block_size):
    rows, row = [], {"input_ids": [], "labels": [], "position_ids": [], "seq_lengths": []}
    for ex in examples:
        n = len(ex["input_ids"])
        if len(row["input_ids"]) + n >= block_size and row["input_ids"]:
            rows.append(row)
            row = {"input_ids": [], "labels": [], "position_ids": [], "seq_lengths": []}
        row["input_ids"] += ex["input_ids"]
        row["labels"] += ex["labels"]
        row["position_ids"] += list(range(n))
        row["seq_lengths"].append(n)
    return rows + [row] if row["input_ids"] else rows


def reversed_order(examples, block_size):
    return pack_solution(examples[::-1], block_size)


def sorted_by_length(examples, block_size):
    return pack_solution(sorted(examples, key=lambda e: len(e["input_ids"])), block_size)


def positions_continue(examples, block_size):
    rows = pack_solution(examples, block_size)
    for r in rows:
        r["position_ids"] = list(range(len(r["input_ids"])))
    return rows


def last_row_dropped(examples, block_size):
    return pack_solution(examples, block_size)[:-1]


def aliases_the_examples(examples, block_size):
    rows, row = [], None
    for ex in examples:
        n = len(ex["input_ids"])
        if row is not None and len(row["input_ids"]) + n <= block_size:
            row["input_ids"] += ex["input_ids"]  # extends the first example's own list
            row["labels"] += ex["labels"]
            row["position_ids"] += list(range(n))
            row["seq_lengths"].append(n)
            continue
        row = {"input_ids": ex["input_ids"], "labels": ex["labels"], "position_ids": list(range(n)),
               "seq_lengths": [n]}  # fmt: skip
        rows.append(row)
    return rows


def no_seq_lengths(examples, block_size):
    return [{k: v for k, v in r.items() if k != "seq_lengths"} for r in pack_solution(examples, block_size)]


@pytest.mark.parametrize("fn", [pack_solution, pack_groups_first, sft.pack_examples])
def test_pack_right_answers_pass(fn, examples, capsys):
    assert checks.check_pack(fn, examples, block_size=128) is True
    assert "[pack examples] correct." in capsys.readouterr().out


def test_pack_stub_and_left_raise(examples, capsys):
    assert checks.check_pack(pack_stub, examples, block_size=128) is None
    assert "not attempted yet" in capsys.readouterr().out
    assert checks.check_pack(pack_body_left_above_the_raise, examples, block_size=128) is None
    assert "delete that line" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("fn", "reason"),
    [
        (labels_are_input_ids, "your labels are the input ids"),
        (off_by_one, "a row may be filled exactly to block_size=128 tokens"),
        (reversed_order, "the examples come out in reverse order"),
        (sorted_by_length, "the examples are reordered"),
        (positions_continue, "position_ids must restart at 0 for each example"),
        (last_row_dropped, "the last row is missing"),
        (aliases_the_examples, "changes its input `examples` in place"),
        (no_seq_lengths, "row 0 has no 'seq_lengths'"),
        (lambda examples, block_size: None, "return a list of rows, each a dict with input_ids"),
        (lambda examples, block_size: [], "you return no rows"),
        (
            lambda examples, block_size: (
                pack_solution(examples, block_size) + [{k: [] for k in checks.ch01.PACK_FIELDS}]
            ),
            "is empty",
        ),  # fmt: skip
        (lambda examples, block_size: pack_solution(examples, 2 * block_size), "more than block_size=128"),
        (lambda examples, block_size: pack_solution(examples, block_size // 2), "first fit in order needs"),
    ],
)
def test_pack_wrong_answers_are_named(fn, reason, examples, capsys):
    before = copy.deepcopy(examples)
    assert checks.check_pack(fn, examples, block_size=128) is False
    out = capsys.readouterr().out
    assert "[pack examples] not yet right" in out and reason in out
    assert examples == before  # the notebook's own examples are never handed out


def test_off_by_one_is_caught_even_where_the_callers_rows_never_fill_up(examples, capsys):
    few = examples[:4]  # 4 short examples in one row of 1000: the boundary never matters there
    assert len(sft.pack_examples(few, 1000)) == 1
    assert checks.check_pack(off_by_one, few, block_size=1000) is False
    out = capsys.readouterr().out
    assert "on examples that fill rows exactly: a row may be filled exactly to block_size=8" in out


def test_pack_edge_examples_fill_every_row_exactly():
    rows = sft.pack_examples(checks.ch01._edge_examples(), 8)
    assert [len(r["input_ids"]) for r in rows] == [8] * 5
