"""Chapter 06's checkers: freeze all but the head, freeze the bottom k layers, the gradual-unfreezing schedule."""

import pytest

from utils import checks

# Freeze all but the head.


def head_solution(model):  # the notebook's solution
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith(("classifier.", "score."))


def head_by_module(model):  # the interview answer, generalized: freeze everything, then unfreeze the head
    for p in model.parameters():
        p.requires_grad = False
    head = model.classifier if hasattr(model, "classifier") else model.score
    for p in head.parameters():
        p.requires_grad = True


def head_stub(model) -> None:
    """Only the classification head (parameters named classifier.* or score.*) keeps requires_grad=True."""
    # YOUR CODE HERE
    raise NotImplementedError("Exercise: write this part, then run the check below.")


def head_left_raise(model):
    head_solution(model)
    raise NotImplementedError("Exercise: write this part, then run the check below.")


def freeze_everything(model):
    for p in model.parameters():
        p.requires_grad = False


def eval_only(model):
    model.eval()


def freeze_head_only(model):
    for name, p in model.named_parameters():
        p.requires_grad = not name.startswith(("classifier.", "score."))


def keeps_pooler(model):  # freezes the layers and embeddings but leaves BERT's pooler trainable
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith(("classifier.", "score.")) or ".pooler." in name


def weight_only(model):
    for name, p in model.named_parameters():
        p.requires_grad = name in ("classifier.weight", "score.weight")


def zeroes_the_body(model):
    import torch

    head_solution(model)
    with torch.no_grad():
        for p in model.parameters():
            if not p.requires_grad:
                p.zero_()


@pytest.mark.parametrize("fn", [head_solution, head_by_module])
def test_head_right_answers_pass(fn, capsys):
    assert checks.check_freeze_all_but_head(fn) is True
    assert "[freeze all but the head] correct." in capsys.readouterr().out


def test_head_stub_and_left_raise(capsys):
    assert checks.check_freeze_all_but_head(head_stub) is None
    assert "not attempted yet" in capsys.readouterr().out
    assert checks.check_freeze_all_but_head(head_left_raise) is None
    assert "delete that line" in capsys.readouterr().out


def returns_a_frozen_copy(model):  # freezes a copy and returns it: the caller's model still trains
    import copy

    frozen = copy.deepcopy(model)
    for n, p in frozen.named_parameters():
        p.requires_grad = n.startswith(("classifier.", "score."))
    return frozen


def name_prefix(model, k):  # "model.layers.1" is a prefix of "model.layers.10": wrong from 11 layers on
    if k > len(model.model.layers):
        raise ValueError("k is larger than the number of layers")
    for n, p in model.named_parameters():
        if "embed_tokens" in n or any(n.startswith(f"model.layers.{i}") for i in range(k)):
            p.requires_grad = False


def unfreezes_the_tied_head(model, k):  # lm_head.weight is embed_tokens.weight when they are tied
    if k > len(model.model.layers):
        raise ValueError("k is larger than the number of layers")
    model.requires_grad_(False)
    for layer in model.model.layers[k:]:
        layer.requires_grad_(True)
    model.model.norm.requires_grad_(True)
    model.lm_head.requires_grad_(True)


def numpy_ints(epoch, n_layers):
    import numpy as np

    return list(np.arange(max(0, n_layers - epoch), n_layers))


@pytest.mark.parametrize(
    ("fn", "reason"),
    [
        (freeze_everything, "Nothing is trainable: the head must still learn."),
        (eval_only, "model.eval() or torch.no_grad() do not freeze"),
        (returns_a_frozen_copy, "freeze that model, in place"),
        (freeze_head_only, "The head is frozen"),
        (keeps_pooler, "The pooler is part of model.bert"),
        (weight_only, "Part of the head is frozen"),
        (zeroes_the_body, "changed the values of"),
    ],
)
def test_head_wrong_answers_are_named(fn, reason, capsys):
    assert checks.check_freeze_all_but_head(fn) is False
    out = capsys.readouterr().out
    assert "[freeze all but the head] not yet right" in out and reason in out


# Freeze the bottom k layers of a decoder.


def bottom_solution(model, k):  # the notebook's solution
    n_layers = len(model.model.layers)
    if not 0 <= k <= n_layers:
        raise ValueError(f"k={k}, but the model has {n_layers} layers.")
    for name, p in model.named_parameters():
        is_layer = name.startswith("model.layers.")
        below = "embed_tokens" in name or (is_layer and int(name.split(".")[2]) < k)
        p.requires_grad = not below


def bottom_by_modules(model, k):
    layers = model.model.layers
    if k > len(layers):
        raise ValueError("k exceeds the number of layers")
    for p in model.parameters():
        p.requires_grad = True
    for module in [model.model.embed_tokens, *layers[:k]]:
        for p in module.parameters():
            p.requires_grad = False


def bottom_stub(model, k: int) -> None:
    """Freeze the embeddings and decoder layers 0 .. k-1; everything else trains."""
    # YOUR CODE HERE
    raise NotImplementedError("Exercise: write this part, then run the check below.")


def forgets_embeddings(model, k):
    bottom_by_modules(model, k)
    for p in model.model.embed_tokens.parameters():
        p.requires_grad = True


def off_by_one(model, k):  # freezes layers 0 .. k
    bottom_by_modules(model, min(k + 1, len(model.model.layers)))


def from_the_top(model, k):
    layers = model.model.layers
    if k > len(layers):
        raise ValueError("k too large")
    for p in model.parameters():
        p.requires_grad = True
    for module in [model.model.embed_tokens, *layers[len(layers) - k :]]:
        for p in module.parameters():
            p.requires_grad = False


def freezes_the_final_norm(model, k):
    bottom_by_modules(model, k)
    model.model.norm.weight.requires_grad = False


def accepts_any_k(model, k):
    for p in model.parameters():
        p.requires_grad = True
    for module in [model.model.embed_tokens, *model.model.layers[:k]]:
        for p in module.parameters():
            p.requires_grad = False


def index_error_for_large_k(model, k):
    layers = model.model.layers
    _ = layers[k - 1]  # raises IndexError for k > len(layers)
    bottom_by_modules(model, k)


@pytest.mark.parametrize("fn", [bottom_solution, bottom_by_modules])
def test_bottom_right_answers_pass(fn, capsys):
    assert checks.check_freeze_bottom_layers(fn) is True
    assert "[freeze the bottom k layers] correct." in capsys.readouterr().out


def test_bottom_stub(capsys):
    assert checks.check_freeze_bottom_layers(bottom_stub) is None
    assert "not attempted yet" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("fn", "reason"),
    [
        (forgets_embeddings, "The embeddings are below layer 0"),
        (off_by_one, "is frozen but is not among the bottom k (one layer too many?)"),
        (from_the_top, "are you counting from the top?"),
        (freezes_the_final_norm, "Frozen but above the bottom layers: model.norm.weight"),
        (accepts_any_k, "must raise ValueError"),
        (index_error_for_large_k, "raised IndexError"),
        (name_prefix, "Compare the layer number itself"),
        (unfreezes_the_tied_head, "same tensor as embed_tokens.weight"),
    ],
)
def test_bottom_wrong_answers_are_named(fn, reason, capsys):
    assert checks.check_freeze_bottom_layers(fn) is False
    out = capsys.readouterr().out
    assert "[freeze the bottom k layers] not yet right" in out and reason in out


# The gradual-unfreezing schedule.


def schedule_solution(epoch, n_layers):
    return list(range(max(0, n_layers - epoch), n_layers))


def schedule_as_set(epoch, n_layers):
    return {n_layers - 1 - i for i in range(min(epoch, n_layers))}


def schedule_stub(epoch: int, n_layers: int) -> list[int]:
    """Indices of the blocks that train in `epoch`."""
    # YOUR CODE HERE
    raise NotImplementedError("Exercise: write this part, then run the check below.")


def starts_with_one_layer(epoch, n_layers):
    return list(range(max(0, n_layers - epoch - 1), n_layers))


def from_the_bottom(epoch, n_layers):
    return list(range(min(epoch, n_layers)))


def no_cap(epoch, n_layers):
    return list(range(n_layers - epoch, n_layers))


def a_count(epoch, n_layers):
    return min(epoch, n_layers)


@pytest.mark.parametrize("fn", [schedule_solution, schedule_as_set])
def test_schedule_right_answers_pass(fn, capsys):
    assert checks.check_unfrozen_layers(fn) is True
    assert "[gradual unfreezing schedule] correct." in capsys.readouterr().out


def test_schedule_stub(capsys):
    assert checks.check_unfrozen_layers(schedule_stub) is None
    assert "not attempted yet" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("fn", "reason"),
    [
        (starts_with_one_layer, "In epoch 0 only the head trains"),
        (from_the_bottom, "unfreeze from the output side down"),
        (no_cap, "Layer indices run from 0 to"),
        (a_count, "return a list of layer indices"),
        (numpy_ints, "numpy.int64 values"),
    ],
)
def test_schedule_wrong_answers_are_named(fn, reason, capsys):
    assert checks.check_unfrozen_layers(fn) is False
    out = capsys.readouterr().out
    assert "[gradual unfreezing schedule] not yet right" in out and reason in out
