"""Chapter 07's checkers: one layer's activation bytes, a checkpointed forward, a token-weighted
accumulation loss; and the chapter's bad inputs (accumulation steps <= 0)."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from utils import checks, memory, train

# (a) One Llama layer's activation bytes.


def layer_solution(batch_size, seq_len, hidden_size, intermediate_size, n_heads, bytes_per_value):
    return memory.llama_layer_activation_bytes(
        batch_size, seq_len, hidden_size, intermediate_size, n_heads, bytes_per_value
    )


def layer_by_hand(b, s, h, i, a, v):
    n = b * s
    norms = 2 * (4 * n * h + 4 * n + 2 * v * n * h)
    return norms + 4 * v * n * h + 4 * b * a * s + 4 * v * n * i


def layer_stub(batch_size, seq_len, hidden_size, intermediate_size, n_heads, bytes_per_value):
    # YOUR CODE HERE
    raise NotImplementedError("Exercise: write this part, then run the check below.")


def layer_korthikanti(b, s, h, i, a, v):
    return 34 * s * b * h + 5 * a * s * s * b


def layer_eager(b, s, h, i, a, v):
    return layer_by_hand(b, s, h, i, a, v) - 4 * b * a * s + 4 * b * a * s * s


def layer_no_upcast(b, s, h, i, a, v):
    n = b * s
    return 2 * (v * n * h + 4 * n + 2 * v * n * h) + 4 * v * n * h + 4 * b * a * s + 4 * v * n * i


def layer_no_small_terms(b, s, h, i, a, v):
    return layer_by_hand(b, s, h, i, a, v) - 8 * b * s - 4 * b * a * s


def layer_gelu_like_mlp(b, s, h, i, a, v):
    return layer_by_hand(b, s, h, i, a, v) - 2 * v * b * s * i


def layer_float(b, s, h, i, a, v):
    return float(layer_by_hand(b, s, h, i, a, v))


def test_layer_right_answers_pass(capsys):
    for fn in (layer_solution, layer_by_hand):
        assert checks.check_layer_activation_bytes(fn) is True
    assert "correct" in capsys.readouterr().out


def test_layer_stub_is_not_attempted(capsys):
    assert checks.check_layer_activation_bytes(layer_stub) is None
    assert "not attempted yet" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("fn", "reason"),
    [
        (layer_korthikanti, "Korthikanti et al.'s GPT layer"),
        (layer_eager, "s x s attention matrix"),
        (layer_no_upcast, "upcasts its input to fp32"),
        (layer_no_small_terms, "the small terms are missing"),
        (layer_gelu_like_mlp, "SwiGLU saves four tensors"),
        (layer_float, "return an int"),
    ],
)
def test_layer_wrong_answers_are_named(fn, reason, capsys):
    assert checks.check_layer_activation_bytes(fn) is False
    out = capsys.readouterr().out
    assert reason in out and "8 + 8" not in out  # names the mistake, does not give the formula


# (b) A checkpointed forward.


def ckpt_solution(blocks, x):
    return memory.checkpointed_forward(blocks, x)


def ckpt_by_hand(blocks, x):
    for block in blocks:
        x = checkpoint(block, x, use_reentrant=False)
    return x


def ckpt_stub(blocks, x):
    raise NotImplementedError("Exercise: write this part, then run the check below.")


def ckpt_none(blocks, x):
    for block in blocks:
        x = block(x)
    return x


def ckpt_reentrant(blocks, x):
    for block in blocks:
        x = checkpoint(block, x, use_reentrant=True)
    return x


def ckpt_detached(blocks, x):
    for block in blocks:
        x = checkpoint(block, x.detach(), use_reentrant=False)
    return x


def ckpt_skips_last(blocks, x):
    for block in list(blocks)[:-1]:
        x = checkpoint(block, x, use_reentrant=False)
    return x


def ckpt_first_block_only(blocks, x):  # a learner's half-done version: the other blocks still save everything
    x = checkpoint(blocks[0], x, use_reentrant=False)
    for block in list(blocks)[1:]:
        x = block(x)
    return x


def ckpt_no_grad(blocks, x):
    with torch.no_grad():
        for block in blocks:
            x = block(x)
    return x


def ckpt_whole_stack(blocks, x):  # one checkpoint around all blocks: keeps even less, also right
    return checkpoint(lambda h: ckpt_none(blocks, h), x, use_reentrant=False)


def test_ckpt_right_answers_pass(capsys):
    for fn in (ckpt_solution, ckpt_by_hand, ckpt_whole_stack):
        assert checks.check_checkpointed_forward(fn) is True
    assert "correct" in capsys.readouterr().out


def test_ckpt_stub_is_not_attempted(capsys):
    assert checks.check_checkpointed_forward(ckpt_stub) is None
    assert "not attempted yet" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("fn", "reason"),
    [
        (ckpt_none, "nothing is checkpointed"),
        (ckpt_reentrant, "no gradient reaches the blocks' parameters"),
        (ckpt_detached, "gradients differ"),
        (ckpt_skips_last, "output differs"),
        (ckpt_first_block_only, "Is each block run under checkpoint?"),
        (ckpt_no_grad, "no torch.no_grad()"),
    ],
)
def test_ckpt_wrong_answers_are_named(fn, reason, capsys):
    assert checks.check_checkpointed_forward(fn) is False
    assert reason in capsys.readouterr().out


# (c) The token-weighted accumulation loss.


def accum_solution(logits, labels, n_target_tokens):
    targets = labels[:, 1:]
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=-100, reduction="sum")
    return nll / n_target_tokens


def accum_stub(logits, labels, n_target_tokens):
    raise NotImplementedError("Exercise: write this part, then run the check below.")


def accum_mean_over_k(logits, labels, n_target_tokens):
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100) / 3


def accum_sum_of_means(logits, labels, n_target_tokens):
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100)


def accum_padding(logits, labels, n_target_tokens):
    t = labels[:, 1:]
    return (
        F.cross_entropy(logits[:, :-1].transpose(1, 2), t, ignore_index=-100, reduction="sum") / t.numel() / 3
    )


def accum_no_shift(logits, labels, n_target_tokens):
    return (
        F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="sum") / n_target_tokens
    )


def accum_float(logits, labels, n_target_tokens):
    return accum_solution(logits, labels, n_target_tokens).item()


def accum_detached(logits, labels, n_target_tokens):
    return accum_solution(logits.detach(), labels, n_target_tokens)


def accum_detached_normalizer(logits, labels, n_target_tokens):  # the right value, a wrong gradient
    lp = logits[:, :-1] - logits[:, :-1].detach().logsumexp(-1, keepdim=True)
    t = labels[:, 1:]
    mask = t != -100
    return -(lp.gather(-1, t.clamp(min=0)[..., None]).squeeze(-1) * mask).sum() / n_target_tokens


def test_accum_right_answer_passes(capsys):
    assert checks.check_accumulation_loss(accum_solution) is True
    assert "correct" in capsys.readouterr().out


def test_accum_stub_is_not_attempted(capsys):
    assert checks.check_accumulation_loss(accum_stub) is None
    assert "not attempted yet" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("fn", "reason"),
    [
        (accum_mean_over_k, "mean / k"),
        (accum_sum_of_means, "add up the micro-batches' mean losses"),
        (accum_padding, "padding positions"),
        (accum_no_shift, "t + 1"),
        (accum_float, "one-element tensor"),
        (accum_detached, "detached"),
        (accum_detached_normalizer, "but their gradients differ"),
    ],
)
def test_accum_wrong_answers_are_named(fn, reason, capsys):
    assert checks.check_accumulation_loss(fn) is False
    out = capsys.readouterr().out
    assert reason in out and "reduction" not in out


# Bad input of the chapter's tools.


@pytest.mark.parametrize("steps", [0, -2])
def test_accumulation_steps_must_be_positive(steps, tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match=f"accumulation_steps must be at least 1, got {steps}"):
        train.train_loop(
            model, [{"input_ids": [1, 2], "labels": [1, 2]}], pad_token_id=1, accumulation_steps=steps
        )


def test_sequences_of_equal_tokens_accumulate_exactly():
    gen = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(8, 6, 5, generator=gen), torch.randint(0, 5, (8, 6), generator=gen)
    big = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:])
    micro = sum(F.cross_entropy(lg[:, :-1].transpose(1, 2), lb[:, 1:]) for lg, lb in
                zip(logits.chunk(4), labels.chunk(4), strict=True)) / 4  # fmt: skip
    assert torch.allclose(big, micro, atol=1e-6)
