"""Chapter 05: QLoRA (block-wise absmax, NF4 for one block, bits of constants per parameter)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

from utils.checks.core import CheckFailed, call_on_copies, describe, mutation_message, run_check


def _blocks_case(seed: int, n_blocks: int, block_size: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_blocks * block_size, generator=g) * 0.02
    x[3] = 0.5  # an outlier in the first block
    if n_blocks > 2:
        x[block_size + 1] = -0.3  # a negative extreme in the second
    # a 2-D input too, whose rows are not blocks: blocks run over the flattened values
    return x.reshape(block_size, n_blocks) if seed % 2 else x


def _reference_blockwise(x, block_size: int):
    from utils import quant

    return quant.absmax_quantize_blockwise(x, block_size, bits=8)


def check_blockwise_absmax(quantize_fn: Callable, dequantize_fn: Callable) -> bool | None:
    """Check ``quantize_fn(x, block_size) -> (codes int8 (n_blocks, block_size), absmax (n_blocks,))`` and
    ``dequantize_fn(codes, absmax) -> flat fp32 values`` against ``utils.quant``'s block-wise absmax
    (127 levels each side), on inputs with outliers, 1-D and 2-D, two block sizes."""
    import torch

    cases = [(0, 4, 64), (1, 3, 16), (2, 6, 32)]

    def quantize_body(fn):
        for seed, n_blocks, block_size in cases:
            x = _blocks_case(seed, n_blocks, block_size)
            got, changed = call_on_copies(fn, x=x, block_size=block_size)
            if changed:
                raise CheckFailed(mutation_message(changed, "quantize a copy"))
            if not (isinstance(got, tuple) and len(got) == 2):
                raise CheckFailed(f"return a pair (codes, absmax); your function returned {describe(got)}.")
            codes, absmax = got
            want_codes, want_absmax = _reference_blockwise(x, block_size)
            for value, name in ((codes, "codes"), (absmax, "absmax")):
                if not isinstance(value, torch.Tensor):
                    raise CheckFailed(f"{name} should be a tensor; yours is {describe(value)}.")
            if tuple(absmax.shape) != (n_blocks,):
                flat = (
                    " (a 2-D input: flatten it first; blocks run over the flattened values)"
                    if x.dim() == 2
                    else ""
                )
                raise CheckFailed(
                    f"with {n_blocks * block_size} values and block_size={block_size}, absmax should have shape "
                    f"({n_blocks},), one per block; yours is {tuple(absmax.shape)}{flat}."
                )
            if absmax.dtype in (torch.float16, torch.bfloat16):
                raise CheckFailed(
                    f"keep absmax in float32, as bitsandbytes does: {absmax.dtype} rounds the scale of every block."
                )
            if not torch.allclose(absmax.double(), want_absmax.double(), rtol=1e-6, atol=0):
                if torch.allclose(absmax.double(), x.reshape(n_blocks, -1).amax(1).double()):
                    raise CheckFailed(
                        "absmax is the largest *magnitude* of a block: a negative extreme counts too."
                    )
                if torch.allclose(absmax.double().expand(n_blocks), x.abs().max().double().expand(n_blocks)):
                    raise CheckFailed("every block gets the whole tensor's absmax: each block needs its own.")
                raise CheckFailed(
                    f"the absmax of block 0 is {float(absmax[0]):.4g}; it should be max |x| of that block."
                )
            if tuple(codes.shape) != (n_blocks, block_size):
                raise CheckFailed(
                    f"codes should have shape ({n_blocks}, {block_size}), one row per block; yours is "
                    f"{tuple(codes.shape)}."
                )
            if codes.dtype != torch.int8:
                raise CheckFailed(f"store the codes as int8 (one byte each); yours are {codes.dtype}.")
            if not torch.equal(codes, want_codes):
                if codes.abs().max() <= 1:
                    raise CheckFailed(
                        "the codes are all -1, 0 or 1: scale x / absmax by 127 before rounding."
                    )
                floored = torch.floor(127 * x.reshape(n_blocks, -1).float() / want_absmax[:, None]).to(
                    torch.int8
                )
                if torch.equal(codes, floored) or torch.equal(
                    codes,
                    torch.trunc(127 * x.reshape(n_blocks, -1).float() / want_absmax[:, None]).to(torch.int8),
                ):
                    raise CheckFailed(
                        "round to the nearest integer (torch.round); truncating biases every code toward 0 or down."
                    )
                wrong = int((codes != want_codes).sum())
                raise CheckFailed(
                    f"{wrong} of {codes.numel()} codes differ from round(127 * x / absmax of its block)."
                )

    def dequantize_body(fn):
        for seed, n_blocks, block_size in cases:
            x = _blocks_case(seed, n_blocks, block_size)
            codes, absmax = _reference_blockwise(x, block_size)
            got, changed = call_on_copies(fn, codes=codes, absmax=absmax)
            if changed:
                raise CheckFailed(mutation_message(changed))
            if not isinstance(got, torch.Tensor):
                raise CheckFailed(f"return a tensor; your function returned {describe(got)}.")
            if not got.is_floating_point():
                raise CheckFailed(f"return floating-point values; yours have dtype {got.dtype}.")
            if got.dtype in (torch.float16, torch.bfloat16):
                raise CheckFailed(f"return float32 values; {got.dtype} rounds what you dequantized.")
            want = (codes.float() * absmax[:, None] / 127).reshape(-1)
            if got.numel() != want.numel():
                raise CheckFailed(f"return {want.numel()} values (every code); yours has {got.numel()}.")
            got = got.reshape(-1)
            if torch.allclose(got.double(), want.double(), rtol=1e-5, atol=1e-7):
                continue
            if torch.allclose(
                got.double(), (codes.float() * absmax[:, None]).reshape(-1).double(), rtol=1e-5
            ):
                raise CheckFailed("the values are 127 times too large: divide by 127 again.")
            if torch.allclose(got.double(), (codes.float() / 127).reshape(-1).double(), rtol=1e-5):
                raise CheckFailed("each block must be multiplied back by its own absmax.")
            raise CheckFailed("the values differ from code * absmax / 127 of their block.")

    first = run_check("block-wise absmax: quantize", quantize_fn, quantize_body)
    second = run_check("block-wise absmax: dequantize", dequantize_fn, dequantize_body)
    if first is None or second is None:
        return None
    return first and second


def check_nf4_block(nf4_fn: Callable) -> bool | None:
    """Check ``nf4_fn(block, code_book) -> (codes, absmax)``: per element the index of the code-book value
    nearest to ``block / absmax``, against ``utils.quant.nearest_code`` (ties excluded from the test blocks)."""
    import torch

    from utils import quant

    book = quant.nf4_code_book()

    def body(fn):
        g = torch.Generator().manual_seed(5)
        blocks = [torch.randn(64, generator=g) * 0.03, torch.randn(8, 8, generator=g) * 0.1]
        blocks[0][10] = -0.2  # the largest magnitude is negative
        for block in blocks:
            got, changed = call_on_copies(fn, block=block, code_book=book)
            if changed:
                raise CheckFailed(mutation_message(changed))
            if not (isinstance(got, tuple) and len(got) == 2):
                raise CheckFailed(f"return a pair (codes, absmax); your function returned {describe(got)}.")
            codes, absmax = got
            want_absmax = block.abs().max()
            if not isinstance(absmax, torch.Tensor | numbers.Real) or isinstance(absmax, bool):
                raise CheckFailed(f"absmax should be a number or a 0-d tensor; yours is {describe(absmax)}.")
            if isinstance(absmax, torch.Tensor) and absmax.numel() != 1:
                raise CheckFailed(f"absmax is one number per block; yours has shape {tuple(absmax.shape)}.")
            if not math.isclose(float(absmax), float(want_absmax), rel_tol=1e-6):
                if math.isclose(float(absmax), float(block.max()), rel_tol=1e-6):
                    raise CheckFailed("absmax is the largest magnitude: here the extreme value is negative.")
                raise CheckFailed(
                    f"absmax should be max |block| = {float(want_absmax):.4g}; yours is {float(absmax):.4g}."
                )
            if not isinstance(codes, torch.Tensor):
                raise CheckFailed(f"codes should be a tensor; yours is {describe(codes)}.")
            if codes.is_floating_point():
                if codes.numel() == block.numel() and torch.isin(codes.reshape(-1), book).all():
                    raise CheckFailed("return the *index* of the nearest code (0..15), not the code's value.")
                raise CheckFailed(f"codes should be integer indices 0..15; yours have dtype {codes.dtype}.")
            if tuple(codes.shape) != tuple(block.shape):
                raise CheckFailed(
                    f"codes should have the block's shape {tuple(block.shape)}; yours is {tuple(codes.shape)}."
                )
            want = quant.nearest_code((block / want_absmax).reshape(-1), book).reshape(block.shape)
            if torch.equal(codes.long(), want):
                continue
            if torch.equal(codes.long(), quant.nearest_code(block.reshape(-1), book).reshape(block.shape)):
                raise CheckFailed("divide the block by its absmax first: the code book spans [-1, 1].")
            signed = block[..., None] / want_absmax - book
            if torch.equal(codes.long(), signed.argmin(-1)) or torch.equal(codes.long(), signed.argmax(-1)):
                raise CheckFailed("nearest means the smallest *absolute* difference.")
            uniform = torch.round((block / want_absmax + 1) * 7.5).long()
            if torch.equal(codes.long(), uniform):
                raise CheckFailed("NF4's values are not evenly spaced: compare with the code book's values.")
            wrong = int((codes.long() != want).sum())
            raise CheckFailed(f"{wrong} of {block.numel()} codes are not the nearest code of block / absmax.")

    return run_check("NF4 for one block", nf4_fn, body)


def check_constant_bits(bits_fn: Callable) -> bool | None:
    """Check ``bits_fn(block_size, double_quant, dq_block_size) -> float`` against
    ``utils.quant.constant_bits_per_parameter`` for several block sizes, with and without double quantization."""
    from utils import quant

    cases = [(64, False, 256), (64, True, 256), (128, True, 256), (32, True, 64), (256, False, 256)]

    def body(fn):
        for block_size, dq, dq_block in cases:
            got = fn(block_size, dq, dq_block)
            if isinstance(got, bool) or not isinstance(got, numbers.Real):
                raise CheckFailed(f"return a number of bits; your function returned {describe(got)}.")
            want = quant.constant_bits_per_parameter(block_size, dq, dq_block)
            if math.isclose(got, want, rel_tol=1e-9):
                continue
            label = f"block_size={block_size}, double_quant={dq}, dq_block_size={dq_block}"
            if math.isclose(got, want / 8, rel_tol=1e-9):
                raise CheckFailed(f"{label}: you return bytes; the question is bits.")
            if dq and math.isclose(got, 8 / block_size, rel_tol=1e-9):
                raise CheckFailed(
                    f"{label}: the 8-bit absmaxes need constants of their own, one fp32 value per dq_block_size of them."
                )
            if dq and math.isclose(got, 32 / block_size, rel_tol=1e-9):
                raise CheckFailed(
                    f"{label}: with double quantization each absmax is stored in 8 bits, not 32."
                )
            if dq and math.isclose(got, 8 / block_size + 32 / dq_block, rel_tol=1e-9):
                raise CheckFailed(
                    f"{label}: one fp32 value per dq_block_size *absmaxes* covers dq_block_size x block_size weights."
                )
            if not dq and math.isclose(got, 16 / block_size, rel_tol=1e-9):
                raise CheckFailed(f"{label}: bitsandbytes keeps the absmaxes in fp32, 32 bits each.")
            raise CheckFailed(f"{label}: you return {got:.6g} bits per weight, which is not it.")

    return run_check("bits of constants per parameter", bits_fn, body)
