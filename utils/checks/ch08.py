"""Chapter 08: perplexity from logits and padded labels, sliding-window perplexity, a plain-loop early stopper."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

from utils.checks.core import CheckFailed, _guard, describe, fresh_copy, mutation_message, run_check, same


def _as_float(got, what: str) -> float:
    """A Python number or a one-element tensor as a float, or ``CheckFailed`` saying what came back."""
    import torch

    if isinstance(got, torch.Tensor) and got.numel() == 1 and got.is_floating_point():
        return float(got.item())
    if isinstance(got, bool) or not isinstance(got, numbers.Real):
        raise CheckFailed(f"return {what} as a float; your function returned {describe(got)}.")
    return float(got)


def _near(a: float, b: float, rel: float = 1e-4) -> bool:
    return math.isfinite(a) and abs(a - b) <= rel * abs(b)


# (a) Perplexity from logits and labels with padding.


def _ppl_cases():
    """(logits, labels): mixed lengths, right padding (-100), a masked prompt; last, one row only."""
    import torch

    gen = torch.Generator().manual_seed(8)
    cases = []
    for lengths, vocab, prompt in [((7, 3, 5), 11, 0), ((9, 2), 13, 3), ((6,), 7, 0)]:
        width = max(lengths) + 2  # every row padded
        logits = torch.randn(len(lengths), width, vocab, generator=gen) * 2
        labels = torch.full((len(lengths), width), -100)
        for i, n in enumerate(lengths):
            labels[i, :n] = torch.randint(0, vocab, (n,), generator=gen)
            labels[i, : min(prompt, n - 1)] = -100  # the prompt is not trained on
        cases.append((logits, labels))
    return cases


def _ppl_variants(logits, labels) -> dict[str, float]:
    """The reference and what common mistakes compute, on one case."""
    import torch.nn.functional as F

    shifted, targets = logits[:, :-1], labels[:, 1:]
    mask = targets != -100
    nll = F.cross_entropy(shifted.transpose(1, 2), targets.clamp(min=0), reduction="none") * mask
    per_row_tokens = mask.sum(1).clamp(min=1)
    per_row = nll.sum(1) / per_row_tokens
    unshifted_mask = labels != -100
    unshifted = (
        F.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none") * unshifted_mask
    )
    return {
        "right": math.exp(nll.sum().item() / mask.sum().item()),
        "nll": nll.sum().item() / mask.sum().item(),
        "padding": math.exp(nll.sum().item() / mask.numel()),
        "per_sequence_ppl": per_row.exp().mean().item(),
        "per_sequence_loss": math.exp(per_row.mean().item()),
        "no_shift": math.exp(unshifted.sum().item() / unshifted_mask.sum().item()),
        "by_n": math.exp((per_row * (per_row_tokens + 1)).sum().item() / (per_row_tokens + 1).sum().item()),
    }


_PPL_HINTS = {
    "nll": "this is the mean NLL itself: perplexity is its exponential.",
    "padding": "the padding positions (label -100) count in your mean: they are not targets, so they must "
    "count neither in the sum nor in the number of tokens.",
    "per_sequence_ppl": "you average per-sequence perplexities: perplexity is exp of the mean over all target "
    "tokens of the batch, so a long sequence weighs more than a short one.",
    "per_sequence_loss": "you average per-sequence mean losses (each sequence weighs the same): the mean runs "
    "over all target tokens of the batch.",
    "by_n": "you weight each sequence by its length n: a sequence of n labelled tokens has n - 1 targets.",
    "no_shift": "position t predicts the label at t + 1: compare logits[:, :-1] with labels[:, 1:].",
}


def check_perplexity_from_logits(perplexity_from_logits: Callable) -> bool | None:
    """Check ``perplexity_from_logits(logits, labels) -> float``: ``logits`` (batch, seq, vocab), ``labels``
    (batch, seq) with -100 where a position is not a target; exp(mean NLL over the shifted targets)."""

    def body(fn):
        for i, (logits, labels) in enumerate(_ppl_cases()):
            case = f"case {i + 1} (batch {labels.shape[0]}, padded to {labels.shape[1]})"
            inputs = {"logits": logits, "labels": labels}
            copies = {k: fresh_copy(v) for k, v in inputs.items()}
            got = _as_float(fn(copies["logits"], copies["labels"]), "the perplexity")
            changed = [k for k in inputs if not same(inputs[k], copies[k])]
            if changed:
                raise CheckFailed(f"{case}: " + mutation_message(changed, "work on new tensors"))
            variants = _ppl_variants(logits, labels)
            if _near(got, variants["right"]):
                continue
            for name, hint in _PPL_HINTS.items():
                if _near(got, variants[name]):
                    raise CheckFailed(f"{case}: {hint}")
            raise CheckFailed(
                f"{case}: your value {got:.4g} is not exp(mean next-token NLL over the target tokens) "
                f"(it should be between 1 and the vocabulary size, {logits.shape[-1]})."
            )

    return run_check("perplexity from logits", perplexity_from_logits, body)


# (b) Sliding-window perplexity.


def _window_variants(model, input_ids, max_length: int, stride: int) -> dict[str, float]:
    """The reference and common mistakes: disjoint chunks, every window's every target, window-averaged."""
    import torch
    import torch.nn.functional as F

    from utils import metrics

    nll, n = metrics.strided_nll(model, input_ids, max_length, stride)
    d_nll, d_n = metrics.strided_nll(model, input_ids, max_length, max_length)
    ids = torch.as_tensor(input_ids)[None]
    all_nll, all_n, window_means = 0.0, 0, []
    with torch.no_grad():
        for begin in range(0, ids.shape[1], stride):
            window = ids[:, begin : begin + max_length]
            if window.shape[1] < 2:
                break
            losses = F.cross_entropy(model(window).logits[0, :-1].float(), window[0, 1:], reduction="none")
            all_nll, all_n = all_nll + losses.sum().item(), all_n + losses.numel()
            window_means.append(losses.mean().item())
            if begin + max_length >= ids.shape[1]:
                break
    return {
        "right": math.exp(nll / n),
        "disjoint": math.exp(d_nll / d_n),
        "overlap": math.exp(all_nll / all_n),
        "window_mean": math.exp(sum(window_means) / len(window_means)),
    }


_WINDOW_HINTS = {
    "disjoint": "this is the perplexity of disjoint chunks of max_length: windows start every `stride` tokens.",
    "overlap": "you score every target of every window, so tokens in the overlap are counted more than once: "
    "each window scores only the tokens the previous window did not reach (the others get label -100).",
    "window_mean": "you average the windows' mean losses: sum the NLL over all scored tokens and divide by "
    "their number (the last window may score fewer tokens).",
}


def check_sliding_window_perplexity(sliding_window_perplexity: Callable, model, input_ids) -> bool | None:
    """Check ``sliding_window_perplexity(model, input_ids, max_length, stride) -> float`` on ``input_ids``
    (a 1-D list of token ids longer than a window) against ``utils.metrics.strided_nll``, for several
    windows and strides, and that a stride larger than the window is refused with a ValueError."""
    ids = list(input_ids)[:120]
    if len(ids) < 60:
        raise ValueError("Give the check a text of at least 60 tokens.")

    def body(fn):
        for max_length, stride in [(32, 8), (24, 24), (40, 16), (len(ids) + 8, 4)]:
            case = f"max_length={max_length}, stride={stride}"
            got = _as_float(fn(model, list(ids), max_length, stride), "the perplexity")
            variants = _window_variants(model, ids, max_length, stride)
            if _near(got, variants["right"]):
                continue
            for name, hint in _WINDOW_HINTS.items():
                if _near(got, variants[name]):
                    raise CheckFailed(f"{case}: {hint}")
            raise CheckFailed(
                f"{case}: your value {got:.4g} differs from exp(total NLL / scored tokens) with each token "
                "scored once."
            )
        try:
            fn(model, list(ids), 16, 20)
        except Exception as err:
            inner = getattr(err, "error", err)
            if not isinstance(inner, ValueError):
                raise CheckFailed(
                    f"stride=20 > max_length=16 raised {type(inner).__name__}; raise a ValueError that says why."
                ) from None
        else:
            raise CheckFailed(
                "stride=20 with max_length=16 was accepted: the tokens between windows would never be scored. "
                "Raise a ValueError."
            )

    return run_check("sliding-window perplexity", sliding_window_perplexity, body)


# (c) A plain-loop early stopper.


def _stopper_cases():
    """(validation losses, patience, threshold): a plateau, a tie, improvements below the threshold, a recovery."""
    return [
        ([3.0, 2.5, 2.4, 2.6, 2.7, 2.8, 2.1], 2, 0.0),
        ([3.0, 2.5, 2.5, 2.6, 2.5, 2.7], 3, 0.0),
        ([3.0, 2.0, 1.95, 1.93, 1.92, 1.5], 3, 0.1),
        ([3.0, 3.1, 2.0, 2.1, 1.0, 1.1, 1.2], 2, 0.0),
    ]


def _stopper_reference(losses, patience, threshold) -> tuple[int, int]:
    """(index of the evaluation that stops, index of the best one), as ``utils.train.EarlyStopping``."""
    best, best_i, bad = None, None, 0
    for i, value in enumerate(losses):
        if best is None or value < best - threshold:
            best, best_i, bad = value, i, 0
        else:
            bad += 1
        if bad >= patience:
            return i, best_i
    return len(losses) - 1, best_i


def check_early_stopper(EarlyStopper: type) -> bool | None:
    """Check a class ``EarlyStopper(patience, threshold)`` with ``should_stop(val_loss, model) -> bool``
    (keeps a copy of the best weights) and ``restore(model)`` (loads them back).

    The check runs validation-loss sequences, changing a small model's weights in place before every
    evaluation, and compares where it stops and which weights ``restore`` brings back."""
    import torch

    def body(cls):
        for i, (losses, patience, threshold) in enumerate(_stopper_cases()):
            case = f"case {i + 1} (losses {losses}, patience {patience}, threshold {threshold})"
            stopper = cls(patience, threshold)
            if isinstance(stopper, type) or not hasattr(stopper, "should_stop"):
                raise CheckFailed(
                    f"EarlyStopper(patience, threshold) should have a should_stop method; got {describe(stopper)}."
                )
            model = torch.nn.Linear(2, 1)
            want_stop, want_best = _stopper_reference(losses, patience, threshold)
            stopped_at = None
            for j, value in enumerate(losses):
                with torch.no_grad():
                    model.weight.fill_(float(j))  # in place: a kept state that is not a copy changes too
                answer = _guard(stopper.should_stop)(value, model)
                if not isinstance(answer, bool | torch.Tensor) and answer is not None:
                    raise CheckFailed(f"should_stop should return a bool; it returned {describe(answer)}.")
                if answer:
                    stopped_at = j
                    break
            late_reason = (
                "an improvement smaller than the threshold does not count as one"
                if threshold > 0
                else "an improvement must beat the best by more than the threshold (a tie is not an improvement), "
                "and training stops as soon as the count of evaluations without one reaches patience"
            )
            if stopped_at is None and want_stop < len(losses) - 1:
                raise CheckFailed(
                    f"{case}: yours never stopped, too late: it should stop after {patience} evaluation(s) in a "
                    f"row without an improvement; {late_reason}."
                )
            if stopped_at is not None and stopped_at != want_stop:
                early = stopped_at < want_stop
                reason = (
                    "count the evaluations without improvement since the best one (a new best resets the count), "
                    "and stop when that count reaches patience"
                    if early
                    else late_reason
                )
                raise CheckFailed(
                    f"{case}: yours stopped at evaluation {stopped_at + 1}, "
                    f"{'too early' if early else 'too late'}: {reason}."
                )
            _guard(stopper.restore)(model)
            restored = model.weight.flatten()[0].item()
            if restored != float(want_best):
                if restored == float(want_stop if stopped_at is not None else len(losses) - 1):
                    raise CheckFailed(
                        f"{case}: restore() brought back the last weights, not the best: model.state_dict() "
                        "returns the live tensors, so keep a copy (copy.deepcopy or .clone())."
                    )
                raise CheckFailed(f"{case}: restore() did not bring back the weights of the best evaluation.")

    return run_check("early stopper", EarlyStopper, body)
