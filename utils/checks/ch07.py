"""Chapter 07: one Llama layer's activation bytes, a checkpointed forward, a token-weighted accumulation loss."""

from __future__ import annotations

import copy
from collections.abc import Callable

from utils.checks.core import CheckFailed, close, describe, expect_int, run_check

# (a) The activation bytes of one Llama decoder layer.

_LAYER_CASES = [  # (batch, seq, hidden, intermediate, heads, bytes per value)
    (2, 32, 128, 256, 4, 4),
    (1, 100, 192, 512, 4, 4),
    (4, 16, 64, 176, 2, 2),
    (3, 50, 256, 688, 8, 2),
]


def _layer_reference(b: int, s: int, h: int, i: int, a: int, v: int) -> int:
    """The op walk of utils.memory on a real config (not the closed formula the lesson derives)."""
    from transformers import LlamaConfig

    from utils import memory

    config = LlamaConfig(vocab_size=128, hidden_size=h, intermediate_size=i, num_hidden_layers=1,
                         num_attention_heads=a, num_key_value_heads=a, max_position_embeddings=max(s, 8))  # fmt: skip
    precision = "fp32" if v == 4 else "bf16"
    return memory.layer_activation_bytes(config, batch_size=b, seq_len=s, precision=precision)[0]


def _layer_variants(b: int, s: int, h: int, i: int, a: int, v: int) -> dict[str, int]:
    n = b * s
    right = (8 + 8 * v) * n * h + 4 * v * n * i + 8 * n + 4 * b * a * s
    gpt = 34 * s * b * h + 5 * a * s * s * b
    return {
        "korthikanti": gpt,
        "korthikanti_scaled": gpt * v // 2,
        "eager": right - 4 * b * a * s + 4 * b * a * s * s,
        "no_upcast": right - 8 * n * h + 2 * v * n * h,
        "no_small": right - 8 * n - 4 * b * a * s,
        "no_lse": right - 4 * b * a * s,
        "no_rsqrt": right - 8 * n,
        "two_mlp": right - 2 * v * n * i,
        "no_norm_copy": right - 2 * v * n * h,
        "bits": 8 * right,
        "per_token": right // n if right % n == 0 else -1,
    }


_LAYER_HINTS = {
    "korthikanti": "that is Korthikanti et al.'s GPT layer (34 s b h + 5 a s^2 b): dropout masks, a GeLU MLP of "
    "width 4h and the s^2 attention matrix. A Llama layer has no dropout, a SwiGLU MLP of width I, and SDPA keeps "
    "no s^2 matrix.",
    "korthikanti_scaled": "that is Korthikanti et al.'s GPT layer scaled to the value size: a Llama layer has no "
    "dropout, a SwiGLU MLP of width I, and SDPA keeps no s^2 matrix.",
    "eager": "you count the s x s attention matrix: SDPA (the default attention) recomputes it in backward and "
    "keeps only a logsumexp per query and head.",
    "no_upcast": "in 16-bit each RMSNorm upcasts its input to fp32 before squaring it, and that fp32 copy is "
    "what is saved: those bytes are 4 per value whatever bytes_per_value is.",
    "no_small": "the small terms are missing: each RMSNorm saves one fp32 rsqrt per token, and SDPA an fp32 "
    "logsumexp per query position and head.",
    "no_lse": "SDPA's fp32 logsumexp (one per query position and head) is missing.",
    "no_rsqrt": "each RMSNorm also saves one fp32 rsqrt per token (two norms per layer).",
    "two_mlp": "SwiGLU saves four tensors of width I (gate, up, silu(gate), and their product, down_proj's "
    "input), not two.",
    "no_norm_copy": "each RMSNorm's weight needs the normalized input for its gradient: a copy of width H in "
    "the model dtype, besides the norm's output.",
    "bits": "return bytes, not bits.",
    "per_token": "return the bytes of the whole batch (all b x s tokens), not per token.",
}


def check_layer_activation_bytes(layer_activation_bytes: Callable) -> bool | None:
    """Check ``layer_activation_bytes(batch_size, seq_len, hidden_size, intermediate_size, n_heads,
    bytes_per_value) -> int``: the bytes one Llama decoder layer saves for backward (full fine-tuning, SDPA,
    as many key/value heads as query heads), against the op-by-op count of ``utils.memory``."""

    def body(fn):
        for case in _LAYER_CASES:
            got = expect_int(fn(*case), "a number of bytes")
            want = _layer_reference(*case)
            if got == want:
                continue
            b, s, h, i, a, v = case
            where = f"batch {b}, seq {s}, hidden {h}, intermediate {i}, {a} heads, {v}-byte values"
            for name, value in _layer_variants(*case).items():
                if got == value:
                    raise CheckFailed(f"{where}: {_LAYER_HINTS[name]}")
            raise CheckFailed(
                f"{where}: {got:,} bytes is {got / want:.3f} times the count. Walk the layer: two RMSNorms, "
                "q/k/v/o under SDPA, the SwiGLU MLP; at each op, what does backward need?"
            )

    return run_check("layer activation bytes", layer_activation_bytes, body)


# (b) A checkpointed forward through a stack of blocks.


def _blocks(width: int = 16, n: int = 3):
    import torch
    from torch import nn

    torch.manual_seed(7)
    return nn.ModuleList(
        nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)) for _ in range(n)
    )


def _run(forward: Callable, blocks, x):
    """(output, parameter gradients, input gradient, saved bytes) of ``forward(blocks, x)`` then backward."""
    from utils import memory

    out, saved = memory.saved_tensor_bytes(lambda: forward(blocks, x), exclude=blocks.parameters())
    if out is not None and getattr(out, "requires_grad", False):
        out.pow(2).sum().backward()
    return out, [p.grad for p in blocks.parameters()], x.grad, saved


def _plain(blocks, x):
    for block in blocks:
        x = block(x)
    return x


def check_checkpointed_forward(checkpointed_forward: Callable) -> bool | None:
    """Check ``checkpointed_forward(blocks, x) -> tensor``: ``x`` through every block of ``blocks`` (an
    ``nn.ModuleList``), with fewer saved bytes than a plain forward and the same output and gradients,
    whether or not ``x`` requires grad."""
    import torch

    from utils import memory

    def body(fn):
        for x_grad in (False, True):
            case = (
                "input that requires grad"
                if x_grad
                else "input that does not require grad (a frozen embedding)"
            )
            blocks = _blocks()
            x = torch.randn(8, 16, generator=torch.Generator().manual_seed(3)).requires_grad_(x_grad)
            want, want_grads, want_x_grad, plain_saved = _run(
                _plain, copy.deepcopy(blocks), x.detach().clone().requires_grad_(x_grad)
            )
            mine = copy.deepcopy(blocks)
            x_mine = x.detach().clone().requires_grad_(x_grad)
            got, grads, x_grad_got, saved = _run(fn, mine, x_mine)
            if not isinstance(got, torch.Tensor):
                raise CheckFailed(f"return the output tensor; your function returned {describe(got)}.")
            if tuple(got.shape) != tuple(want.shape) or not close(got, want, 1e-6, 1e-6):
                raise CheckFailed(f"{case}: the output differs from running the blocks one after the other.")
            if not got.requires_grad or all(g is None for g in grads):
                raise CheckFailed(
                    f"{case}: no gradient reaches the blocks' parameters. Checkpointing keeps autograd on (it only "
                    "drops what is saved), so no torch.no_grad() around the blocks; and with use_reentrant=True a "
                    "checkpoint whose input does not require grad records nothing: use use_reentrant=False."
                )
            if any(g is None for g in grads) or not all(
                close(g, w, 1e-6, 1e-6) for g, w in zip(grads, want_grads, strict=True)
            ):
                raise CheckFailed(
                    f"{case}: the parameters' gradients differ from a plain forward's (is a block's input "
                    "detached, or a block skipped?)."
                )
            if x_grad and (x_grad_got is None or not close(x_grad_got, want_x_grad, 1e-6, 1e-6)):
                raise CheckFailed(f"{case}: the gradient of x differs: do not detach the input.")
            if saved >= plain_saved:
                raise CheckFailed(
                    f"{case}: your forward saves {saved:,} bytes for backward, as many as a plain forward "
                    f"({plain_saved:,}): nothing is checkpointed. Run each block under torch.utils.checkpoint."
                )
            every_block = _run(
                memory.checkpointed_forward, copy.deepcopy(blocks), x.detach().clone().requires_grad_(x_grad)
            )[3]
            if saved > every_block:
                raise CheckFailed(
                    f"{case}: your forward saves {saved:,} bytes for backward; with every block checkpointed only "
                    f"the blocks' inputs are kept ({every_block:,} bytes). Is each block run under checkpoint?"
                )

    return run_check("checkpointed forward", checkpointed_forward, body)


# (c) The loss of one micro-batch in token-weighted gradient accumulation.


def _micro_batches():
    """Three micro-batches of labels with mixed answer lengths, right padding and masked prompts."""
    import torch

    gen = torch.Generator().manual_seed(11)
    vocab, out = 13, []
    for lengths, prompt in [((9, 4), 2), ((3, 3), 1), ((12, 10), 3)]:
        width = max(lengths) + 1
        labels = torch.full((len(lengths), width), -100)
        for r, n in enumerate(lengths):
            labels[r, :n] = torch.randint(0, vocab, (n,), generator=gen)
            labels[r, :prompt] = -100
        out.append((torch.randn(len(lengths), width, vocab, generator=gen), labels))
    return out


def _big_batch_loss(micro):
    import torch.nn.functional as F

    total, count = 0.0, 0
    for logits, labels in micro:
        t = labels[:, 1:]
        total = total + F.cross_entropy(logits[:, :-1].transpose(1, 2), t, ignore_index=-100, reduction="sum")
        count += int((t != -100).sum())
    return total / count


def _accum_variants(micro, n_total: int) -> dict[str, float]:
    import torch.nn.functional as F

    k = len(micro)
    means, sums, padded, unshifted = [], [], [], []
    for logits, labels in micro:
        t = labels[:, 1:]
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), t, ignore_index=-100, reduction="sum")
        means.append(nll / int((t != -100).sum()))
        sums.append(nll)
        padded.append(nll / t.numel())
        unshifted.append(
            F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="sum") / n_total
        )
    return {
        "mean_over_k": float(sum(means) / k),
        "sum_of_means": float(sum(means)),
        "sum": float(sum(sums)),
        "padding": float(sum(padded) / k),
        "no_shift": float(sum(unshifted)),
    }


_ACCUM_HINTS = {
    "mean_over_k": "you average each micro-batch's mean loss (mean / k): a micro-batch of short answers then "
    "weighs as much as one of long answers. Weight every target token of the accumulated batch equally.",
    "sum_of_means": "you add up the micro-batches' mean losses: that is k times an average of means, neither "
    "weighted by tokens nor divided.",
    "sum": "you return the summed token loss without dividing: the result grows with the batch.",
    "padding": "padding positions (label -100) count in your denominator: they are not targets.",
    "no_shift": "position t predicts the label at t + 1: compare logits[:, :-1] with labels[:, 1:].",
}


def check_accumulation_loss(accumulation_loss: Callable) -> bool | None:
    """Check ``accumulation_loss(logits, labels, n_target_tokens) -> scalar tensor``: one micro-batch's share
    of the accumulated batch's loss, so that backward on every micro-batch's value gives the gradient of the
    large batch's mean token loss. ``n_target_tokens``: target tokens of the whole accumulated batch."""
    import torch

    def body(fn):
        micro = _micro_batches()
        n_total = sum(int((labels[:, 1:] != -100).sum()) for _, labels in micro)
        leaves = [(logits.clone().requires_grad_(True), labels.clone()) for logits, labels in micro]
        want = _big_batch_loss(leaves)
        want.backward()
        want = want.detach()
        want_grads = [leaf.grad.clone() for leaf, _ in leaves]
        total = 0.0
        grads = []
        for logits, labels in micro:
            leaf = logits.clone().requires_grad_(True)
            got = fn(leaf, labels.clone(), n_total)
            if not isinstance(got, torch.Tensor) or got.numel() != 1:
                raise CheckFailed(
                    f"return the loss as a one-element tensor (backward needs it); your function returned {describe(got)}."
                )
            if not got.requires_grad:
                raise CheckFailed(
                    "your loss does not depend on the logits through autograd (was it detached?)."
                )
            got.reshape(()).backward()
            total += float(got.detach())
            grads.append(leaf.grad)
        if abs(total - float(want)) <= 1e-5 * abs(float(want)) and all(
            g is not None and close(g, w, 1e-6, 1e-5) for g, w in zip(grads, want_grads, strict=True)
        ):
            return
        for name, value in _accum_variants(micro, n_total).items():
            if abs(total - value) <= 1e-5 * abs(value):
                raise CheckFailed(_ACCUM_HINTS[name])
        if abs(total - float(want)) <= 1e-5 * abs(float(want)):
            raise CheckFailed(
                f"the micro-batches' losses add up to the large batch's mean token loss ({float(want):.4f}), but "
                "their gradients differ from it: is part of the expression detached (.detach(), .item(), a "
                "constant computed without autograd)?"
            )
        raise CheckFailed(
            f"the micro-batches' losses add up to {total:.4f}, not to the large batch's mean token loss "
            f"({float(want):.4f})."
        )

    return run_check("accumulation loss", accumulation_loss, body)
