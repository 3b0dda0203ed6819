"""Chapter 10: the capstone (an adapter's size in bytes from the model's shapes; do two models' logits agree)."""

from __future__ import annotations

from collections.abc import Callable

from utils.checks.core import CheckFailed, call_on_copies, describe, expect_int, mutation_message, run_check

# (d_in, d_out) of the adapted layers of a few models: the tiny one's 4 layers, a GQA model (k/v narrower)
_SHAPE_CASES = [
    ([(192, 192)] * 4 + [(192, 512), (192, 512), (512, 192)], 8, 4),  # one tiny layer, all linear
    ([(576, 576), (576, 192), (576, 192), (576, 576)] * 2, 16, 4),  # SmolLM2 attention, k/v 192 wide
    ([(896, 896), (896, 128)], 64, 2),  # bf16 adapters
]


def adapter_bytes_reference(shapes: list[tuple[int, int]], rank: int, bytes_per_value: int = 4) -> int:
    """Bytes of a LoRA adapter's tensors: per adapted layer A (rank x d_in) and B (d_out x rank)."""
    return sum(rank * (d_in + d_out) for d_in, d_out in shapes) * bytes_per_value


def check_adapter_bytes(fn: Callable) -> bool | None:
    """Check ``fn(shapes, rank, bytes_per_value) -> int``: the bytes of the adapter's weights for adapted
    layers of ``(d_in, d_out)`` shapes, on layers of mixed widths (GQA), two ranks and two dtypes."""

    def body(fn):
        for shapes, rank, bpv in _SHAPE_CASES:
            got, changed = call_on_copies(fn, shapes=shapes, rank=rank, bytes_per_value=bpv)
            if changed:
                raise CheckFailed(mutation_message(changed))
            got = expect_int(got, "a number of bytes")
            want = adapter_bytes_reference(shapes, rank, bpv)
            if got == want:
                continue
            values = want // bpv
            if got == values:
                raise CheckFailed(
                    "that is the number of values; the file stores bytes_per_value bytes for each."
                )
            if (
                got == sum(rank * d_in * d_out for d_in, d_out in shapes) * bpv
                or got == sum(d_in * d_out for d_in, d_out in shapes) * bpv
            ):
                raise CheckFailed(
                    "that is the size of the full weight matrices: LoRA stores two thin matrices per layer, "
                    "A with rank rows and B with rank columns."
                )
            if got in (
                sum(rank * d_in for d_in, _ in shapes) * bpv,
                sum(rank * d_out for _, d_out in shapes) * bpv,
            ):
                raise CheckFailed("you counted only one of the two matrices of each layer (A or B).")
            if got == 2 * rank * shapes[0][0] * len(shapes) * bpv:
                raise CheckFailed(
                    "you assumed every layer is square: k_proj and v_proj of a GQA model are narrower, and the MLP "
                    "layers are wider. Use each layer's own d_in and d_out."
                )
            raise CheckFailed(
                f"for {len(shapes)} layers at rank {rank} and {bpv} bytes per value you return {got:,} bytes; "
                "that is not the size of the adapter's tensors."
            )

    return run_check("adapter_bytes", fn, body)


def logits_agree_reference(logits_a, logits_b, attention_mask, atol: float) -> bool:
    """True when ``|logits_a - logits_b| <= atol`` at every real position (``attention_mask`` 1)."""
    real = attention_mask.bool()
    return bool(((logits_a - logits_b).abs()[real] <= atol).all())


def _logit_cases():
    import torch

    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 5, 11, generator=g)
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[1, 3:] = 0  # right padding in row 1
    mask[2, 4:] = 0
    small = a + 1e-6 * torch.randn(a.shape, generator=g)
    padded_noise = small.clone()
    padded_noise[1, 3:] += 5.0  # a large difference at padding only: still the same model
    one_off = a.clone()
    one_off[0, 2, 7] += 3e-3  # one real logit differs, the argmax unchanged
    shifted = a + 2e-4  # every logit moved a little (the mean difference is 2e-4)
    big = a * 100
    big_close = big + 5e-5  # large logits, absolute difference 5e-5: agree at atol 1e-4
    near_1000 = (
        1000 + a
    )  # logits near 1,000 off by 5e-4: a relative tolerance (allclose's rtol) would pass them
    near_1000_off = near_1000 + 5e-4
    return [
        ("the same logits", a, a.clone(), mask, 1e-6, True),
        ("differences of 1e-6 at atol 1e-5", a, small, mask, 1e-5, True),
        ("a large difference only at padded positions", a, padded_noise, mask, 1e-5, True),
        ("one real logit off by 3e-3 (same argmax) at atol 1e-4", a, one_off, mask, 1e-4, False),
        ("every logit off by 2e-4 at atol 1e-4", a, shifted, mask, 1e-4, False),
        ("large logits off by 5e-5 at atol 1e-4", big, big_close, mask, 1e-4, True),
        ("logits near 1,000 off by 5e-4 at atol 1e-4", near_1000, near_1000_off, mask, 1e-4, False),
    ]


def check_logits_agree(fn: Callable) -> bool | None:
    """Check ``fn(logits_a, logits_b, attention_mask, atol) -> bool``: do two models' logits agree within
    ``atol`` (absolute) at every real, unpadded position."""

    def body(fn):
        for what, a, b, mask, atol, want in _logit_cases():
            got, changed = call_on_copies(fn, logits_a=a, logits_b=b, attention_mask=mask, atol=atol)
            if changed:
                raise CheckFailed(mutation_message(changed))
            if hasattr(got, "item") and getattr(got, "numel", lambda: 0)() == 1:
                got = bool(got.item())
            if type(got).__module__ == "numpy" and type(got).__name__.startswith("bool"):
                got = bool(got)  # numpy's bool is a fine answer too
            if not isinstance(got, bool):
                raise CheckFailed(
                    f"return a bool (True when they agree); your function returned {describe(got)}."
                )
            if got == want:
                continue
            if "padded" in what:
                raise CheckFailed(
                    f"{what}: you say they differ. Padded positions are not part of any answer; only positions "
                    "where attention_mask is 1 count."
                )
            if "same argmax" in what:
                raise CheckFailed(
                    f"{what}: you say they agree, but one real logit is off by more than atol (the greedy token "
                    "is the same: that is not enough). Every value must be within atol."
                )
            if "every logit" in what:
                raise CheckFailed(
                    f"{what}: you say they agree, but every logit is off by more than atol. Every value must be "
                    "within atol."
                )
            if "near 1,000" in what:
                raise CheckFailed(
                    f"{what}: you say they agree, but every logit is off by 5e-4, more than atol. atol is an "
                    "absolute tolerance: torch.allclose and isclose also add rtol * |b| (rtol 1e-5 by default), "
                    "which near 1,000 is 1e-2."
                )
            if "large logits" in what:
                raise CheckFailed(
                    f"{what}: you say they differ. atol is an absolute tolerance, not a relative one."
                )
            raise CheckFailed(f"{what}: the answer should be {want}, yours is {got}.")

    return run_check("logits_agree", fn, body)
