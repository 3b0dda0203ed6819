"""Chapter 03's checkers: the LoRA forward pass, the LoRA parameter count, the best rank-k approximation."""

import pytest
import torch
import torch.nn.functional as F

from utils import checks, counting, lora

# The LoRA forward pass.


def forward_solution(x, W, A, B, alpha, rank):
    return x @ W.T + (alpha / rank) * (x @ A.T) @ B.T


def forward_linear_style(x, W, A, B, alpha, rank):
    return F.linear(x, W) + lora.lora_scaling(rank, alpha) * F.linear(F.linear(x, A), B)


def forward_einsum_style(x, W, A, B, alpha, rank):
    z = torch.einsum("...i,ri->...r", x, A)
    return torch.einsum("...i,oi->...o", x, W) + alpha / rank * torch.einsum("...r,or->...o", z, B)


def forward_stub(x, W, A, B, alpha, rank):
    """h = W x + (alpha / rank) B A x, for x of shape (..., d_in)."""
    # YOUR CODE HERE
    raise NotImplementedError("Exercise: write this part, then run the check below.")


def forward_body_left_above_the_raise(x, W, A, B, alpha, rank):
    h = x @ W.T + (alpha / rank) * (x @ A.T) @ B.T
    raise NotImplementedError("Exercise: write this part, then run the check below.")
    return h


def forms_BA(x, W, A, B, alpha, rank):
    return x @ (W + (alpha / rank) * B @ A).T


def forms_BA_with_einsum(x, W, A, B, alpha, rank):
    delta = torch.einsum("or,ri->oi", B, A)
    return x @ W.T + (alpha / rank) * x @ delta.T


def forms_the_transposed_product(x, W, A, B, alpha, rank):  # A and B in swapped order: (B A)^T
    return x @ W.T + (alpha / rank) * x @ (A.T @ B.T)


def swapped_A_and_B(x, W, A, B, alpha, rank):
    return x @ W.T + (alpha / rank) * (x @ B.T) @ A.T


def W_not_transposed(x, W, A, B, alpha, rank):
    return x @ W + (alpha / rank) * (x @ A.T) @ B.T


def scales_B_in_place(x, W, A, B, alpha, rank):
    B *= alpha / rank
    return x @ W.T + (x @ A.T) @ B.T


def parts_not_added(x, W, A, B, alpha, rank):  # B = 0 and W = 0 each look right, the whole does not
    base, update = x @ W.T, (alpha / rank) * (x @ A.T) @ B.T
    return base + update + base * update


def adapter_nonlinearity(x, W, A, B, alpha, rank):  # a bottleneck adapter's ReLU is not LoRA
    return x @ W.T + (alpha / rank) * torch.relu(x @ A.T) @ B.T


@pytest.mark.parametrize("fn", [forward_solution, forward_linear_style, forward_einsum_style])
def test_forward_right_answers_pass(fn, capsys):
    assert checks.check_lora_forward(fn) is True
    assert "[LoRA forward] correct." in capsys.readouterr().out


def test_forward_stub_and_left_raise(capsys):
    assert checks.check_lora_forward(forward_stub) is None
    assert "not attempted yet" in capsys.readouterr().out
    assert checks.check_lora_forward(forward_body_left_above_the_raise) is None
    assert "delete that line" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("fn", "reason"),
    [
        (lambda x, W, A, B, a, r: x @ W.T + a * (x @ A.T) @ B.T, "scaled by alpha without dividing by rank"),
        (lambda x, W, A, B, a, r: x @ W.T + (r / a) * (x @ A.T) @ B.T, "scaled by rank / alpha, upside down"),
        (lambda x, W, A, B, a, r: x @ W.T + (x @ A.T) @ B.T, "scaled by no scaling at all"),
        (lambda x, W, A, B, a, r: x @ W.T, "the update is missing"),
        (W_not_transposed, "the frozen part differs from x W^T"),
        (adapter_nonlinearity, "the frozen part is right (with B = 0 you get x W^T), the update is not"),
        (parts_not_added, "each part is right on its own"),
        (
            forms_BA,
            "forms a 6 x 6 matrix (with matmul), the size of W: that is B @ A, which the exercise forbids",
        ),
        (forms_BA_with_einsum, "(with einsum)"),
        (forms_the_transposed_product, "that is B @ A, which the exercise forbids"),
        (scales_B_in_place, "changes its input `B` in place"),
        (lambda x, W, A, B, a, r: forward_solution(x, W, A, B, a, r).numpy(), "a numpy.ndarray"),
        (lambda x, W, A, B, a, r: forward_solution(x, W, A, B, a, r).sum(-1), "so h should be (5, 6)"),
        (lambda x, W, A, B, a, r: forward_solution(x, W, A, B, a, r).long(), "floating-point"),
    ],
)
def test_forward_wrong_answers_are_named(fn, reason, capsys):
    assert checks.check_lora_forward(fn) is False
    out = capsys.readouterr().out
    assert "[LoRA forward] not yet right" in out and reason in out


def test_forward_the_full_product_is_flagged_on_the_non_square_case_too(capsys):
    from utils.checks.ch03 import _product_recorder

    B, A = torch.randn(8, 2), torch.randn(2, 12)
    with _product_recorder(8, 12) as rec:
        forward_solution(torch.randn(4, 12), torch.randn(8, 12), A, B, 4, 2)
    assert rec.formed is None
    with _product_recorder(8, 12) as rec:
        forms_BA(torch.randn(4, 12), torch.randn(8, 12), A, B, 4, 2)
    assert rec.formed == ("matmul", (8, 12))


def test_forward_a_crash_shows_the_learners_line(capsys):
    assert checks.check_lora_forward(swapped_A_and_B) is False
    out = capsys.readouterr().out
    assert "your function raised RuntimeError" in out
    assert "of swapped_A_and_B: return x @ W.T + (alpha / rank) * (x @ B.T) @ A.T" in out


# Counting LoRA parameters.


def count_solution(config, rank, target_modules):  # the notebook's solution
    d, d_ff = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    shapes = {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
              "gate_proj": (d, d_ff), "up_proj": (d, d_ff), "down_proj": (d_ff, d)}  # fmt: skip
    return config.num_hidden_layers * sum(rank * sum(shapes[t]) for t in target_modules)


def count_with_meta_model(config, rank, target_modules):  # read the shapes off a meta-device model
    model = counting.meta_model(config)
    return sum(
        rank * (m.in_features + m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in target_modules
    )


def count_stub(config, rank: int, target_modules: list[str]) -> int:
    """LoRA parameters added to a Llama-family model: rank * (d_in + d_out) per targeted layer."""
    # YOUR CODE HERE
    raise NotImplementedError("Exercise: write this part, then run the check below.")


def count_body_left_above_the_raise(config, rank, target_modules):
    n = count_solution(config, rank, target_modules)
    raise NotImplementedError("Exercise: write this part, then run the check below.")
    return n


def _shapes(config, gqa=True, head_dim=True):
    d, d_ff, heads = config.hidden_size, config.intermediate_size, config.num_attention_heads
    hd = config.head_dim if head_dim else d // heads
    q, kv = heads * hd, (config.num_key_value_heads if gqa else heads) * hd
    return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
            "gate_proj": (d, d_ff), "up_proj": (d, d_ff), "down_proj": (d_ff, d)}  # fmt: skip


def full_weights(config, rank, targets):
    return config.num_hidden_layers * sum(i * o for i, o in (_shapes(config)[t] for t in targets))


def one_layer(config, rank, targets):
    return sum(rank * (i + o) for i, o in (_shapes(config)[t] for t in targets))


def ignores_gqa(config, rank, targets):
    return config.num_hidden_layers * sum(rank * sum(_shapes(config, gqa=False)[t]) for t in targets)


def ignores_head_dim(config, rank, targets):
    return config.num_hidden_layers * sum(rank * sum(_shapes(config, head_dim=False)[t]) for t in targets)


def counts_A_only(config, rank, targets):
    return config.num_hidden_layers * sum(rank * _shapes(config)[t][0] for t in targets)


def consumes_the_targets(config, rank, targets):
    n = 0
    while targets:
        n += config.num_hidden_layers * rank * sum(_shapes(config)[targets.pop()])
    return n


@pytest.mark.parametrize(
    "fn", [lambda c, r, t: counting.count_lora_params(c, r, t), count_solution, count_with_meta_model]
)
def test_count_right_answers_pass(fn, capsys):
    assert checks.check_lora_count(fn) is True
    assert "[count LoRA parameters] correct." in capsys.readouterr().out


def test_count_stub_and_left_raise(capsys):
    assert checks.check_lora_count(count_stub) is None
    assert "not attempted yet" in capsys.readouterr().out
    assert checks.check_lora_count(count_body_left_above_the_raise) is None
    assert "delete that line" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("fn", "reason"),
    [
        (full_weights, "the size of the full weights"),
        (one_layer, "one layer's worth"),
        (ignores_gqa, "k_proj and v_proj output num_key_value_heads * head_dim features"),
        (ignores_head_dim, "case 4"),
        (ignores_head_dim, "This config sets head_dim=16, not hidden_size // num_attention_heads = 8"),
        (counts_A_only, "counts one of the two matrices"),
        (consumes_the_targets, "changes its input `target_modules` in place"),
        (lambda c, r, t: float(count_solution(c, r, t)), "return an int (a count)"),
        (lambda c, r, t: None, "your function returned None"),
    ],
)
def test_count_wrong_answers_are_named(fn, reason, capsys):
    assert checks.check_lora_count(fn) is False
    out = capsys.readouterr().out
    assert "[count LoRA parameters] not yet right" in out and reason in out


def test_count_the_head_dim_case_really_differs():
    from utils.checks.ch03 import _lora_count_cases

    config, rank, targets = _lora_count_cases()[-1]
    assert config.head_dim != config.hidden_size // config.num_attention_heads
    assert ignores_head_dim(config, rank, targets) != counting.count_lora_params(config, rank, targets)


# The best rank-k approximation.


def approx_outer_products(M, k):
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return sum(S[i] * torch.outer(U[:, i], Vh[i]) for i in range(k))


def approx_broadcast(M, k):
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k]


def approx_stub(M: torch.Tensor, k: int) -> torch.Tensor:
    """The closest matrix of rank at most k to M (Eckart-Young), same shape as M."""
    # YOUR CODE HERE
    raise NotImplementedError("Exercise: write this part, then run the check below.")


def approx_body_left_above_the_raise(M, k):
    out = lora.best_rank_k(M, k)
    raise NotImplementedError("Exercise: write this part, then run the check below.")
    return out


def no_sigma(M, k):
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return U[:, :k] @ Vh[:k, :]


def rows_of_U(M, k):
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return U[:k, :k] @ torch.diag(S[:k]) @ Vh[:k, :]


def rows_of_U_full(M, k):
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return U[:k, :] @ torch.diag(S[:k]) @ Vh[:k, :]


def one_too_many(M, k):
    return lora.best_rank_k(M, k + 1)


def smallest_values(M, k):
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return U[:, -k:] @ torch.diag(S[-k:]) @ Vh[-k:, :]


def V_instead_of_Vh(M, k):
    U, S, V = torch.svd(M)  # the old API returns V, not Vh
    return U[:, :k] @ torch.diag(S[:k]) @ V[:k, :]


def subtracts_in_place(M, k):
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    M -= U[:, k:] @ torch.diag(S[k:]) @ Vh[k:, :]
    return M


@pytest.mark.parametrize("fn", [lora.best_rank_k, approx_outer_products, approx_broadcast,
                                lambda M, k: lora.best_rank_k(M.float(), k)])  # fmt: skip
def test_rank_k_right_answers_pass(fn, capsys):
    assert checks.check_rank_k_approx(fn) is True
    assert "[best rank-k approximation] correct." in capsys.readouterr().out


def test_rank_k_stub_and_left_raise(capsys):
    assert checks.check_rank_k_approx(approx_stub) is None
    assert "not attempted yet" in capsys.readouterr().out
    assert checks.check_rank_k_approx(approx_body_left_above_the_raise) is None
    assert "delete that line" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("fn", "reason"),
    [
        (no_sigma, "the singular values are missing"),
        (rows_of_U, "Which index of U and of Vh runs over the k components?"),
        (one_too_many, "your matrix has rank 4, above k = 3"),
        (lambda M, k: M.clone(), "above k = 3"),
        (smallest_values, "not the closest rank-k matrix"),
        (V_instead_of_Vh, "the right singular vectors are the rows of Vh"),
        (subtracts_in_place, "changes its input `M` in place"),
        (
            lambda M, k: lora.best_rank_k(M, k).numpy(),
            "return a tensor; your function returned a numpy.ndarray",
        ),
        (lambda M, k: lora.best_rank_k(M, k).long(), "floating-point"),
    ],
)
def test_rank_k_wrong_answers_are_named(fn, reason, capsys):
    assert checks.check_rank_k_approx(fn) is False
    out = capsys.readouterr().out
    assert "[best rank-k approximation] not yet right" in out and reason in out


def test_rank_k_a_crash_shows_the_learners_line(capsys):
    assert checks.check_rank_k_approx(rows_of_U_full) is False
    out = capsys.readouterr().out
    assert "your function raised RuntimeError" in out
    assert "return U[:k, :] @ torch.diag(S[:k]) @ Vh[:k, :]" in out
