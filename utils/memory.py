"""Training memory: what a fine-tuning step keeps in memory, estimated from a config and measured on a model.

Every number here is in **bytes**. A training step holds four things:

* **weights**: every parameter (a frozen base too), in its storage dtype;
* **gradients**: one per trainable parameter, in the parameter's dtype;
* **optimizer**: the optimizer's state (Adam's two moments), plus, in mixed precision, the fp32 master copy
  of the weights (ZeRO's convention: the master copy counts as optimizer state);
* **activations**: the tensors the forward pass saves for the backward pass.

``estimate_training_memory(config, method, ...)`` computes the four from a transformers config alone (no
weights: the parameter counts come from ``utils.counting``), for full fine-tuning, LoRA and QLoRA.
``measure_training_memory(model, batch)`` measures the same four on a real model on this machine, so each
assumption of the estimate can be checked (tests/test_memory.py does, for fp32 and bf16, full and LoRA).
``zero_memory_per_gpu`` gives the model states per GPU under DeepSpeed ZeRO's stages, and
``print_memory_table`` prints several breakdowns side by side.

Chapter 07 adds one layer's activations: ``llama_layer_activation_bytes`` (the closed formula, adapted from
Korthikanti et al. 2022, ``korthikanti_layer_bytes``) and ``layer_activation_bytes`` (the op walk behind
the estimate, per layer, for any config); ``saved_tensor_bytes`` (the measuring hook, for any forward
function); and checkpointing three ways: ``enable_checkpointing`` (transformers' API under its installed
name), ``checkpoint_decoder_layers`` (by hand, per decoder layer), ``checkpointed_forward`` (a stack of blocks).

Units: ``GB`` is 10**9 bytes (the unit of GPU spec sheets and of the ZeRO and QLoRA papers' headlines),
``GiB`` is 2**30 bytes (the unit ``torch.cuda.max_memory_allocated`` readings are usually printed in);
``UNITS`` lists all the units the tables accept.
"""

from __future__ import annotations

import copy
import functools
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TypeVar

import torch
from torch import nn

from utils import counting

METHODS = ("full", "lora", "qlora")
PRECISIONS = ("fp32", "mixed", "bf16")
OPTIMIZERS = ("adamw", "adamw-8bit", "sgd", "sgd-momentum")
ATTENTIONS = ("sdpa", "eager")
COMPONENTS = ("weights", "gradients", "optimizer", "activations", "total")
UNITS = {"B": 1, "KB": 10**3, "KiB": 2**10, "MB": 10**6, "MiB": 2**20, "GB": 10**9, "GiB": 2**30}

# peft's default target_modules for the Llama-family decoders (peft.utils.constants,
# TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING: llama, mistral and qwen2 all map to q_proj, v_proj).
DEFAULT_LORA_TARGETS = ("q_proj", "v_proj")

ADAPTER_BYTES = 4  # peft keeps adapters in fp32 on a 16-bit base (autocast_adapter_dtype=True, the default)
STEP_BYTES = 4  # torch's Adam/AdamW keep a float32 scalar tensor "step" per parameter tensor
BNB_MIN_8BIT_SIZE = (
    4096  # bitsandbytes' 8-bit optimizers keep fp32 state for tensors below this many elements
)
BNB_OPTIM_BLOCK = 256  # ... and one fp32 absmax per block of 256 elements per 8-bit state
BNB_QMAP_BYTES = 2 * 256 * 4  # the two 256-entry fp32 quantization maps, shared by every tensor
NF4_BLOCK = 64  # QLoRA: one absmax per block of 64 weights
NF4_DQ_BLOCK = 256  # double quantization: the 8-bit absmaxes are quantized in blocks of 256
NF4_CODE_BYTES = 16 * 4  # the 16-entry fp32 NF4 code table, one per quantized weight
NF4_DQ_EXTRA_BYTES = 256 * 4 + 4  # with double quantization: a 256-entry fp32 code and an fp32 offset


@dataclass(frozen=True)
class TrainingMemory:
    """Bytes of one training step, by component. ``total`` is the sum of the four components.

    ``recompute`` (under gradient checkpointing) is the part of ``activations`` that exists only during the
    backward pass: one layer's activations, recomputed; ``activations - recompute`` is what the forward pass
    leaves saved. ``n_params`` / ``n_trainable`` are parameter counts (logical weights: a 4-bit weight counts
    as one parameter, not half a byte). ``peak_cuda`` is ``torch.cuda.max_memory_allocated()`` of a measured
    step on a GPU, ``None`` otherwise.
    """

    weights: int
    gradients: int
    optimizer: int
    activations: int
    n_params: int = 0
    n_trainable: int = 0
    recompute: int = 0
    peak_cuda: int | None = None

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations

    def as_dict(self) -> dict[str, int | None]:
        """All fields and ``total``, in bytes."""
        return {**asdict(self), "total": self.total}


# ---------------------------------------------------------------------------------------------- helpers


def _check_choice(value: str, name: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"Unknown {name} {value!r}: choose one of {', '.join(map(repr, choices))}.")
    return value


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return value


def _resolve_config(config):
    if isinstance(config, str):
        return counting.known_config(config)
    family = counting.model_family(config)  # raises, naming the families counting knows
    if family != "decoder":
        raise ValueError(
            f"The memory estimate models Llama-family decoders ({', '.join(counting.DECODER_TYPES)}); this "
            f"config is {config.model_type!r}. Measure such a model with measure_training_memory instead."
        )
    return config


def bytes_per_param(precision: str = "mixed", optimizer: str = "adamw") -> dict[str, float]:
    """Bytes per trainable parameter, full fine-tuning: ``{"weights", "gradients", "optimizer"}``.

    * ``"fp32"``: 4-byte weights, 4-byte gradients; AdamW's two moments in fp32 (4 + 4).
    * ``"mixed"``: the layout of the ZeRO paper (Rajbhandari et al. 2020, arXiv 1910.02054, section 3.1):
      16-bit (bf16 or fp16) weights and gradients (2 + 2), and K = 12 bytes of optimizer state: the fp32
      master copy of the weights (4) and AdamW's two fp32 moments (4 + 4); 16 in all. PyTorch's autocast
      (``torch.autocast`` with fp32 weights, what ``Trainer(bf16=True)`` does) also totals 16, split
      differently: fp32 weights (4), fp32 gradients (4), fp32 moments (8), no separate master copy (it
      casts a 16-bit copy of each weight inside the forward pass instead).
    * ``"bf16"``: pure bf16, the model cast with ``model.to(torch.bfloat16)`` and a plain torch AdamW:
      2-byte weights and gradients, and moments in the parameter's dtype, bf16 (2 + 2): 8 in all. No
      master copy, so small updates can round away: cheap, less exact.

    Optimizers: ``"adamw"`` (two moments), ``"adamw-8bit"`` (bitsandbytes: two uint8 moments, 2 bytes,
    plus an fp32 absmax per block of 256, 8/256 bytes; this table ignores the fp32 fallback for small tensors,
    which ``estimate_training_memory`` applies), ``"sgd"`` (no state), ``"sgd-momentum"`` (one buffer). The
    mixed-precision master copy is kept whatever the optimizer. Torch's 4-byte ``step`` counter per tensor is
    per tensor, not per parameter, so it is not here.
    """
    _check_choice(precision, "precision", PRECISIONS)
    _check_choice(optimizer, "optimizer", OPTIMIZERS)
    weight = 4 if precision == "fp32" else 2
    state = 2 if precision == "bf16" else 4  # dtype of the tensor the optimizer updates
    master = 4 if precision == "mixed" else 0
    moments = {
        "adamw": 2 * state,
        "adamw-8bit": 2 + 2 * 4 / BNB_OPTIM_BLOCK,
        "sgd": 0,
        "sgd-momentum": state,
    }[optimizer]
    return {"weights": weight, "gradients": weight, "optimizer": master + moments}


def _optimizer_tensor_bytes(numel: int, state_bytes: int, optimizer: str) -> int:
    """Optimizer state of one parameter tensor of ``numel`` elements whose updated copy has ``state_bytes``."""
    if optimizer == "adamw":
        return 2 * numel * state_bytes + STEP_BYTES
    if optimizer == "adamw-8bit":
        if numel < BNB_MIN_8BIT_SIZE:
            return 2 * numel * 4  # bitsandbytes keeps fp32 moments for small tensors, whatever the dtype
        return 2 * numel + 2 * 4 * math.ceil(numel / BNB_OPTIM_BLOCK)
    if optimizer == "sgd-momentum":
        return numel * state_bytes
    return 0


def _nf4_bytes(numel: int, double_quant: bool) -> int:
    """A weight in bitsandbytes' 4-bit NF4: two weights per byte, plus its quantization constants.

    QLoRA (Dettmers et al. 2023, arXiv 2305.14314, section 3): one absmax per block of 64 weights; in fp32
    that is 32/64 = 0.5 bits per parameter; with double quantization the absmaxes are stored in 8 bits with
    one fp32 absmax per 256 of them: 8/64 + 32/(64 * 256) = 0.127 bits per parameter. Plus the per-weight
    code tables bitsandbytes stores (16 fp32 NF4 values; with double quantization also a 256-entry fp32 code
    and an fp32 offset)."""
    blocks = math.ceil(numel / NF4_BLOCK)
    if double_quant:
        return (
            (numel + 1) // 2
            + blocks
            + 4 * math.ceil(blocks / NF4_DQ_BLOCK)
            + NF4_CODE_BYTES
            + NF4_DQ_EXTRA_BYTES
        )
    return (numel + 1) // 2 + 4 * blocks + NF4_CODE_BYTES


class _Param:
    """One parameter tensor of a decoder: its numel and whether bitsandbytes would quantize it."""

    __slots__ = ("name", "numel", "quantizable")

    def __init__(self, name: str, numel: int, quantizable: bool) -> None:
        self.name, self.numel, self.quantizable = name, numel, quantizable


def _decoder_params(config) -> list[_Param]:
    """Every parameter tensor of a Llama-family causal LM (a tied head once), as ``model.parameters()``."""
    d = config.hidden_size
    out = [_Param("model.embed_tokens.weight", config.vocab_size * d, False)]
    for spec in counting.linear_layers(config, "causal-lm"):
        if spec.tied:
            continue
        # bitsandbytes quantizes nn.Linear layers; transformers keeps the output head (lm_head) unquantized
        quantizable = spec.name != "lm_head"
        out.append(_Param(spec.name + ".weight", spec.d_in * spec.d_out, quantizable))
        if spec.bias:
            out.append(_Param(spec.name + ".bias", spec.d_out, False))
    norms = [f"model.layers.{i}.{n}.weight" for i in range(config.num_hidden_layers)
             for n in ("input_layernorm", "post_attention_layernorm")] + ["model.norm.weight"]  # fmt: skip
    out += [_Param(n, d, False) for n in norms]
    return out


# ------------------------------------------------------------------------------------------ activations


class _Dims:
    def __init__(self, config, batch_size: int, seq_len: int) -> None:
        self.L = config.num_hidden_layers
        self.H, self.I, self.V = config.hidden_size, config.intermediate_size, config.vocab_size
        self.nh = config.num_attention_heads
        self.nkv = getattr(config, "num_key_value_heads", None) or self.nh
        self.hd = getattr(config, "head_dim", None) or self.H // self.nh
        self.q, self.kv = self.nh * self.hd, self.nkv * self.hd
        self.B, self.T = batch_size, seq_len
        self.N = batch_size * seq_len  # tokens


def _activation_bytes(
    dims: _Dims,
    s: int,
    *,
    full: bool,
    adapted: list[set[str]],
    rank: int,
    attention: str,
    checkpointing: bool,
) -> tuple[int, int, list[int]]:
    """``(saved by the forward pass, recomputed one layer, each layer's own bytes)``; see
    ``estimate_training_memory``.

    Walks a Llama decoder layer op by op and applies autograd's rule: an op saves an input only when a
    gradient it must compute needs it (a frozen weight's input is not saved; an input that does not require
    grad makes the ops on it unrecorded). ``s`` is the bytes of the model's dtype; ``adapted[i]`` the leaf
    names with a LoRA adapter in layer i."""
    N, H = dims.N, dims.H
    cast = s != ADAPTER_BYTES  # peft casts each adapted layer's input to the fp32 adapter dtype: a copy

    def norm(rg: bool, trainable: bool) -> tuple[int, bool]:
        # RMSNorm: x.to(fp32) (x itself in fp32), pow and rsqrt save the fp32 x and rsqrt(var) (N x 1);
        # weight * h saves h (model dtype) when the weight is trained
        b = (4 * N * H + 4 * N if rg else 0) + (s * N * H if trainable else 0)
        return b, rg or trainable

    def linears(
        rg_in: bool, d_in: int, leaves: list[str], lora: set[str], input_saved: bool
    ) -> tuple[int, bool]:
        # nn.Linear saves its input for the weight's gradient; LoRA's lora_A saves the input (an fp32 copy
        # per adapter on a 16-bit base), lora_B saves A x (N x rank, fp32)
        b = 0
        keep_input = full or (any(leaf in lora for leaf in leaves) and not cast)
        if keep_input and not input_saved:
            b += s * N * d_in
        for leaf in leaves:
            if leaf in lora:
                b += ADAPTER_BYTES * N * rank + (ADAPTER_BYTES * N * d_in if cast else 0)
        return b, rg_in or full or any(leaf in lora for leaf in leaves)

    def layer(rg_x: bool, lora: set[str]) -> tuple[int, bool, bool]:
        b, rg = norm(rg_x, full)
        qkv_b, _ = linears(rg, H, ["q_proj", "k_proj", "v_proj"], lora, False)
        b += qkv_b
        rg_q, rg_k, rg_v = (rg or full or p in lora for p in ("q_proj", "k_proj", "v_proj"))
        rope = rg_q or rg_k
        attn_rg = rg_q or rg_k or rg_v
        sdpa = attention == "sdpa"
        if attn_rg and sdpa:
            # SDPA's fused kernels save q, k, v, the output and the fp32 logsumexp (B x heads x T); the
            # output's layout is already the one o_proj reads, so o_proj's saved input is the same storage
            b += s * N * (2 * dims.q + 2 * dims.kv) + 4 * dims.B * dims.nh * dims.T
        elif attn_rg:
            # eager: q @ k^T saves each factor when the other requires grad; the fp32 softmax saves its output
            # and, in 16-bit, probs @ v saves the 16-bit copy (in fp32 the same tensor) when v requires grad
            # and v when the probabilities do (B x heads x T x T each). Under GQA repeat_kv makes k and v full
            # width copies. o_proj's input is a new tensor
            kv = dims.q if dims.nkv != dims.nh else dims.kv
            rg_p = rg_q or rg_k
            square = dims.B * dims.nh * dims.T * dims.T
            b += s * N * (dims.q * rg_k + kv * rg_q + kv * rg_p)
            if s == 4:
                b += 4 * square if rg_p or rg_v else 0
            else:
                b += (4 * square if rg_p else 0) + (s * square if rg_v else 0)
        o_b, rg_o = linears(attn_rg, dims.q, ["o_proj"], lora, attn_rg and sdpa)
        b += o_b
        rg_h1 = rg_x or rg_o
        n2_b, rg_n2 = norm(rg_h1, full)
        b += n2_b
        gu_b, _ = linears(rg_n2, H, ["gate_proj", "up_proj"], lora, False)
        b += gu_b
        rg_g = rg_n2 or full or "gate_proj" in lora
        rg_u = rg_n2 or full or "up_proj" in lora
        # silu saves g; silu(g) * u saves silu(g) when u requires grad and u when silu(g) does
        b += s * N * dims.I * (int(rg_g) + int(rg_u) + int(rg_g))
        down_b, rg_d = linears(rg_g or rg_u, dims.I, ["down_proj"], lora, False)
        b += down_b
        return b, rg_h1 or rg_d, rope

    rg = full  # the embedding's output requires grad only when the embedding is trained
    saved = 8 * dims.N if full else 0  # the embedding's backward keeps the input ids (int64)
    rope_saved = False
    per_layer = []
    for i in range(dims.L):
        b, rg_next, rope = layer(rg, adapted[i])
        per_layer.append(b)
        rope_saved = rope_saved or rope
        saved += s * N * H if checkpointing else b  # checkpointing keeps only each layer's input
        rg = rg_next
    if rope_saved and not checkpointing:
        saved += 2 * s * dims.T * dims.hd  # cos and sin (1 x T x head_dim), shared by every layer
    head_b, _ = norm(rg, full)
    if full:  # lm_head (or the tied embedding) is trained: it saves the normed hidden states
        head_b += s * N * H
    # the loss upcasts the logits to fp32; log_softmax saves its fp32 output (N x V), nll_loss the shifted
    # labels (int64) and a scalar
    head_b += 4 * N * dims.V + 8 * N + 4
    saved += head_b
    recompute = 0
    if checkpointing:
        recompute = max(per_layer) + (2 * s * dims.T * dims.hd if rope_saved else 0)
    return saved, recompute, per_layer


# ---------------------------------------------------------------------------------------------- estimate


def estimate_training_memory(
    config,
    method: str,
    *,
    rank: int = 8,
    target_modules: str | Sequence[str] | None = None,
    batch_size: int = 1,
    seq_len: int = 512,
    precision: str = "mixed",
    optimizer: str = "adamw",
    gradient_checkpointing: bool = False,
    double_quant: bool = True,
    attention: str = "sdpa",
) -> TrainingMemory:
    """Bytes of one training step of the causal LM ``config`` describes (a config, or a name from
    ``utils.counting.KNOWN_CONFIGS``), from the config alone.

    ``method``: ``"full"`` (every parameter trained), ``"lora"`` or ``"qlora"`` (rank-``rank`` adapters on
    ``target_modules``, default peft's ``["q_proj", "v_proj"]``; ``"all-linear"`` and regular expressions
    work as in peft). Families: Llama, Mistral, Qwen2 (the Llama-family decoders of ``utils.counting``).

    **Weights, gradients, optimizer** (exact for the layouts below; ``bytes_per_param`` lists them):

    * ``precision="fp32"``: fp32 everything. ``"mixed"``: ZeRO's mixed-precision layout, 16-bit weights and
      gradients, fp32 master copy and moments (2 + 2 + 12 bytes per parameter; PyTorch autocast splits the
      same 16 as 4 + 4 + 8). ``"bf16"``: pure bf16, moments in bf16 (2 + 2 + 4).
    * ``"full"``: every parameter at those rates; torch's AdamW adds a 4-byte ``step`` per tensor.
    * ``"lora"``: the frozen base in the working dtype (fp32 for ``"fp32"``, 16-bit otherwise), no
      gradient or state for it. Adapters ``rank * (d_in + d_out)`` per targeted layer, kept in fp32 (peft's
      ``autocast_adapter_dtype=True`` upcasts adapters on a 16-bit base): fp32 weights, gradients and
      moments, no master copy (4 + 4 + 8).
    * ``"qlora"``: the base's linear layers in 4-bit NF4 (0.5 byte per parameter) plus quantization
      constants (``double_quant=True``: 0.127 bits per parameter; ``False``: 0.5 bits; QLoRA paper, arXiv
      2305.14314); the embedding, the norms, the biases and the LM head unquantized, in the working dtype
      (bitsandbytes replaces only ``nn.Linear`` layers and transformers skips ``lm_head``). Note that peft's
      ``prepare_model_for_kbit_training`` upcasts those unquantized parameters to fp32: estimate that with
      ``precision="fp32"``. Adapters as for LoRA.
    * ``optimizer``: ``"adamw"`` (torch), ``"adamw-8bit"`` (bitsandbytes: uint8 moments and an fp32 absmax
      per 256 elements, fp32 moments for tensors under 4,096 elements, 2 KB of shared maps),
      ``"sgd"`` (no state), ``"sgd-momentum"`` (one buffer in the updated tensor's dtype).

    **Activations**: the tensors autograd saves for the backward pass, counted by walking a Llama layer op by
    op as transformers computes it (SDPA attention, no dropout). The model is in fp32 (``"fp32"``) or in 16-bit
    (``"mixed"``, ``"bf16"``: ZeRO's 16-bit working weights; an autocast run saves other tensors). The source
    is Korthikanti et al. 2022 (arXiv 2205.05198, section 4.1): ``34 s b h + 5 a s^2 b`` bytes per GPT layer in
    16-bit with dropout. Adapted to a Llama layer (RMSNorm, SwiGLU MLP of width I, no dropout, SDPA, which
    keeps a logsumexp instead of the ``a s^2 b`` attention matrix), full fine-tuning, N = b s tokens:

    * fp32: ``(10 N H + 4 N I) * 4`` bytes per layer, i.e. ``40 N H + 16 N I``;
    * 16-bit: ``24 N H + 8 N I`` (each RMSNorm upcasts its input to fp32, and that fp32 copy is saved);

    plus ``8 N`` (two rsqrt) and ``4 b a s`` (logsumexp) per layer; with grouped-query attention k and v are
    ``n_kv_heads * head_dim`` wide instead of H. The head adds the final norm and ``4 N V`` (the loss's fp32
    log-softmax) + ``8 N`` (labels). With LoRA a frozen layer saves less (a frozen weight's input is not kept,
    a frozen norm keeps no normalized copy, nothing before the first adapter is recorded), each adapter adds
    ``4 N r`` and, on a 16-bit base, an fp32 copy of its input (``4 N d_in``: peft casts the input to the
    adapter's dtype). ``attention="eager"`` (``attn_implementation="eager"``) brings back the ``s^2`` terms:
    the fp32 softmax, ``4 b a s^2`` per layer (16-bit: also its 16-bit copy, ``6 b a s^2`` in all) instead of
    the logsumexp. Checked against ``measure_training_memory`` on this stack (torch 2.13, transformers 5.23,
    peft 0.21, bitsandbytes 0.50, on CPU): equal to the byte for fp32 and bf16, full fine-tuning and LoRA
    (peft, and ``utils.lora`` in fp32), SDPA and eager, grouped-query attention, biases (Qwen2), with and
    without checkpointing, QLoRA in fp32; tests/test_memory.py allows 10% on activations (other kernels,
    e.g. CUDA's flash attention, save slightly different tensors) and none on the rest.
    ``gradient_checkpointing=True``: the forward pass keeps only each layer's input (``N H`` per layer) and
    the head; during the backward pass one layer is recomputed, and its activations (``recompute``) are
    included in ``activations``.

    Not included: the logits the model's output holds (``N V`` in the model dtype, alive while a loop keeps
    ``outputs``; ``Trainer`` drops them before ``backward``), the gradient of the logits during backward, a
    padding mask (on CPU, SDPA with a padded batch keeps a ``b s^2`` mask copy per layer), temporary buffers,
    the CUDA context and allocator slack (often 0.5-1 GB on a GPU). ``total`` sums the four components: an upper
    bound of the step's peak, since activations are freed during the backward pass while gradients fill in.
    ``seq_len`` above ``config.max_position_embeddings`` warns (the arithmetic holds, the model was not trained
    that long).
    """
    _check_choice(method, "method", METHODS)
    _check_choice(precision, "precision", PRECISIONS)
    _check_choice(optimizer, "optimizer", OPTIMIZERS)
    _check_choice(attention, "attention", ATTENTIONS)
    batch_size = _positive_int(batch_size, "batch_size")
    seq_len = _positive_int(seq_len, "seq_len")
    if method != "full":
        rank = _positive_int(rank, "rank")
    config = _resolve_config(config)
    max_pos = getattr(config, "max_position_embeddings", None)
    if max_pos is not None and seq_len > max_pos:
        warnings.warn(
            f"seq_len={seq_len} is above this model's max_position_embeddings={max_pos}: the memory "
            "arithmetic holds, but the model was not trained on sequences that long.",
            stacklevel=2,
        )
    s = 4 if precision == "fp32" else 2
    params = _decoder_params(config)
    n_params = sum(p.numel for p in params)
    full = method == "full"
    adapted: list[set[str]] = [set() for _ in range(config.num_hidden_layers)]
    if full:
        trainable = [p.numel for p in params]
        weights, gradients = s * n_params, s * n_params
        state_bytes = 4 if precision == "mixed" else s
        master = 4 * n_params if precision == "mixed" else 0
    else:
        targets = counting.lora_targets(config, target_modules or list(DEFAULT_LORA_TARGETS), "causal-lm")
        trainable = []
        for spec in targets:
            trainable += [rank * spec.d_in, spec.d_out * rank]  # lora_A (r x d_in), lora_B (d_out x r)
            parts = spec.name.split(".")
            if "layers" in parts:
                adapted[int(parts[parts.index("layers") + 1])].add(parts[-1])
        n_adapter = sum(trainable)
        if method == "lora":
            base = s * n_params
        else:
            base = sum(_nf4_bytes(p.numel, double_quant) if p.quantizable else s * p.numel for p in params)
        weights = base + ADAPTER_BYTES * n_adapter
        gradients = ADAPTER_BYTES * n_adapter
        state_bytes, master = ADAPTER_BYTES, 0
        n_params += n_adapter
    opt = master + sum(_optimizer_tensor_bytes(n, state_bytes, optimizer) for n in trainable)
    if optimizer == "adamw-8bit" and any(n >= BNB_MIN_8BIT_SIZE for n in trainable):
        opt += BNB_QMAP_BYTES
    activations, recompute, _ = _activation_bytes(
        _Dims(config, batch_size, seq_len),
        s,
        full=full,
        adapted=adapted,
        rank=rank,
        attention=attention,
        checkpointing=gradient_checkpointing,
    )
    return TrainingMemory(
        weights=weights,
        gradients=gradients,
        optimizer=opt,
        activations=activations + recompute,
        n_params=n_params,
        n_trainable=sum(trainable),
        recompute=recompute,
    )


# ------------------------------------------------------------------------------------------- measurement


def _storage_key(t: torch.Tensor) -> tuple[int, int] | None:
    try:
        storage = t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # tensors without a storage of their own
        return None
    if t.device.type == "meta" or storage.nbytes() == 0:
        return None
    return storage.data_ptr(), storage.nbytes()


def _unique_bytes(tensors, exclude: set[int] = frozenset()) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        key = _storage_key(t)
        if key is not None and key[0] not in exclude:
            seen[key[0]] = key[1]
    return sum(seen.values())


def _quant_state_tensors(p: torch.Tensor) -> list[torch.Tensor]:
    """The tensors bitsandbytes keeps beside a 4-bit weight (absmax, code, offset, nested state)."""
    out, stack = [], [getattr(p, "quant_state", None)]
    while stack:
        state = stack.pop()
        if state is None:
            continue
        for value in vars(state).values():
            if torch.is_tensor(value):
                out.append(value)
            elif hasattr(value, "absmax"):  # the nested state of double quantization
                stack.append(value)
    return out


def _logical_numel(p: torch.Tensor) -> int:
    state = getattr(p, "quant_state", None)
    shape = getattr(state, "shape", None)
    return math.prod(shape) if shape is not None else p.numel()


def _state_tensors(state) -> list[torch.Tensor]:
    if torch.is_tensor(state):
        return [state]
    if isinstance(state, Mapping):
        return [t for v in state.values() for t in _state_tensors(v)]
    if isinstance(state, list | tuple):
        return [t for v in state for t in _state_tensors(v)]
    return []


def measure_training_memory(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor] | torch.Tensor,
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
    *,
    inplace: bool = False,
    **optimizer_kwargs,
) -> TrainingMemory:
    """Measure one training step of ``model`` on ``batch``: the breakdown of ``estimate_training_memory``.

    ``batch``: keyword arguments of the model (``input_ids``, optional ``attention_mask``, ``labels``;
    without labels the inputs are the labels), or a tensor of input ids. The step runs in train mode:
    forward, ``loss.backward()``, one ``optimizer_cls(trainable parameters, **optimizer_kwargs).step()``.

    * ``weights``: bytes of every parameter's storage, each storage once (tied weights once), plus the
      quantization constants of bitsandbytes 4-bit weights;
    * ``gradients``: bytes of the ``.grad`` tensors after ``backward()``;
    * ``optimizer``: bytes of the tensors in ``optimizer.state`` after one ``step()``, each storage once;
    * ``activations``: bytes of the tensors autograd saves for backward during the forward pass, caught with
      ``torch.autograd.graph.saved_tensors_hooks``, each storage once, parameters excluded. A view saved
      counts its whole storage (that is what stays allocated). Under non-reentrant checkpointing the
      recomputed tensors are saved inside the backward pass and not seen here (``recompute`` is 0).
    * ``peak_cuda``: on a GPU, ``torch.cuda.max_memory_allocated()`` over the step (on CPU ``None``; the CPU
      has no such counter: torch's CPU allocator is not tracked).

    By default the step runs on a deep copy, so ``model`` is left exactly as it was (it costs the model's
    size in memory once more, and on a GPU the copy is part of ``peak_cuda``). ``inplace=True`` measures
    ``model`` itself: it is then changed by one optimizer step and its gradients are reset to ``None``.
    """
    if not inplace:
        model = copy.deepcopy(model)
    params = list(model.parameters())
    if not params:
        raise ValueError("This model has no parameters to measure.")
    trainable = [p for p in params if p.requires_grad]
    if not trainable:
        raise ValueError("No parameter of this model requires grad: there is nothing to train.")
    device = params[0].device
    if isinstance(batch, torch.Tensor):
        batch = {"input_ids": batch}
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    if "labels" not in batch:
        if "input_ids" not in batch:
            raise ValueError("The batch needs input_ids (or labels): the loss is computed from them.")
        batch["labels"] = batch["input_ids"]
    param_ptrs = {k[0] for p in params if (k := _storage_key(p)) is not None}
    weights = _unique_bytes([*params, *(t for p in params for t in _quant_state_tensors(p))])
    was_training = model.training
    model.train()
    for p in params:
        p.grad = None
    optimizer = optimizer_cls(trainable, **optimizer_kwargs)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    out, saved_bytes = saved_tensor_bytes(lambda: model(**batch), exclude=params)
    loss = out.loss if hasattr(out, "loss") else out[0]
    loss.backward()
    gradients = _unique_bytes([p.grad for p in trainable if p.grad is not None])
    optimizer.step()
    state = _unique_bytes(_state_tensors(list(optimizer.state.values())), exclude=param_ptrs)
    peak = None
    if cuda:
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    del out, loss
    if inplace:
        for p in params:
            p.grad = None
        model.train(was_training)
    return TrainingMemory(
        weights=weights,
        gradients=gradients,
        optimizer=state,
        activations=saved_bytes,
        n_params=sum(_logical_numel(p) for p in params),
        n_trainable=sum(_logical_numel(p) for p in trainable),
        peak_cuda=peak,
    )


# ------------------------------------------------------------------------------------------------ tables


def _unit(unit: str) -> int:
    if unit not in UNITS:
        raise ValueError(f"Unknown unit {unit!r}: choose one of {', '.join(UNITS)}.")
    return UNITS[unit]


def memory_table(rows: Mapping[str, TrainingMemory], unit: str = "GB", digits: int = 2) -> str:
    """Several breakdowns side by side, one row each (weights, gradients, optimizer, activations, total),
    in ``unit`` (default ``"GB"`` = 10**9 bytes; ``"GiB"`` = 2**30; see ``UNITS``), as a Markdown table."""
    scale = _unit(unit)
    if not rows:
        raise ValueError("memory_table needs at least one row, e.g. {'full': estimate_training_memory(...)}.")
    width = max(len("method"), *(len(name) for name in rows))
    titles = [f"{c} ({unit})" for c in COMPONENTS]
    lines = [
        f"| {'method':<{width}} | " + " | ".join(titles) + " |",
        f"|{'-' * (width + 2)}|" + "|".join("-" * (len(t) + 1) + ":" for t in titles) + "|",
    ]
    for name, m in rows.items():
        cells = [
            f"{getattr(m, c) / scale:>{len(t)}.{digits}f}" for c, t in zip(COMPONENTS, titles, strict=True)
        ]
        lines.append(f"| {name:<{width}} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def print_memory_table(rows: Mapping[str, TrainingMemory], unit: str = "GB", digits: int = 2) -> None:
    """Print ``memory_table(rows, unit, digits)``."""
    print(memory_table(rows, unit, digits))


def comparison_table(
    estimate: TrainingMemory, measured: TrainingMemory, unit: str = "MiB", digits: int = 2
) -> str:
    """Estimate against measurement, component by component, with the ratio estimate / measured."""
    scale = _unit(unit)
    lines = [
        f"| component | estimate ({unit}) | measured ({unit}) | estimate / measured |",
        "|---|---:|---:|---:|",
    ]
    for c in COMPONENTS:
        e, m = getattr(estimate, c), getattr(measured, c)
        ratio = f"{e / m:.3f}" if m else ("1.000" if e == 0 else "inf")
        lines.append(f"| {c} | {e / scale:.{digits}f} | {m / scale:.{digits}f} | {ratio} |")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------- ZeRO

ZERO_STAGES = (0, 1, 2, 3)


def zero_memory_per_gpu(n_params: int, n_gpus: int, stage: int, optimizer_bytes: int = 12) -> int:
    """Bytes of model states per GPU under DeepSpeed ZeRO, mixed-precision Adam (ZeRO paper, arXiv
    1910.02054, section 5 and figure 1): with P = ``n_params``, N = ``n_gpus`` and K = ``optimizer_bytes``
    (12: fp32 master copy and two fp32 moments),

    * stage 0 (plain data parallelism, every GPU holds everything): (2 + 2 + K) P = 16 P;
    * stage 1 (optimizer states sharded): 2 P + 2 P + K P / N;
    * stage 2 (and gradients): 2 P + (2 + K) P / N;
    * stage 3 (and parameters): (2 + 2 + K) P / N.

    Activations, buffers and fragmentation come on top. The paper's example, 7.5 B parameters on 64 GPUs:
    120 GB, 31.4 GB, 16.6 GB, 1.9 GB.
    """
    n_params = _positive_int(n_params, "n_params")
    n_gpus = _positive_int(n_gpus, "n_gpus")
    if stage not in ZERO_STAGES:
        raise ValueError(f"Unknown ZeRO stage {stage!r}: choose one of 0, 1, 2, 3 (0 = plain data parallel).")
    k = optimizer_bytes
    p = n_params
    per_gpu = {
        0: (2 + 2 + k) * p,
        1: 2 * p + 2 * p + k * p / n_gpus,
        2: 2 * p + (2 + k) * p / n_gpus,
        3: (2 + 2 + k) * p / n_gpus,
    }[stage]
    return round(per_gpu)


# ------------------------------------------------------------------- one layer's activations (chapter 07)


def korthikanti_layer_bytes(batch_size: int, seq_len: int, hidden_size: int, n_heads: int) -> int:
    """Activation bytes of one GPT transformer layer in 16-bit, with dropout, no recomputation: Korthikanti
    et al. 2022 (arXiv 2205.05198, section 4.1, equation 1): ``s b h (34 + 5 a s / h)`` = ``34 s b h +
    5 a s^2 b``. ``34 s b h``: the two LayerNorm inputs (2 + 2), the QKV input (2), q and k (4), v (2), the
    attention output projection's input (2), two dropout masks (1 + 1), the MLP input (2), the GeLU's input
    and output (8 + 8, width 4h); ``5 a s^2 b``: the softmax output (2), its dropout mask (1) and the
    dropped-out scores (2). ``llama_layer_activation_bytes`` is the same count for a Llama layer."""
    b, s, h, a = (_positive_int(v, n) for v, n in ((batch_size, "batch_size"), (seq_len, "seq_len"),
                                                   (hidden_size, "hidden_size"), (n_heads, "n_heads")))  # fmt: skip
    return 34 * s * b * h + 5 * a * s * s * b


def llama_layer_activation_bytes(
    batch_size: int,
    seq_len: int,
    hidden_size: int,
    intermediate_size: int,
    n_heads: int,
    bytes_per_value: int = 4,
) -> int:
    """Bytes one Llama decoder layer saves for backward, full fine-tuning, SDPA attention, no dropout,
    multi-head attention (as many key/value heads as query heads); ``bytes_per_value`` 4 (fp32) or 2
    (a 16-bit model). With N = b s tokens, H the hidden size, I the MLP width, a heads, s_v the value bytes:

        per RMSNorm (two):    4 N H (its input, upcast to fp32) + 4 N (fp32 rsqrt) + s_v N H (normalized,
                              for the norm weight's gradient) + s_v N H (the output, the next linears' input)
        attention (SDPA):     s_v N H x 4 (q after RoPE, k after RoPE, v, the output = o_proj's input)
                              + 4 b a s (fp32 logsumexp; no s^2 matrix, it is recomputed in backward)
        SwiGLU MLP:           s_v N I x 4 (gate, up, silu(gate), silu(gate) * up = down_proj's input)

    In all ``(8 + 8 s_v) N H + 4 s_v N I + 8 N + 4 b a s``: fp32 ``40 N H + 16 N I + ...``, 16-bit ``24 N H
    + 8 N I + ...``. Against Korthikanti et al.'s GPT layer (``korthikanti_layer_bytes``): no dropout masks,
    no s^2 terms under SDPA (eager attention brings back the fp32 softmax, ``4 b a s^2``), RMSNorm's fp32
    upcast, and an MLP of three matrices of width I instead of two of width 4H. Equal to the op-by-op walk of
    ``layer_activation_bytes`` (and so to the measurement) for these layers."""
    b, s = _positive_int(batch_size, "batch_size"), _positive_int(seq_len, "seq_len")
    h, i = _positive_int(hidden_size, "hidden_size"), _positive_int(intermediate_size, "intermediate_size")
    a = _positive_int(n_heads, "n_heads")
    if bytes_per_value not in (2, 4):
        raise ValueError(f"bytes_per_value must be 4 (fp32) or 2 (bf16/fp16), got {bytes_per_value!r}.")
    n, v = b * s, bytes_per_value
    return (8 + 8 * v) * n * h + 4 * v * n * i + 8 * n + 4 * b * a * s


def layer_activation_bytes(
    config,
    *,
    batch_size: int = 1,
    seq_len: int = 512,
    precision: str = "fp32",
    attention: str = "sdpa",
    method: str = "full",
    rank: int = 8,
    target_modules: str | Sequence[str] | None = None,
) -> list[int]:
    """Bytes each decoder layer of ``config`` saves for backward (one entry per layer), from the same op walk
    as ``estimate_training_memory`` (so grouped-query attention, eager attention, LoRA and 16-bit are
    covered). The whole step's ``activations`` add the embedding's ids, RoPE's cos/sin and the head (the
    final norm and the loss's fp32 log-softmax, ``4 N V``)."""
    _check_choice(method, "method", METHODS)
    _check_choice(precision, "precision", PRECISIONS)
    _check_choice(attention, "attention", ATTENTIONS)
    config = _resolve_config(config)
    dims = _Dims(config, _positive_int(batch_size, "batch_size"), _positive_int(seq_len, "seq_len"))
    adapted: list[set[str]] = [set() for _ in range(config.num_hidden_layers)]
    if method != "full":
        targets = counting.lora_targets(config, target_modules or list(DEFAULT_LORA_TARGETS), "causal-lm")
        for spec in targets:
            parts = spec.name.split(".")
            if "layers" in parts:
                adapted[int(parts[parts.index("layers") + 1])].add(parts[-1])
    s = 4 if precision == "fp32" else 2
    _, _, per_layer = _activation_bytes(dims, s, full=method == "full", adapted=adapted,
                                        rank=_positive_int(rank, "rank"), attention=attention, checkpointing=False)  # fmt: skip
    return per_layer


T = TypeVar("T")


def saved_tensor_bytes(fn: Callable[[], T], exclude: Iterable[torch.Tensor] = ()) -> tuple[T, int]:
    """Run ``fn()`` and count the bytes of the tensors autograd saves for the backward pass meanwhile:
    ``(fn's result, bytes)``. Caught with ``torch.autograd.graph.saved_tensors_hooks``, each storage counted
    once (a saved view counts its whole storage: that is what stays allocated), the storages of ``exclude``
    (pass the model's parameters: they exist anyway) left out. Under non-reentrant checkpointing only what
    the forward pass keeps is seen (the recomputation happens inside backward)."""
    skip = {k[0] for t in exclude if (k := _storage_key(t)) is not None}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key is not None and key[0] not in skip:
            saved[key[0]] = key[1]
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return result, sum(saved.values())


# ------------------------------------------------------------------------------ checkpointing (chapter 07)


def checkpointed_forward(
    blocks: Iterable[Callable[[torch.Tensor], torch.Tensor]], x: torch.Tensor, use_reentrant: bool = False
) -> torch.Tensor:
    """``x`` through ``blocks`` in order, each block under ``torch.utils.checkpoint.checkpoint``: the forward
    pass keeps only each block's input; backward recomputes the block's forward from it (about one extra
    forward in all). ``use_reentrant=False`` (the recommended mode): gradients reach the block's parameters
    even when ``x`` does not require grad (a frozen embedding's output), and keyword arguments work."""
    from torch.utils.checkpoint import checkpoint

    for block in blocks:
        x = checkpoint(block, x, use_reentrant=use_reentrant)
    return x


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    from utils.models import layer_stack

    stack = layer_stack(model)
    if stack is None:
        raise ValueError(
            f"Found no decoder layers (model.layers) in {type(model).__name__}: wrap its blocks yourself with "
            "utils.memory.checkpointed_forward (torch.utils.checkpoint)."
        )
    return stack


def checkpoint_decoder_layers(model: nn.Module, use_reentrant: bool = False) -> int:
    """Checkpoint every decoder layer of ``model`` by hand: each layer's ``forward`` is replaced by one that
    runs it under ``torch.utils.checkpoint.checkpoint``. Returns the number of layers wrapped. The manual
    version of ``enable_checkpointing``; unlike transformers' API it does not make the embedding's output
    require grad (that is the LoRA trap of chapter 07 under ``use_reentrant=True``)."""
    from torch.utils.checkpoint import checkpoint

    layers = _decoder_layers(model)
    for layer in layers:
        forward = layer.forward

        def run(*args, _forward=forward, **kwargs):
            if (
                use_reentrant
            ):  # the reentrant mode takes no keyword arguments: bind them (as transformers does)
                return checkpoint(functools.partial(_forward, **kwargs), *args, use_reentrant=True)
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        layer.forward = run
    return len(layers)


def enable_checkpointing(model: nn.Module, use_reentrant: bool = False, every_n_layers: int = 1) -> None:
    """Turn on transformers' checkpointing with the name the installed version has: transformers 5.23's
    ``activation_checkpointing_enable(activation_checkpointing_kwargs=...)``, else the older
    ``gradient_checkpointing_enable(gradient_checkpointing_kwargs=...)`` (5.23 still has it and warns). A model
    that does not support it raises a ``ValueError`` saying what to do instead."""
    every_n_layers = _positive_int(every_n_layers, "every_n_layers")
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"{type(model).__name__} does not support transformers' gradient checkpointing (it is not a "
            "transformers model, or its class sets supports_gradient_checkpointing = False): wrap its blocks "
            "with utils.memory.checkpointed_forward (torch.utils.checkpoint) instead."
        )
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs=kwargs, every_n_layers=every_n_layers
        )
    else:  # transformers < 5.23
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
