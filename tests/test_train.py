"""The one training loop: schedules, exact gradient accumulation, early stopping, bad input."""

import copy

import pytest
import torch

from utils import data, sft, train


def _examples(tok, n=32):
    rows = data.load_instructions("train").select(range(n))
    return sft.tokenize_rows(tok, rows)


def _first_step_grads(model, examples, pad_id, batch_size, accumulation_steps):
    """Gradients of the first optimizer step (captured by an SGD optimizer with lr 0)."""
    grads = {}

    def loss_fn(m, batch):
        return m(**batch).loss

    class Capture(torch.optim.SGD):
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    grads.setdefault(id(p), p.grad.clone())
            return super().step(closure)

    train.train_loop(model, examples, pad_token_id=pad_id, batch_size=batch_size, lr=0.0, max_steps=1,
                     accumulation_steps=accumulation_steps, shuffle=False, optimizer_cls=Capture,
                     max_grad_norm=None, loss_fn=loss_fn)  # fmt: skip
    return [grads[id(p)] for p in model.parameters()]


def test_accumulation_equals_one_large_batch_with_mixed_lengths(tiny):
    model, tok = tiny
    examples = _examples(tok, 16)
    lengths = {sum(t != -100 for t in e["labels"]) for e in examples}
    assert len(lengths) > 1  # answers of different lengths: a mean of means would be wrong
    big = _first_step_grads(copy.deepcopy(model), examples, tok.pad_token_id, 16, 1)
    acc = _first_step_grads(copy.deepcopy(model), examples, tok.pad_token_id, 4, 4)
    scale = max(g.abs().max().item() for g in big)
    worst = max((a - b).abs().max().item() for a, b in zip(big, acc, strict=True))
    assert worst < 1e-5 * scale, (worst, scale)  # float32 rounding of sums taken in another order
    # The naive version, a mean of the four micro-batch means, is measurably different:
    naive = copy.deepcopy(model)
    for i in range(0, 16, 4):
        (naive(**sft.collate(examples[i : i + 4], tok.pad_token_id)).loss / 4).backward()
    off = max((a - p.grad).abs().max().item() for a, p in zip(big, naive.parameters(), strict=True))
    assert off > 100 * worst, (off, worst)


def test_the_loop_learns_and_logs_interval_means(tiny):
    model, tok = tiny
    m = copy.deepcopy(model)
    history = train.train_loop(m, _examples(tok, 64), pad_token_id=tok.pad_token_id, batch_size=8, lr=3e-3,
                               epochs=2, warmup_steps=2, log_every=4)  # fmt: skip
    assert [h["step"] for h in history] == [4, 8, 12, 16]
    assert history[-1]["loss"] < history[0]["loss"] - 1.0
    assert not m.training


def test_schedules():
    assert train.lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert train.lr_factor(9, 100, 10) == pytest.approx(1.0)
    assert train.lr_factor(55, 100, 10) == pytest.approx(0.5)  # linear: (100 - 55) / 90
    assert train.lr_factor(10, 100, 10, "cosine") == pytest.approx(1.0)
    assert train.lr_factor(100, 100, 10, "cosine", floor=0.1) == pytest.approx(0.1)
    assert train.lr_factor(70, 100, 10, "constant") == 1.0
    with pytest.raises(ValueError, match="Unknown schedule"):
        train.lr_factor(0, 10, 0, "exponential")


def test_early_stopping_restores_the_best_weights(tiny):
    model, tok = tiny
    m = copy.deepcopy(model)
    scores = iter([3.0, 2.0, 2.5, 2.6, 2.7, 2.8])
    snapshots = []

    def eval_fn(mm):
        snapshots.append(copy.deepcopy(mm.state_dict()))
        return {"eval_loss": next(scores)}

    history = train.train_loop(m, _examples(tok, 64), pad_token_id=tok.pad_token_id, batch_size=4, lr=1e-3,
                               eval_fn=eval_fn, eval_every=2, log_every=100,
                               early_stopping=train.EarlyStopping(patience=2))  # fmt: skip
    assert [h["eval_loss"] for h in history] == [
        3.0,
        2.0,
        2.5,
        2.6,
    ]  # stopped after 2 evaluations without gain
    best = snapshots[1]
    assert all(torch.equal(best[k], v) for k, v in m.state_dict().items())


def test_frozen_parameters_do_not_move_even_with_weight_decay(tiny):
    model, tok = tiny
    m = copy.deepcopy(model)
    for name, p in m.named_parameters():
        p.requires_grad = "layers.3" in name
    frozen_before = m.model.layers[0].self_attn.q_proj.weight.clone()
    all_params = list(m.parameters())  # the optimizer holds frozen ones too; their grad stays None
    train.train_loop(m, _examples(tok, 16), pad_token_id=tok.pad_token_id, batch_size=8, lr=1e-2,
                     weight_decay=0.1, params=all_params)  # fmt: skip
    assert torch.equal(m.model.layers[0].self_attn.q_proj.weight, frozen_before)


def test_bad_input_is_named(tiny):
    model, tok = tiny
    ex = _examples(tok, 4)
    frozen = copy.deepcopy(model).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train.train_loop(frozen, ex, pad_token_id=tok.pad_token_id)
    with pytest.raises(ValueError, match="accumulation_steps"):
        train.train_loop(model, ex, pad_token_id=tok.pad_token_id, accumulation_steps=0)
    with pytest.raises(ValueError, match="pad_token_id"):
        train.train_loop(model, ex)
    with pytest.raises(ValueError, match="eval_fn"):
        train.train_loop(model, ex, pad_token_id=tok.pad_token_id, early_stopping=train.EarlyStopping())
    with pytest.raises(ValueError, match="patience"):
        train.EarlyStopping(patience=0)
