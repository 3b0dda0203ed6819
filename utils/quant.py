"""Quantization from first principles, the way QLoRA (Dettmers et al. 2023, arXiv 2305.14314) and bitsandbytes
do it, written to be read; and the guards that keep a 4-bit model on a CPU learning.

The idea in four lines. To store a float tensor ``x`` in ``b`` bits:

    absmax = max |x|                  (one float per tensor, or per block of ``block_size`` values)
    q      = nearest code to x / absmax  in a code book of 2**b values in [-1, 1]
    x_hat  = code_book[q] * absmax    (dequantize)

* ``absmax_quantize``: a uniform, symmetric int code book (int8: -127..127), one absmax per tensor; one outlier
  makes absmax large and every other value lands on a few codes near 0. ``absmax_quantize_blockwise`` keeps one
  absmax per block, so an outlier only spoils its own block.
* ``nf4_code_book``: NormalFloat4, 16 values placed at quantiles of the standard normal, so that each code is
  used equally often by normally distributed weights (pretrained weights are close to normal). ``fp4_code_book``:
  bitsandbytes' 4-bit float (1 sign, 2 exponent, 1 mantissa bit), the default of ``BitsAndBytesConfig``.
* ``quantize_4bit`` / ``dequantize_4bit`` (``quantize_nf4`` / ``dequantize_nf4``): block-wise 4-bit, code for
  code what ``bitsandbytes.functional.quantize_4bit`` returns (tests/test_quant.py asserts it): one index per
  weight, packed two per byte (high nibble first), and one fp32 absmax per block of 64.
* ``double_quantize``: QLoRA's second step, the fp32 absmaxes themselves stored in 8 bits (minus their mean,
  blocks of 256, bitsandbytes' 8-bit dynamic code book), which takes the constants from 0.5 to 0.127 bits per
  parameter (``bits_per_parameter`` derives it).

The CPU guards (measured on torch 2.13, transformers 5.23, peft 0.21, bitsandbytes 0.50):

* ``prepare_4bit_for_cpu_training(model)``: on a CPU with AVX512-BF16, bitsandbytes repacks each ``Linear4bit``
  weight into an inference layout the first time it runs in eval mode without gradients (any evaluation,
  any ``generate``); after that the backward pass through the layer is wrong, and LoRA gradients silently
  become zero. Setting ``support_avx512bf16_for_cpu = False`` on every ``Linear4bit`` before the first forward
  pass avoids it; gradients are then the same as in a run that never evaluated.
* ``LearningGuard``: handed to ``utils.train.train_loop(on_gradients=...)``, it raises ``NotLearningError``
  with an explanation when a trainable tensor gets no gradient (None or all zeros) at a step, or when the loss
  does not move over the first steps. A learner never trains a model that silently does not learn.
* ``four_bit_backend`` / ``load_model_4bit``: whether this machine's bitsandbytes can run 4-bit layers on a
  device; when it cannot, an explanation and a fallback to an unquantized model instead of a traceback.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

QUANT_TYPES = ("nf4", "fp4")
ROUNDTRIP_TYPES = ("int8", "int4", "fp4", "nf4")
BLOCK_SIZE = 64  # QLoRA and bitsandbytes: one absmax per 64 weights
DQ_BLOCK_SIZE = 256  # double quantization: one fp32 absmax per 256 of the 8-bit absmaxes
# The outermost probability of NF4: halfway between 1 - 1/(2*15) and 1 - 1/(2*16) (0.96770833...: the
# paper's offset for the 15- and 16-value halves of an asymmetric code book), rounded to 7 decimals as
# bitsandbytes' create_normal_map(offset=0.9677083) has it (the unrounded value moves codes by up to 3e-7).
NF4_OFFSET = 0.9677083
# bitsandbytes' FP4 in bit-pattern order (index = the 4-bit code): 1 sign bit, 2 exponent bits, 1 mantissa bit,
# exponent bias 2, then divided by the largest value (12). Index 8 is -0.
_FP4_VALUES = (0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)


# ----------------------------------------------------------------------------------------- input checks


def _floating(x: torch.Tensor, what: str = "x") -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}.")
    if not x.is_floating_point():
        raise TypeError(
            f"{what} has dtype {x.dtype}: quantization maps floating-point values to codes, so pass a float "
            "tensor (a tensor of integers is already quantized)."
        )
    if x.numel() == 0:
        raise ValueError(f"{what} is empty: there is nothing to quantize.")
    return x


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return value


def _quant_type(quant_type: str) -> str:
    if quant_type not in QUANT_TYPES:
        raise ValueError(
            f"Unknown quant_type {quant_type!r}: bitsandbytes' 4-bit types are {', '.join(map(repr, QUANT_TYPES))}."
        )
    return quant_type


def _blocks(x: torch.Tensor, block_size: int) -> tuple[torch.Tensor, int]:
    """``x`` flattened into rows of ``block_size`` (float32), the last one zero-padded; and the padding.

    A size that ``block_size`` does not divide leaves a short last block. Padding it with zeros changes
    nothing: a zero never raises a block's absmax, and the padded codes are dropped on the way back (the
    same result as bitsandbytes, which treats the short block on its own)."""
    flat = x.detach().reshape(-1).float()
    pad = (-flat.numel()) % block_size
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.reshape(-1, block_size), pad


# ------------------------------------------------------------------------------------- absmax, int codes


def absmax_quantize(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax quantization with one scale for the whole tensor.

    ``q = round(x / absmax * L)`` with ``L = 2**(bits - 1) - 1`` levels on each side (int8: -127..127).
    Returns ``(q, absmax)``: ``q`` int8 (int16 above 8 bits) of ``x``'s shape, ``absmax`` a 0-d fp32 tensor.
    """
    _floating(x)
    bits = _positive_int(bits, "bits")
    if not 2 <= bits <= 16:
        raise ValueError(f"bits must be between 2 and 16, got {bits}.")
    levels = 2 ** (bits - 1) - 1
    absmax = x.detach().abs().max().float()
    scale = absmax if absmax > 0 else torch.ones_like(absmax)  # an all-zero tensor: every code is 0
    q = torch.round(x.detach().float() / scale * levels)
    return q.to(torch.int8 if bits <= 8 else torch.int16), absmax


def absmax_dequantize(q: torch.Tensor, absmax: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """``q * absmax / L`` in fp32: the inverse of ``absmax_quantize`` up to rounding (at most ``absmax / (2L)``)."""
    levels = 2 ** (bits - 1) - 1
    return q.float() * absmax / levels


def absmax_quantize_blockwise(
    x: torch.Tensor, block_size: int = BLOCK_SIZE, bits: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmax quantization with one scale per block of ``block_size`` consecutive values (row-major order).

    Returns ``(q, absmax)``: ``q`` int8 of shape ``(n_blocks, block_size)`` (the last block zero-padded when
    ``block_size`` does not divide ``x.numel()``), ``absmax`` fp32 ``(n_blocks,)``. An outlier now raises the
    scale of its own block only."""
    _floating(x)
    block_size = _positive_int(block_size, "block_size")
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be between 2 and 8 for block-wise int codes, got {bits}.")
    levels = 2 ** (bits - 1) - 1
    rows, _ = _blocks(x, block_size)
    absmax = rows.abs().amax(dim=1)
    scale = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    q = torch.round(rows / scale[:, None] * levels).to(torch.int8)
    return q, absmax


def absmax_dequantize_blockwise(
    q: torch.Tensor, absmax: torch.Tensor, shape: Iterable[int] | None = None, bits: int = 8
) -> torch.Tensor:
    """Inverse of ``absmax_quantize_blockwise``: ``q * absmax / L`` per block, cut to ``shape`` (default: flat)."""
    levels = 2 ** (bits - 1) - 1
    flat = (q.float() * absmax[:, None] / levels).reshape(-1)
    if shape is None:
        return flat
    shape = tuple(shape)
    return flat[: math.prod(shape)].reshape(shape)


# -------------------------------------------------------------------------------------------- code books


def nf4_code_book() -> torch.Tensor:
    """The 16 NF4 values, sorted, in [-1, 1] (fp32): index i is the 4-bit code i, as in bitsandbytes.

    Built as QLoRA section 3 and bitsandbytes' ``create_normal_map`` do it: take quantiles of N(0, 1) at
    evenly spaced probabilities, 8 on the positive side and 7 on the negative side (an asymmetric code book
    with an exact zero: 8 + 7 + 1 = 16 values), then divide by the largest so the ends are -1 and 1.
    The outermost probability is ``NF4_OFFSET`` (0.9677), not 1 (whose quantile is infinite).
    ``torch.special.ndtri`` is the inverse normal CDF (scipy's ``norm.ppf``)."""
    positive_p = torch.linspace(NF4_OFFSET, 0.5, 9, dtype=torch.float32)[:-1]  # 8 probabilities above 0.5
    negative_p = torch.linspace(NF4_OFFSET, 0.5, 8, dtype=torch.float32)[:-1]  # 7
    positive = torch.special.ndtri(positive_p.double())
    negative = -torch.special.ndtri(negative_p.double())
    values = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).float()
    values = values.sort().values
    return values / values.max()


def fp4_code_book() -> torch.Tensor:
    """bitsandbytes' 16 FP4 values in [-1, 1], indexed by the 4-bit code (bit-pattern order, not sorted)."""
    values = torch.tensor(_FP4_VALUES, dtype=torch.float32)
    return values / values.abs().max()


def int4_code_book() -> torch.Tensor:
    """The uniform symmetric 4-bit grid of absmax quantization: -7/7 .. 7/7 (15 values, sorted)."""
    return torch.arange(-7, 8, dtype=torch.float32) / 7


def code_book(quant_type: str) -> torch.Tensor:
    """``nf4_code_book()`` or ``fp4_code_book()``."""
    return nf4_code_book() if _quant_type(quant_type) == "nf4" else fp4_code_book()


def dynamic_code_book() -> torch.Tensor:
    """bitsandbytes' signed 8-bit "dynamic" code book (256 sorted values in [-1, 1]; Dettmers 2015, arXiv
    1511.04561), used for the 8-bit absmaxes of double quantization (``create_dynamic_map()``).

    After a sign bit, a run of zeros gives the decimal exponent (10**-6 .. 10**0) and the bits after the first
    1 a linear fraction between 0.1 and 1 at that exponent: fine steps near 0, coarse ones near 1."""
    exponent_bits, non_sign_bits = 7, 7
    values: list[float] = []
    for i in range(exponent_bits):
        fraction_items = 2 ** (i + non_sign_bits - exponent_bits) + 1
        edges = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        scale = 10 ** (-(exponent_bits - 1) + i)
        values += (scale * means).tolist() + (-scale * means).tolist()  # fp32 products, as bitsandbytes
    values += [0.0, 1.0]
    return torch.tensor(values, dtype=torch.float32).sort().values


def nearest_code(scaled: torch.Tensor, book: torch.Tensor) -> torch.Tensor:
    """Index (int64) of the nearest value of ``book`` for every element of ``scaled`` (values in [-1, 1]).

    The rule bitsandbytes' 4-bit quantizer uses: compare with the midpoints between neighbouring sorted codes
    (``torch.bucketize``); a value exactly on a midpoint goes to the lower code. ``book`` may be in any order
    (FP4's is by bit pattern): the index returned is into ``book`` as given."""
    order = torch.argsort(book)
    ordered = book[order]
    midpoints = (ordered[:-1] + ordered[1:]) / 2
    return order[torch.bucketize(scaled, midpoints)]


# ------------------------------------------------------------------------------------------------ 4-bit


@dataclass
class Quantized4bit:
    """A tensor in block-wise 4-bit: what bitsandbytes stores for a ``Linear4bit`` weight.

    ``codes``: one index per element (uint8, 0..15, flat, ``numel`` of them); ``packed``: the same codes two
    per byte, high nibble first (uint8, ``ceil(numel / 2)``: bitsandbytes' ``weight.data``, flattened);
    ``absmax``: fp32, one per block; ``shape``, ``block_size``, ``quant_type`` to dequantize."""

    codes: torch.Tensor
    packed: torch.Tensor
    absmax: torch.Tensor
    shape: tuple[int, ...]
    block_size: int
    quant_type: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def pack_4bit(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte, the first in the high nibble (``(c0 << 4) | c1``), a zero code appended
    to an odd count. ``codes``: integers 0..15, any shape (read flat). Returns uint8 ``(ceil(n / 2),)``."""
    flat = codes.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return (flat[0::2] << 4) | flat[1::2]


def unpack_4bit(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of ``pack_4bit``: the first ``numel`` codes (uint8, flat)."""
    flat = packed.reshape(-1).to(torch.uint8)
    codes = torch.stack([flat >> 4, flat & 0x0F], dim=1).reshape(-1)
    return codes[:numel]


def quantize_4bit(
    weight: torch.Tensor, block_size: int = BLOCK_SIZE, quant_type: str = "nf4"
) -> Quantized4bit:
    """Block-wise 4-bit quantization of ``weight`` (any float dtype and shape, read row-major):
    per block, ``absmax = max |w|``, then each ``w / absmax`` goes to its nearest code (``nearest_code``).

    Equal, code for code, to ``bitsandbytes.functional.quantize_4bit(weight, blocksize=block_size,
    quant_type=quant_type)`` (its packed bytes and ``quant_state.absmax``), tests/test_quant.py. Like
    bitsandbytes, the division is a multiplication by ``1 / absmax`` (float rounding decides ties)."""
    _floating(weight, "weight")
    block_size = _positive_int(block_size, "block_size")
    book = code_book(quant_type)
    rows, pad = _blocks(weight, block_size)
    absmax = rows.abs().amax(dim=1)
    scaled = torch.clamp(rows * (1.0 / absmax.clamp(min=1e-38))[:, None], -1, 1)
    codes = nearest_code(scaled.reshape(-1), book).to(torch.uint8)
    numel = weight.numel()
    codes = codes[:numel]
    return Quantized4bit(codes, pack_4bit(codes), absmax, tuple(weight.shape), block_size, quant_type)


def dequantize_4bit(q: Quantized4bit, absmax: torch.Tensor | None = None) -> torch.Tensor:
    """``code_book[code] * absmax`` of each element's block, fp32, in ``q.shape``. Pass ``absmax`` to use other
    constants (e.g. the ones ``dequantize_absmax`` rebuilt from double quantization). Equal to bitsandbytes'
    ``dequantize_4bit`` bit for bit (both are one fp32 multiplication per element)."""
    absmax = q.absmax if absmax is None else absmax
    book = code_book(q.quant_type)
    values = book[unpack_4bit(q.packed, q.numel).long()]
    pad = (-q.numel) % q.block_size
    if pad:
        values = torch.nn.functional.pad(values, (0, pad))
    out = (values.reshape(-1, q.block_size) * absmax.float()[:, None]).reshape(-1)
    return out[: q.numel].reshape(q.shape)


def quantize_nf4(weight: torch.Tensor, block_size: int = BLOCK_SIZE) -> Quantized4bit:
    """``quantize_4bit(weight, block_size, "nf4")``: QLoRA's storage type."""
    return quantize_4bit(weight, block_size, "nf4")


def dequantize_nf4(q: Quantized4bit, absmax: torch.Tensor | None = None) -> torch.Tensor:
    """``dequantize_4bit`` for an NF4 tensor."""
    if q.quant_type != "nf4":
        raise ValueError(f"This tensor is quantized as {q.quant_type!r}, not NF4: use dequantize_4bit.")
    return dequantize_4bit(q, absmax)


def quantize_dequantize(
    x: torch.Tensor, quant_type: str = "nf4", block_size: int | None = BLOCK_SIZE
) -> torch.Tensor:
    """``x`` after a round trip through ``quant_type``: ``"int8"`` / ``"int4"`` (absmax, uniform), ``"fp4"`` or
    ``"nf4"`` (4-bit code books). ``block_size=None``: one absmax for the whole tensor. For measuring errors."""
    _floating(x)
    if quant_type not in ROUNDTRIP_TYPES:
        raise ValueError(
            f"Unknown quant_type {quant_type!r}: choose one of {', '.join(map(repr, ROUNDTRIP_TYPES))}."
        )
    size = x.numel() if block_size is None else block_size
    if quant_type.startswith("int"):
        bits = int(quant_type[3:])
        q, absmax = absmax_quantize_blockwise(x, size, bits)
        return absmax_dequantize_blockwise(q, absmax, x.shape, bits)
    return dequantize_4bit(quantize_4bit(x, size, quant_type))


# -------------------------------------------------------------------------------- double quantization


@dataclass
class DoubleQuantized:
    """The absmaxes of a 4-bit tensor in 8 bits (QLoRA's double quantization, as bitsandbytes stores it).

    ``codes``: uint8, one per absmax (indices into ``code_book``, bitsandbytes' dynamic 8-bit code book);
    ``absmax``: fp32, one per block of ``block_size`` absmaxes; ``offset``: the fp32 mean subtracted first
    (absmaxes are all positive: centring them uses the signed code book's both halves)."""

    codes: torch.Tensor
    absmax: torch.Tensor
    offset: torch.Tensor
    code_book: torch.Tensor
    block_size: int


def double_quantize(absmax: torch.Tensor, block_size: int = DQ_BLOCK_SIZE) -> DoubleQuantized:
    """8-bit block-wise quantization of the fp32 constants ``absmax`` (1-D): subtract their mean, then per
    block of ``block_size`` divide by the block's absmax and take the nearest value of ``dynamic_code_book``.

    What ``bitsandbytes.functional.quantize_4bit(..., compress_statistics=True)`` stores in
    ``quant_state.absmax`` (uint8), ``quant_state.state2.absmax`` and ``quant_state.offset``. The offset and the
    second-level absmaxes are equal to bitsandbytes'; the codes are the nearest ones, which bitsandbytes' CPU
    kernel (a fast approximate binary search) also picks except for a few values near zero where it takes the
    neighbour (tests/test_quant.py measures how few, and that they are neighbours)."""
    _floating(absmax, "absmax")
    block_size = _positive_int(block_size, "block_size")
    if absmax.dim() != 1:
        raise ValueError(f"absmax must be 1-D (one constant per block), got shape {tuple(absmax.shape)}.")
    absmax = absmax.detach().float()
    offset = absmax.mean()
    rows, _ = _blocks(absmax - offset, block_size)
    absmax2 = rows.abs().amax(dim=1)
    scaled = rows / absmax2.clamp(min=1e-38)[:, None]
    book = dynamic_code_book()
    codes = nearest_code(scaled.reshape(-1), book).to(torch.uint8)[: absmax.numel()]
    return DoubleQuantized(codes, absmax2, offset, book, block_size)


def dequantize_absmax(dq: DoubleQuantized) -> torch.Tensor:
    """The fp32 absmaxes back from ``double_quantize``: ``code_book[code] * absmax2 + offset`` (one rounding
    step of the 8-bit code book away from the originals). Equal to bitsandbytes' ``dequantize_blockwise(
    quant_state.absmax, quant_state.state2) + quant_state.offset`` bit for bit, given the same codes."""
    n = dq.codes.numel()
    values = dq.code_book[dq.codes.long()]
    pad = (-n) % dq.block_size
    if pad:
        values = torch.nn.functional.pad(values, (0, pad))
    out = (values.reshape(-1, dq.block_size) * dq.absmax[:, None]).reshape(-1)[:n]
    return out + dq.offset


# ---------------------------------------------------------------------------------------- storage cost


def constant_bits_per_parameter(
    block_size: int = BLOCK_SIZE, double_quant: bool = True, dq_block_size: int = DQ_BLOCK_SIZE
) -> float:
    """Bits of quantization constants per weight.

    Without double quantization: one fp32 absmax (32 bits) per ``block_size`` weights, ``32 / block_size``:
    0.5 bits at block size 64. With it: each absmax in 8 bits, plus one fp32 absmax per ``dq_block_size``
    of them, ``8 / block_size + 32 / (block_size * dq_block_size)``: 8/64 + 32/(64 x 256) = 0.127 bits
    (QLoRA section 3; the fp32 offset and the 256-entry code book are per tensor, negligible)."""
    block_size = _positive_int(block_size, "block_size")
    if not double_quant:
        return 32 / block_size
    dq_block_size = _positive_int(dq_block_size, "dq_block_size")
    return 8 / block_size + 32 / (block_size * dq_block_size)


def bits_per_parameter(
    block_size: int = BLOCK_SIZE, double_quant: bool = True, dq_block_size: int = DQ_BLOCK_SIZE, bits: int = 4
) -> float:
    """Storage of a block-wise quantized weight, per weight: ``bits`` for its code plus its share of the
    constants (``constant_bits_per_parameter``): 4.5 bits for NF4 at block size 64, 4.127 with double
    quantization. A 65B model's quantized weights: 65e9 x 4.127 / 8 bytes."""
    return _positive_int(bits, "bits") + constant_bits_per_parameter(block_size, double_quant, dq_block_size)


def quant_state_bits(quant_state, numel: int) -> dict[str, float]:
    """Bits per weight measured on a bitsandbytes ``QuantState`` of a tensor of ``numel`` weights:
    ``{"constants": ..., "tables": ...}``. ``constants`` counts the absmaxes (with double quantization: the
    uint8 codes and the fp32 second-level absmaxes); ``tables`` the per-tensor extras (the 16-entry fp32 code
    book, the offset and the 256-entry dynamic code book), which matter only for tiny tensors."""

    def bits_of(t: torch.Tensor) -> int:
        return 8 * t.numel() * t.element_size()

    constants = bits_of(quant_state.absmax)
    tables = bits_of(quant_state.code)
    if getattr(quant_state, "nested", False):
        constants += bits_of(quant_state.state2.absmax)
        tables += bits_of(quant_state.state2.code) + bits_of(quant_state.offset.reshape(1))
    return {"constants": constants / numel, "tables": tables / numel}


# ------------------------------------------------------------------------------------- bitsandbytes, CPU


def linear_4bit_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every ``bitsandbytes.nn.Linear4bit`` in ``model`` (none if bitsandbytes is absent)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return []
    return [(n, m) for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]


def prepare_4bit_for_cpu_training(model: nn.Module) -> int:
    """Make every ``Linear4bit`` of ``model`` safe to train on a CPU after evaluation; returns how many.

    bitsandbytes 0.50 sets ``support_avx512bf16_for_cpu = True`` on CPUs with AVX512-BF16. Then the first
    forward pass in eval mode without gradients (``model.eval()`` + ``torch.no_grad()``: every evaluation and
    every ``generate``) repacks the weight into a layout for its fused inference kernel, for good, and the
    backward pass through the layer stops producing correct input gradients: LoRA adapters below it get
    zero gradients and stop learning, with only a UserWarning about ``gemv_4bit``. Setting the flag to False
    keeps the ordinary layout (inference is then a dequantize + matmul, slower on CPU, exact for training).
    Call it right after loading, before the first forward pass; it does nothing on a GPU model, and it
    refuses a model whose weights were already repacked (reload it)."""
    layers = linear_4bit_layers(model)
    repacked = [
        n
        for n, m in layers
        if getattr(getattr(m.weight, "quant_state", None), "packing_format_for_cpu", False)
    ]
    if repacked:
        raise RuntimeError(
            f"{len(repacked)} Linear4bit layers (e.g. {repacked[0]}) were already repacked for CPU inference by "
            "an eval-mode forward pass without gradients; gradients through them are wrong. Load the model "
            "again and call prepare_4bit_for_cpu_training(model) before the first forward pass."
        )
    for _, module in layers:
        module.support_avx512bf16_for_cpu = False
    return len(layers)


def four_bit_backend(device: torch.device | str = "cpu") -> tuple[bool, str]:
    """``(True, "")`` when this machine's bitsandbytes can quantize and run 4-bit layers on ``device``;
    otherwise ``(False, why)``, with the reason in words. Tries it on a 64-value tensor."""
    device = torch.device(device)
    try:
        import bitsandbytes.functional as bnb_f
    except ImportError as err:
        return False, f"bitsandbytes is not installed ({err}); install the course's pins (pip install -e .)."
    except Exception as err:  # a broken native library raises other errors at import
        return False, f"bitsandbytes failed to load ({type(err).__name__}: {err})."
    if device.type == "cuda" and not torch.cuda.is_available():
        return False, "there is no CUDA GPU on this machine."
    try:
        x = torch.linspace(-1, 1, 64, device=device)
        packed, state = bnb_f.quantize_4bit(x, blocksize=64, quant_type="nf4")
        back = bnb_f.dequantize_4bit(packed, state)
        if not torch.allclose(back.float().cpu(), x.cpu(), atol=0.2):
            return False, f"bitsandbytes' 4-bit kernels on {device.type} returned wrong values."
    except Exception as err:
        return False, (
            f"this bitsandbytes build has no 4-bit kernels for {device.type} "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no message'})."
        )
    return True, ""


def load_model_4bit(
    name_or_path=None,
    device: torch.device | str = "cpu",
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.float32,
    backend: tuple[bool, str] | None = None,
):
    """``(model, tokenizer, quantized)``: the model (default the course's tiny base) loaded in 4-bit with
    ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=...,
    bnb_4bit_compute_dtype=compute_dtype)``, made safe to train on a CPU (``prepare_4bit_for_cpu_training``).

    When bitsandbytes cannot run 4-bit on ``device`` (``four_bit_backend``; ``backend`` overrides the probe,
    for tests), it prints why and falls back to the same model unquantized in ``compute_dtype``, with
    ``quantized=False``: the notebook runs on, LoRA instead of QLoRA, and says so."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from utils import models

    _quant_type(quant_type)
    device = torch.device(device)
    ok, why = backend if backend is not None else four_bit_backend(device)
    if not ok:
        print(
            f"4-bit loading is not available here: {why}\n"
            f"Falling back to the model unquantized in {str(compute_dtype).removeprefix('torch.')}: LoRA on "
            "top trains the same way (this is plain LoRA, not QLoRA), it only needs more memory for the weights."
        )
        model, tokenizer = models.load_model(name_or_path, device=device, dtype=compute_dtype)
        return model, tokenizer, False
    source = str(models.base_model_path() if name_or_path is None else name_or_path)
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
    )
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(source, quantization_config=config, device_map={"": device})
    if device.type == "cpu":
        prepare_4bit_for_cpu_training(model)
    return model, tokenizer, True


# ---------------------------------------------------------------------------------------- learning guard


class NotLearningError(RuntimeError):
    """Training would go on without learning: trainable tensors get no gradient, or the loss does not move."""


class LearningGuard:
    """A check for ``utils.train.train_loop(..., on_gradients=LearningGuard(model))``: it runs after each
    step's backward pass and raises ``NotLearningError``, with what to do, when

    * from step ``grace_steps + 1`` on, a tensor with ``requires_grad`` has no gradient (None) or an all-zero
      one. ``grace_steps=1`` because LoRA starts with B = 0, which makes A's first gradient exactly zero;
      from the second step on every adapter tensor gets a gradient. Checked at every step, not only the
      first ones: the CPU 4-bit trap starts at the first evaluation, whenever that comes;
    * after ``loss_window`` steps the loss has not moved by more than ``min_change`` (relative to the first);
    * a ``Linear4bit`` layer holds weights that bitsandbytes repacked for CPU inference (the trap that
      ``prepare_4bit_for_cpu_training`` prevents): its gradients are wrong but not zero, the loss still falls,
      so only this structural check catches it.

    ``history`` keeps ``(step, loss, tensors without gradient)`` per step."""

    def __init__(
        self, model: nn.Module, grace_steps: int = 1, loss_window: int = 5, min_change: float = 1e-4
    ) -> None:
        self.model = model
        self.grace_steps = grace_steps
        self.loss_window = loss_window
        self.min_change = min_change
        self.history: list[tuple[int, float, int]] = []

    def __call__(self, step: int, loss: float) -> None:
        repacked = [
            n for n, m in linear_4bit_layers(self.model)
            if getattr(getattr(m.weight, "quant_state", None), "packing_format_for_cpu", False)
        ]  # fmt: skip
        if repacked:
            raise NotLearningError(
                f"At step {step}, {len(repacked)} bitsandbytes Linear4bit layers (e.g. {repacked[0]}) hold "
                "weights repacked for CPU inference: an eval-mode forward pass without gradients (an "
                "evaluation, a generate) did it. From now on no gradient flows back through those layers, "
                "only through the adapters: the loss still goes down, more slowly, and the model learns far "
                "less, silently. Fix: load the model again and call "
                "utils.quant.prepare_4bit_for_cpu_training(model) right after loading (it sets "
                "support_avx512bf16_for_cpu = False on every Linear4bit)."
            )
        trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        dead = [n for n, p in trainable if p.grad is None or not bool(p.grad.detach().ne(0).any())]
        self.history.append((step, float(loss), len(dead)))
        if step > self.grace_steps and dead:
            raise NotLearningError(self._no_gradient_message(step, dead, len(trainable)))
        if not math.isfinite(loss):
            raise NotLearningError(
                f"The loss is {loss} at step {step}: the weights are now useless. Lower the learning rate, "
                "keep gradient clipping on (max_grad_norm), and in fp16 use loss scaling."
            )
        if step == self.loss_window:
            first = self.history[0][1]
            moved = max(abs(h[1] - first) for h in self.history)
            if moved <= self.min_change * max(abs(first), 1e-12):
                raise NotLearningError(
                    f"The loss has not moved over the first {step} steps ({first:.6f} -> {loss:.6f}): nothing "
                    "is learning. Check that the learning rate is not 0, that the optimizer holds the "
                    "trainable parameters, and that gradients reach them."
                )

    def _no_gradient_message(self, step: int, dead: list[str], n_trainable: int) -> str:
        shown = ", ".join(dead[:3]) + (", ..." if len(dead) > 3 else "")
        message = (
            f"At step {step}, {len(dead)} of {n_trainable} trainable tensors got no gradient (None or all "
            f"zeros): {shown}. They would not learn, and training would go on as if nothing were wrong."
        )
        layers = linear_4bit_layers(self.model)
        risky = [n for n, m in layers if getattr(m, "support_avx512bf16_for_cpu", False)]
        if risky:
            message += (
                f"\nThis model has {len(risky)} bitsandbytes Linear4bit layers that repack their weights for "
                "CPU inference after an eval-mode forward pass without gradients (an evaluation, a generate), "
                "after which gradients through them are lost. Fix: load the model again and call "
                "utils.quant.prepare_4bit_for_cpu_training(model) right after loading (it sets "
                "support_avx512bf16_for_cpu = False on every Linear4bit)."
            )
        else:
            message += (
                "\nCommon causes: a frozen layer between the loss and these tensors that cuts the graph "
                "(torch.no_grad, .detach()), an adapter that is not active, or requires_grad set on a tensor "
                "the forward pass never uses."
            )
        return message
