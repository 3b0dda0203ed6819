"""Chapter 03: LoRA's forward pass, its parameter count, and the best rank-k approximation."""

from __future__ import annotations

from collections.abc import Callable

from utils.checks.core import (
    CheckFailed,
    call_on_copies,
    close,
    describe,
    edited_config,
    expect_int,
    expect_tensor,
    mutation_message,
    run_check,
)

# The names torch gives its matrix products (function, method and operator forms).
_PRODUCTS = frozenset(
    {"matmul", "__matmul__", "__rmatmul__", "__imatmul__", "mm", "bmm", "einsum", "linear", "tensordot",
     "addmm", "addbmm", "baddbmm", "chain_matmul", "multi_dot", "outer", "ger", "inner"}
)  # fmt: skip


def _product_recorder(d_out: int, d_in: int):
    """A ``TorchFunctionMode`` that records the first matrix product whose result is d_out x d_in (or its
    transpose): the full-size ``B @ A`` LoRA never forms. The case sizes are chosen so that no other
    product of the forward pass (x W^T, x A^T, (x A^T) B^T) has that shape."""
    import torch
    from torch.overrides import TorchFunctionMode

    class ProductRecorder(TorchFunctionMode):
        formed: tuple[str, tuple[int, ...]] | None = None

        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = getattr(func, "__name__", "")
            if (
                self.formed is None
                and name in _PRODUCTS
                and isinstance(out, torch.Tensor)
                and out.dim() >= 2
                and tuple(out.shape[-2:]) in ((d_out, d_in), (d_in, d_out))
            ):
                self.formed = (name, tuple(out.shape))
            return out

    return ProductRecorder()


def _lora_reference(x, W, A, B, alpha, rank):
    return x @ W.T + (alpha / rank) * ((x @ A.T) @ B.T)


def _lora_cases():
    """(lead dims of x, d_in, d_out, rank, alpha): a square W first (so W in place of W^T shows as wrong
    values, not a shape error), then batch dimensions; no x dimension equals d_in or d_out."""
    return [((5,), 6, 6, 2, 8), ((4,), 12, 8, 2, 4), ((2, 3), 10, 6, 3, 1.5)]


def check_lora_forward(lora_forward: Callable) -> bool | None:
    """Check ``lora_forward(x, W, A, B, alpha, rank) -> h`` against ``x W^T + (alpha / rank) x A^T B^T``.

    Shapes: ``x`` (..., d_in), ``W`` (d_out, d_in), ``A`` (rank, d_in), ``B`` (d_out, rank); ``h`` (..., d_out).
    Also: the d_out x d_in product ``B @ A`` must never be formed, and the inputs must not be changed."""
    import torch

    def call(fn, case: str, x, W, A, B, alpha, rank, record: bool = False):
        """The learner's h on copies of the inputs, validated: (h, the forbidden product if formed)."""
        recorder = _product_recorder(W.shape[0], W.shape[1]) if record else None
        if recorder is not None:
            with recorder:
                got, changed = call_on_copies(fn, x=x, W=W, A=A, B=B, alpha=alpha, rank=rank)
        else:
            got, changed = call_on_copies(fn, x=x, W=W, A=A, B=B, alpha=alpha, rank=rank)
        got = expect_tensor(got, what="a tensor h")
        if changed:
            raise CheckFailed(
                f"{case}: "
                + mutation_message(
                    changed,
                    "an in-place operation (x *= ..., A.mul_(...), W.t_()) rewrites the caller's tensor; "
                    "write h = ... from new tensors instead",
                )
            )
        want_shape = (*x.shape[:-1], W.shape[0])
        if tuple(got.shape) != want_shape:
            raise CheckFailed(
                f"{case}: x is {tuple(x.shape)} and W is {tuple(W.shape)}, so h should be {want_shape}; "
                f"yours is {tuple(got.shape)}."
            )
        return got, (recorder.formed if recorder is not None else None)

    def diagnose(fn, case, x, W, A, B, alpha, rank):
        """The full result is wrong: call with B = 0 (only the frozen part) and W = 0 (only the update)."""
        base_want, update = x @ W.T, (x @ A.T) @ B.T
        base_got, _ = call(fn, case, x, W, A, torch.zeros_like(B), alpha, rank)
        update_got, _ = call(fn, case, x, torch.zeros_like(W), A, B, alpha, rank)
        base_ok = close(base_got, base_want)
        update_ok = close(update_got, (alpha / rank) * update)
        frozen_wrong = (
            "the frozen part differs from x W^T (with B = 0 your layer should be exactly the frozen layer): "
            "W is (d_out, d_in), so a row vector x maps to x @ W.T (or F.linear(x, W))"
        )
        if not base_ok:
            raise CheckFailed(
                f"{case}: {frozen_wrong}" + ("." if update_ok else "; the update (with W = 0) is off too.")
            )
        if not update_ok:
            for scale, what in [
                (1.0, "no scaling at all"),
                (alpha, "alpha without dividing by rank"),
                (rank / alpha, "rank / alpha, upside down"),
                (0.0, "nothing: the update is missing"),
            ]:
                if close(update_got, scale * update):
                    raise CheckFailed(f"{case}: the frozen part is right but the update is scaled by {what}.")
            raise CheckFailed(
                f"{case}: the frozen part is right (with B = 0 you get x W^T), the update is not "
                "(alpha / r) B A x: x meets A first, then B."
            )
        raise CheckFailed(
            f"{case}: each part is right on its own (B = 0 gives x W^T, W = 0 gives the scaled update), but "
            "together they are not: h is the frozen output plus the update."
        )

    def body(fn):
        gen = torch.Generator().manual_seed(0)
        for i, (lead, d_in, d_out, rank, alpha) in enumerate(_lora_cases()):
            case = f"case {i + 1}"
            x = torch.randn(*lead, d_in, generator=gen)
            W, A = torch.randn(d_out, d_in, generator=gen), torch.randn(rank, d_in, generator=gen)
            B = torch.randn(d_out, rank, generator=gen)
            got, formed = call(fn, case, x, W, A, B, alpha, rank, record=True)
            if not close(got, _lora_reference(x, W, A, B, alpha, rank)):
                diagnose(fn, case, x, W, A, B, alpha, rank)
            if formed is not None:
                name, shape = formed
                raise CheckFailed(
                    f"{case}: the values are right, but your function forms a {shape[-2]} x {shape[-1]} matrix "
                    f"(with {name}), the size of W: that is B @ A, which the exercise forbids. LoRA's point is "
                    "that x meets A first (r numbers per token), then B: r (d_in + d_out) multiply-adds per "
                    "token instead of d_in * d_out, and no full-size matrix in memory."
                )
        x, W, A = (
            torch.randn(3, 5, generator=gen),
            torch.randn(7, 5, generator=gen),
            torch.randn(2, 5, generator=gen),
        )
        got, _ = call(fn, "with B = 0", x, W, A, torch.zeros(7, 2), 4, 2)
        if not close(got, x @ W.T, atol=1e-6, rtol=0):
            raise CheckFailed("with B = 0 the layer must equal the base layer exactly.")

    return run_check("LoRA forward", lora_forward, body)


# Counting LoRA parameters.


def _lora_count_cases():
    from transformers import LlamaConfig

    def cfg(**kw):
        return LlamaConfig(vocab_size=100, **kw)

    return [
        (cfg(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4),
         4, ["q_proj", "v_proj"]),
        (cfg(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2),
         8, ["q_proj", "k_proj", "v_proj", "o_proj"]),
        (cfg(hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1),
         2, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
        # head_dim set apart from hidden_size // num_attention_heads (as Gemma and Qwen3 do)
        (cfg(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16), 4, ["q_proj", "k_proj", "v_proj", "o_proj"]),
    ]  # fmt: skip


def _lora_count_hint(config, rank: int, targets: list[str], got: int, want: int) -> str:
    from utils import counting

    layers = counting.lora_targets(config, targets)
    d, heads, kv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    natural = d // heads
    if got == sum(s.d_in * s.d_out for s in layers):
        return " That is the size of the full weights: LoRA adds A (r x d_in) and B (d_out x r) instead."
    halves = []  # two slips can give the same number (with d_in = d_out and two layers): name both
    if got * config.num_hidden_layers == want:
        halves.append(" That is one layer's worth: every decoder layer has its own adapters.")
    if got in (sum(rank * s.d_in for s in layers), sum(rank * s.d_out for s in layers)):
        halves.append(
            " That counts one of the two matrices: A is r x d_in and B is d_out x r, both are trained."
        )
    if halves:
        return " Or:".join(halves)
    if config.head_dim != natural and got in (
        counting.count_lora_params(edited_config(config, head_dim=natural), rank, targets),
        counting.count_lora_params(
            edited_config(config, head_dim=natural, num_key_value_heads=heads), rank, targets
        ),
    ):
        return (
            f" This config sets head_dim={config.head_dim}, not hidden_size // num_attention_heads = {natural}: "
            "use config.head_dim when it is set; q_proj then outputs num_attention_heads * head_dim features."
        )
    if kv != heads and any(t in targets for t in ("k_proj", "v_proj")):
        return " k_proj and v_proj output num_key_value_heads * head_dim features, not hidden_size."
    if "gate_proj" in targets:
        return " The MLP's gate and up map hidden_size -> intermediate_size, down maps it back."
    return ""


def check_lora_count(count_fn: Callable) -> bool | None:
    """Check ``count_fn(config, rank, target_modules) -> int`` (Llama family, a list of names) against
    ``utils.counting.count_lora_params``, which tests/test_counting.py checks against peft."""
    from utils import counting

    def body(fn):
        for i, (config, rank, targets) in enumerate(_lora_count_cases()):
            got, changed = call_on_copies(fn, config=config, rank=rank, target_modules=list(targets))
            got = expect_int(got)
            if changed:
                raise CheckFailed(
                    mutation_message(changed, "read the config and the list, do not change them")
                )
            want = counting.count_lora_params(config, rank, targets)
            if got == want:
                continue
            head_dim = (
                f", head_dim {config.head_dim}"
                if config.head_dim != config.hidden_size // config.num_attention_heads
                else ""
            )
            raise CheckFailed(
                f"case {i + 1} (rank {rank}, targets {targets}, {config.num_key_value_heads} of "
                f"{config.num_attention_heads} heads for k/v{head_dim}): you count {got:,}, peft adds {want:,}."
                + _lora_count_hint(config, rank, targets, got, want)
            )

    return run_check("count LoRA parameters", count_fn, body)


# The best rank-k approximation.


def check_rank_k_approx(approx_fn: Callable) -> bool | None:
    """Check ``approx_fn(M, k) -> M_k``, the best rank-k approximation of ``M`` (Eckart-Young), against
    ``utils.lora.best_rank_k``."""
    import torch

    from utils.lora import best_rank_k

    def body(fn):
        gen = torch.Generator().manual_seed(0)
        for i, (m, n, k) in enumerate([(12, 8, 3), (6, 10, 1), (9, 9, 9)]):
            case = f"case {i + 1} (M is {m} x {n}, k = {k})"
            M = torch.randn(m, n, generator=gen, dtype=torch.float64)
            want = best_rank_k(M, k)
            got, changed = call_on_copies(fn, M=M, k=k)
            if not isinstance(got, torch.Tensor):
                raise CheckFailed(f"return a tensor; your function returned {describe(got)}.")
            if changed:
                raise CheckFailed(f"{case}: " + mutation_message(changed, "compute a new matrix"))
            if tuple(got.shape) != (m, n):
                raise CheckFailed(
                    f"{case}: M is {(m, n)} and so must its approximation be; yours is "
                    f"{tuple(got.shape)}. Which index of U and of Vh runs over the k components?"
                )
            got = expect_tensor(got).detach().to(torch.float64)
            if close(got, want):
                continue
            U, S, Vh = torch.linalg.svd(M, full_matrices=False)
            if close(got, U[:, :k] @ Vh[:k, :]):
                raise CheckFailed(f"{case}: the right vectors, but the singular values are missing.")
            if Vh.shape[0] == Vh.shape[1] and close(got, U[:, :k] @ torch.diag(S[:k]) @ Vh.T[:k, :]):
                raise CheckFailed(
                    f"{case}: the right singular vectors are the rows of Vh (torch.linalg.svd returns Vh; "
                    "torch.svd returns V, whose columns they are)."
                )
            rank = int(torch.linalg.matrix_rank(got))
            if rank > k:
                raise CheckFailed(f"{case}: your matrix has rank {rank}, above k = {k}.")
            raise CheckFailed(
                f"{case}: rank at most k, but not the closest rank-k matrix: keep the k largest "
                "singular values and their vectors."
            )

    return run_check("best rank-k approximation", approx_fn, body)
