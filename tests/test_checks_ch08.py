"""Chapter 08's checkers: perplexity from logits, sliding-window perplexity, a plain-loop early stopper."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from utils import checks, data, metrics

# (a) Perplexity from logits and padded labels.


def ppl_solution(logits, labels):
    return metrics.perplexity_from_logits(logits, labels)


def ppl_by_hand(logits, labels):
    targets = labels[:, 1:]
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=-100, reduction="sum")
    return torch.exp(nll / (targets != -100).sum())  # a 0-d tensor is accepted


def ppl_stub(logits, labels):
    # YOUR CODE HERE
    raise NotImplementedError("Exercise: write this part, then run the check below.")


def ppl_returns_nll(logits, labels):
    return math.log(metrics.perplexity_from_logits(logits, labels))


def ppl_counts_padding(logits, labels):
    targets = labels[:, 1:]
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=-100, reduction="sum")
    return math.exp(nll.item() / targets.numel())


def ppl_no_shift(logits, labels):
    return math.exp(F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100).item())


def ppl_per_sequence_mean(logits, labels):
    return sum(
        metrics.perplexity_from_logits(logits[i : i + 1], labels[i : i + 1]) for i in range(len(labels))
    ) / len(labels)


def ppl_mean_of_sequence_losses(logits, labels):
    losses = [
        math.log(metrics.perplexity_from_logits(logits[i : i + 1], labels[i : i + 1]))
        for i in range(len(labels))
    ]
    return math.exp(sum(losses) / len(losses))


def ppl_masks_in_place(logits, labels):
    labels[labels == -100] = 0
    return 1.0


def test_ppl_right_answers_pass(capsys):
    for fn in (ppl_solution, ppl_by_hand):
        assert checks.check_perplexity_from_logits(fn) is True
    assert "correct" in capsys.readouterr().out


def test_ppl_stub_is_not_attempted(capsys):
    assert checks.check_perplexity_from_logits(ppl_stub) is None
    assert "not attempted yet" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("fn", "reason"),
    [
        (ppl_returns_nll, "its exponential"),
        (ppl_counts_padding, "padding positions"),
        (ppl_no_shift, "t + 1"),
        (ppl_per_sequence_mean, "per-sequence perplexities"),
        (ppl_mean_of_sequence_losses, "per-sequence mean losses"),
        (ppl_masks_in_place, "in place"),
    ],
)
def test_ppl_wrong_answers_fail_with_a_reason(fn, reason, capsys):
    assert checks.check_perplexity_from_logits(fn) is False
    assert reason in capsys.readouterr().out


# (b) Sliding-window perplexity.


@pytest.fixture(scope="module")
def long_ids(tiny):
    _, tok = tiny
    return tok(tok.bos_token.join(data.load_corpus("valid")[:5]))["input_ids"]


def window_solution(model, input_ids, max_length, stride):
    nll, n = metrics.strided_nll(model, input_ids, max_length, stride)
    return math.exp(nll / n)


def window_stub(model, input_ids, max_length, stride):
    # YOUR CODE HERE
    raise NotImplementedError("Exercise: write this part, then run the check below.")


def window_disjoint(model, input_ids, max_length, stride):
    return window_solution(model, input_ids, max_length, max_length)


def window_overlap_counted_twice(model, input_ids, max_length, stride):
    ids = torch.tensor([input_ids])
    nll, n = 0.0, 0
    for begin in range(0, ids.shape[1], stride):
        window = ids[:, begin : begin + max_length]
        if window.shape[1] < 2:
            break
        with torch.no_grad():
            out = model(window, labels=window)
        nll, n = nll + out.loss.item() * (window.shape[1] - 1), n + window.shape[1] - 1
        if begin + max_length >= ids.shape[1]:
            break
    return math.exp(nll / n)


def window_no_stride_check(model, input_ids, max_length, stride):
    if stride > max_length:
        return 1.0
    return window_solution(model, input_ids, max_length, stride)


def test_window_right_answer_passes(tiny, long_ids, capsys):
    assert checks.check_sliding_window_perplexity(window_solution, tiny[0], long_ids) is True
    assert checks.check_sliding_window_perplexity(window_stub, tiny[0], long_ids) is None
    assert "not attempted yet" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("fn", "reason"),
    [
        (window_disjoint, "disjoint chunks"),
        (window_overlap_counted_twice, "more than once"),
        (window_no_stride_check, "Raise a ValueError"),
    ],
)
def test_window_wrong_answers_fail_with_a_reason(tiny, long_ids, fn, reason, capsys):
    assert checks.check_sliding_window_perplexity(fn, tiny[0], long_ids) is False
    assert reason in capsys.readouterr().out


# (c) A plain-loop early stopper.


class StopperSolution:
    def __init__(self, patience, threshold=0.0):
        self.patience, self.threshold = patience, threshold
        self.best, self.best_state, self.bad = None, None, 0

    def should_stop(self, val_loss, model):
        if self.best is None or val_loss < self.best - self.threshold:
            self.best, self.bad, self.best_state = val_loss, 0, copy.deepcopy(model.state_dict())
        else:
            self.bad += 1
        return self.bad >= self.patience

    def restore(self, model):
        model.load_state_dict(self.best_state)


class StopperStub:
    def __init__(self, patience, threshold=0.0):
        # YOUR CODE HERE
        raise NotImplementedError("Exercise: write this part, then run the check below.")

    def should_stop(self, val_loss, model):
        # YOUR CODE HERE
        raise NotImplementedError("Exercise: write this part, then run the check below.")


class StopperNoCopy(StopperSolution):
    def should_stop(self, val_loss, model):
        if self.best is None or val_loss < self.best - self.threshold:
            self.best, self.bad, self.best_state = val_loss, 0, model.state_dict()  # live tensors
        else:
            self.bad += 1
        return self.bad >= self.patience


class StopperOffByOne(StopperSolution):
    def should_stop(self, val_loss, model):
        super().should_stop(val_loss, model)
        return self.bad > self.patience


class StopperTieImproves(StopperSolution):
    def should_stop(self, val_loss, model):
        if self.best is None or val_loss <= self.best - self.threshold:
            self.best, self.bad, self.best_state = val_loss, 0, copy.deepcopy(model.state_dict())
        else:
            self.bad += 1
        return self.bad >= self.patience


class StopperIgnoresThreshold(StopperSolution):
    def should_stop(self, val_loss, model):
        self.threshold = 0.0
        return super().should_stop(val_loss, model)


class StopperNeverResets(StopperSolution):
    def should_stop(self, val_loss, model):
        bad = self.bad
        super().should_stop(val_loss, model)
        self.bad = max(self.bad, bad)
        return self.bad >= self.patience


def test_stopper_right_answer_and_stub(capsys):
    assert checks.check_early_stopper(StopperSolution) is True
    assert checks.check_early_stopper(StopperStub) is None
    assert "not attempted yet" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("cls", "reason"),
    [
        (StopperNoCopy, "keep a copy"),
        (StopperOffByOne, "too late"),
        (StopperTieImproves, "a tie is not an improvement"),
        (StopperIgnoresThreshold, "smaller than the threshold"),
        (StopperNeverResets, "too early"),
    ],
)
def test_stopper_wrong_answers_fail_with_a_reason(cls, reason, capsys):
    assert checks.check_early_stopper(cls) is False
    assert reason in capsys.readouterr().out
