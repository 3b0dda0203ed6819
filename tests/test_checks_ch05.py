"""Chapter 05's checkers: block-wise absmax, NF4 for one block, bits of constants per parameter."""

import pytest
import torch

from utils import checks

STUB = "Exercise: write this part, then run the check below."

# Block-wise absmax


def quantize_solution(x, block_size):
    blocks = x.reshape(-1, block_size).float()
    absmax = blocks.abs().amax(dim=1)
    return torch.round(127 * blocks / absmax[:, None]).to(torch.int8), absmax


def dequantize_solution(codes, absmax):
    return (codes.float() * absmax[:, None] / 127).reshape(-1)


def quantize_stub(x, block_size):
    """Codes and absmax."""
    # YOUR CODE HERE
    raise NotImplementedError(STUB)


def dequantize_stub(codes, absmax):
    """Values."""
    # YOUR CODE HERE
    raise NotImplementedError(STUB)


def signed_max(x, block_size):
    blocks = x.reshape(-1, block_size).float()
    absmax = blocks.amax(dim=1)
    return torch.round(127 * blocks / absmax[:, None]).to(torch.int8), absmax


def one_scale(x, block_size):
    blocks = x.reshape(-1, block_size).float()
    absmax = blocks.abs().max().expand(blocks.shape[0]).clone()
    return torch.round(127 * blocks / absmax[:, None]).to(torch.int8), absmax


def truncates(x, block_size):
    blocks = x.reshape(-1, block_size).float()
    absmax = blocks.abs().amax(dim=1)
    return (127 * blocks / absmax[:, None]).to(torch.int8), absmax


def no_127(x, block_size):
    blocks = x.reshape(-1, block_size).float()
    absmax = blocks.abs().amax(dim=1)
    return torch.round(blocks / absmax[:, None]).to(torch.int8), absmax


def float_codes(x, block_size):
    codes, absmax = quantize_solution(x, block_size)
    return codes.float(), absmax


def flat_codes(x, block_size):
    codes, absmax = quantize_solution(x, block_size)
    return codes.reshape(-1), absmax


def in_place(x, block_size):
    x.mul_(1.0)
    x[0] = 0.0
    return quantize_solution(x, block_size)


def rows_as_blocks(x, block_size):  # takes a 2-D input's rows for blocks instead of flattening it
    b = x if x.dim() == 2 else x.reshape(-1, block_size)
    a = b.abs().amax(1)
    return torch.round(127 * b / a[:, None]).to(torch.int8), a


def fp16_absmax(x, block_size):
    codes, absmax = quantize_solution(x, block_size)
    return codes, absmax.half()


def fp16_values(codes, absmax):
    return (codes.half() * absmax[:, None].half() / 127).reshape(-1)


def no_divide_back(codes, absmax):
    return (codes.float() * absmax[:, None]).reshape(-1)


def no_absmax_back(codes, absmax):
    return (codes.float() / 127).reshape(-1)


def test_blockwise_right_answer_passes(capsys):
    assert checks.check_blockwise_absmax(quantize_solution, dequantize_solution) is True
    out = capsys.readouterr().out
    assert (
        "[block-wise absmax: quantize] correct." in out and "[block-wise absmax: dequantize] correct." in out
    )


def test_blockwise_stubs_are_not_attempted(capsys):
    assert checks.check_blockwise_absmax(quantize_stub, dequantize_stub) is None
    assert capsys.readouterr().out.count("not attempted yet") == 2
    assert checks.check_blockwise_absmax(quantize_solution, dequantize_stub) is None


@pytest.mark.parametrize(
    ("quantize", "dequantize", "reason"),
    [
        (signed_max, dequantize_solution, "a negative extreme counts too"),
        (one_scale, dequantize_solution, "each block needs its own"),
        (truncates, dequantize_solution, "round to the nearest integer"),
        (no_127, dequantize_solution, "scale x / absmax by 127"),
        (float_codes, dequantize_solution, "store the codes as int8"),
        (flat_codes, dequantize_solution, "one row per block"),
        (in_place, dequantize_solution, "in place"),
        (quantize_solution, no_divide_back, "127 times too large"),
        (quantize_solution, no_absmax_back, "its own absmax"),
        (rows_as_blocks, dequantize_solution, "flatten it first"),
        (fp16_absmax, dequantize_solution, "keep absmax in float32"),
        (quantize_solution, fp16_values, "return float32 values"),
        (lambda x, b: quantize_solution(x, b)[0], dequantize_solution, "return a pair"),
    ],
)
def test_blockwise_wrong_answers_fail(quantize, dequantize, reason, capsys):
    assert checks.check_blockwise_absmax(quantize, dequantize) is False
    out = capsys.readouterr().out
    assert reason in out and "round(127" not in out.split("differ from")[0][-5:]


# NF4 for one block


def nf4_solution(block, code_book):
    absmax = block.abs().max()
    return (block[..., None] / absmax - code_book).abs().argmin(dim=-1), absmax


def nf4_stub(block, code_book):
    """Codes and absmax."""
    # YOUR CODE HERE
    raise NotImplementedError(STUB)


def nf4_values(block, code_book):
    codes, absmax = nf4_solution(block, code_book)
    return code_book[codes], absmax


def nf4_not_normalized(block, code_book):
    return (block[..., None] - code_book).abs().argmin(dim=-1), block.abs().max()


def nf4_signed(block, code_book):
    absmax = block.abs().max()
    return (block[..., None] / absmax - code_book).argmin(dim=-1), absmax


def nf4_max_not_abs(block, code_book):
    absmax = block.max()
    return (block[..., None] / absmax - code_book).abs().argmin(dim=-1), absmax


def nf4_uniform(block, code_book):
    absmax = block.abs().max()
    return torch.round((block / absmax + 1) * 7.5).long(), absmax


def test_nf4_right_answers_pass(capsys):
    assert checks.check_nf4_block(nf4_solution) is True
    from utils import quant

    def via_reference(block, code_book):
        absmax = block.abs().max()
        return quant.nearest_code((block / absmax).reshape(-1), code_book).reshape(block.shape), absmax

    assert checks.check_nf4_block(via_reference) is True
    assert "[NF4 for one block] correct." in capsys.readouterr().out


def test_nf4_stub(capsys):
    assert checks.check_nf4_block(nf4_stub) is None
    assert "not attempted yet" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("fn", "reason"),
    [
        (nf4_values, "not the code's value"),
        (nf4_not_normalized, "divide the block by its absmax first"),
        (nf4_signed, "smallest *absolute* difference"),
        (nf4_max_not_abs, "the extreme value is negative"),
        (nf4_uniform, "not evenly spaced"),
        (lambda block, book: nf4_solution(block, book)[0], "return a pair"),
        (lambda block, book: (nf4_solution(block, book)[0].reshape(-1), block.abs().max()), "block's shape"),
    ],
)
def test_nf4_wrong_answers_fail(fn, reason, capsys):
    assert checks.check_nf4_block(fn) is False
    assert reason in capsys.readouterr().out


# Bits of constants


def bits_solution(block_size=64, double_quant=True, dq_block_size=256):
    if not double_quant:
        return 32 / block_size
    return 8 / block_size + 32 / (block_size * dq_block_size)


def bits_stub(block_size=64, double_quant=True, dq_block_size=256):
    """Bits."""
    # YOUR CODE HERE
    raise NotImplementedError(STUB)


def test_bits_right_answer_and_stub(capsys):
    assert checks.check_constant_bits(bits_solution) is True
    assert checks.check_constant_bits(bits_stub) is None
    out = capsys.readouterr().out
    assert "correct." in out and "not attempted yet" in out


@pytest.mark.parametrize(
    ("fn", "reason"),
    [
        (lambda b, dq, d: bits_solution(b, dq, d) / 8, "you return bytes"),
        (lambda b, dq, d: 8 / b if dq else 32 / b, "need constants of their own"),
        (lambda b, dq, d: 32 / b, "stored in 8 bits, not 32"),
        (lambda b, dq, d: 8 / b + 32 / d if dq else 32 / b, "covers dq_block_size x block_size weights"),
        (lambda b, dq, d: bits_solution(b, dq, d) if dq else 16 / b, "fp32, 32 bits each"),
        (lambda b, dq, d: 4 + bits_solution(b, dq, d), "which is not it"),
        (lambda b, dq, d: str(bits_solution(b, dq, d)), "return a number of bits"),
    ],
)
def test_bits_wrong_answers_fail(fn, reason, capsys):
    assert checks.check_constant_bits(fn) is False
    out = capsys.readouterr().out
    assert reason in out and "0.127" not in out
