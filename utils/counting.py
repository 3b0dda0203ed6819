"""Parameter counts in closed form, from a transformers config alone (no weights, no download).

Every linear layer of a model is listed with its real module name, its shape and whether it has a bias
(``linear_layers``); everything else (embeddings, norms) is counted by ``other_params``. Then

* ``count_params(config)`` = linear weights and biases + the rest; a tied LM head counts once;
* ``count_lora_params(config, rank, targets)`` = sum of ``rank * (d_in + d_out)`` over the linear layers
  whose names match ``targets`` by peft's rule,

and both equal what a real model built on the meta device reports, and what peft's
``get_nb_trainable_parameters()`` reports (tests/test_counting.py asserts it). Families: Llama, Mistral and
Qwen2 (the same decoder; Qwen2 adds q/k/v biases), GPT-2 (``Conv1D`` layers ``c_attn``, ``c_proj``,
``c_fc``; biases, LayerNorms, learned positions) and BERT (biases, LayerNorms, position and token-type
embeddings, pooler).

``task`` picks the model class the count is for, like peft's ``task_type``:

* ``"causal-lm"`` (decoders' default): ``AutoModelForCausalLM``, names under ``model.`` / ``transformer.``
  plus ``lm_head``;
* ``"seq-cls"``: ``AutoModelForSequenceClassification`` (``score`` for decoders, pooler + ``classifier``
  for BERT), ``config.num_labels`` outputs;
* ``"base"`` (BERT's default): the bare model (``AutoModel``), no head.

A note on 4-bit models (chapter 05): bitsandbytes stores two 4-bit weights per byte, so a quantized
weight's ``numel()`` is half its true count; peft's ``print_trainable_parameters`` multiplies it back by
2 (times the storage's bytes per element). The counts here are of the logical weights, as in the config.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import NamedTuple

from utils.lora import target_matches

DECODER_TYPES = ("llama", "mistral", "qwen2")
TASKS = ("causal-lm", "seq-cls", "base")
SEQ_CLS_HEADS = ("classifier", "score")  # peft adds these to modules_to_save for task_type="SEQ_CLS"


class LinearSpec(NamedTuple):
    """One linear layer: its module name, ``d_in``, ``d_out``, bias, and whether its weight is tied to
    the input embedding (a tied LM head owns no parameters of its own)."""

    name: str
    d_in: int
    d_out: int
    bias: bool
    tied: bool = False

    @property
    def n_params(self) -> int:
        return 0 if self.tied else self.d_in * self.d_out + (self.d_out if self.bias else 0)


def model_family(config) -> str:
    """``"decoder"`` (Llama / Mistral / Qwen2), ``"gpt2"`` or ``"bert"``; anything else raises."""
    model_type = getattr(config, "model_type", None)
    if model_type in DECODER_TYPES:
        return "decoder"
    if model_type in ("gpt2", "bert"):
        return model_type
    raise ValueError(
        f"Counting supports the model types {', '.join(DECODER_TYPES)}, gpt2 and bert; this config is "
        f"{model_type!r}. Count such a model with sum(p.numel() for p in model.parameters()) on the meta device."
    )


def _task(config, task: str | None) -> str:
    if task is None:
        return "base" if model_family(config) == "bert" else "causal-lm"
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}: choose one of {', '.join(TASKS)}.")
    if task == "causal-lm" and model_family(config) == "bert":
        raise ValueError("BERT is an encoder: count it as task='base' or task='seq-cls'.")
    return task


def _decoder_linears(config, prefix: str) -> list[LinearSpec]:
    d, d_ff = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    q_out = config.num_attention_heads * head_dim
    kv_out = (getattr(config, "num_key_value_heads", None) or config.num_attention_heads) * head_dim
    qkv_bias = config.model_type == "qwen2" or bool(getattr(config, "attention_bias", False))
    o_bias = config.model_type == "llama" and bool(getattr(config, "attention_bias", False))
    mlp_bias = config.model_type == "llama" and bool(getattr(config, "mlp_bias", False))
    out = []
    for i in range(config.num_hidden_layers):
        at, mlp = f"{prefix}layers.{i}.self_attn.", f"{prefix}layers.{i}.mlp."
        out += [
            LinearSpec(at + "q_proj", d, q_out, qkv_bias),
            LinearSpec(at + "k_proj", d, kv_out, qkv_bias),
            LinearSpec(at + "v_proj", d, kv_out, qkv_bias),
            LinearSpec(at + "o_proj", q_out, d, o_bias),
            LinearSpec(mlp + "gate_proj", d, d_ff, mlp_bias),
            LinearSpec(mlp + "up_proj", d, d_ff, mlp_bias),
            LinearSpec(mlp + "down_proj", d_ff, d, mlp_bias),
        ]
    return out


def _gpt2_linears(config, prefix: str) -> list[LinearSpec]:
    d = config.n_embd
    d_ff = config.n_inner or 4 * d
    out = []
    for i in range(config.n_layer):
        h = f"{prefix}h.{i}."
        out += [
            LinearSpec(h + "attn.c_attn", d, 3 * d, True),  # q, k and v in one Conv1D
            LinearSpec(h + "attn.c_proj", d, d, True),
            LinearSpec(h + "mlp.c_fc", d, d_ff, True),
            LinearSpec(h + "mlp.c_proj", d_ff, d, True),  # same leaf name as attn.c_proj, another shape
        ]
    return out


def _bert_linears(config, prefix: str) -> list[LinearSpec]:
    d, d_ff = config.hidden_size, config.intermediate_size
    out = []
    for i in range(config.num_hidden_layers):
        layer = f"{prefix}encoder.layer.{i}."
        out += [
            LinearSpec(layer + "attention.self.query", d, d, True),
            LinearSpec(layer + "attention.self.key", d, d, True),
            LinearSpec(layer + "attention.self.value", d, d, True),
            LinearSpec(layer + "attention.output.dense", d, d, True),
            LinearSpec(layer + "intermediate.dense", d, d_ff, True),
            LinearSpec(layer + "output.dense", d_ff, d, True),
        ]
    return out + [LinearSpec(prefix + "pooler.dense", d, d, True)]


def linear_layers(config, task: str | None = None) -> list[LinearSpec]:
    """Every linear layer (``nn.Linear`` or ``Conv1D``) of the model ``config`` describes, named as in
    ``model.named_modules()``, in the model's order."""
    family, task = model_family(config), _task(config, task)
    num_labels = getattr(config, "num_labels", 2)
    if family == "decoder":
        prefix = "" if task == "base" else "model."
        out = _decoder_linears(config, prefix)
        d = config.hidden_size
    elif family == "gpt2":
        prefix = "" if task == "base" else "transformer."
        out = _gpt2_linears(config, prefix)
        d = config.n_embd
    else:
        prefix = "" if task == "base" else "bert."
        out = _bert_linears(config, prefix)
        d = config.hidden_size
    if task == "causal-lm":
        out.append(LinearSpec("lm_head", d, config.vocab_size, False, tied=bool(config.tie_word_embeddings)))
    elif task == "seq-cls" and family == "bert":
        out.append(LinearSpec("classifier", d, num_labels, True))
    elif task == "seq-cls":
        out.append(LinearSpec("score", d, num_labels, False))
    return out


def other_params(config, task: str | None = None) -> int:
    """Parameters outside the linear layers: embeddings and normalization weights (and biases)."""
    family = model_family(config)
    _task(config, task)
    if family == "decoder":  # RMSNorm: a weight, no bias; two per layer and a final one
        d = config.hidden_size
        return config.vocab_size * d + (2 * config.num_hidden_layers + 1) * d
    if family == "gpt2":  # token and position embeddings; LayerNorm weight + bias: two per layer, a final one
        d = config.n_embd
        return (config.vocab_size + config.n_positions) * d + (2 * config.n_layer + 1) * 2 * d
    d = config.hidden_size  # BERT: word, position and token-type embeddings, their LayerNorm, two per layer
    embeddings = (config.vocab_size + config.max_position_embeddings + config.type_vocab_size) * d
    return embeddings + (1 + 2 * config.num_hidden_layers) * 2 * d


def count_params(config, task: str | None = None) -> int:
    """All parameters of the model ``config`` describes (each tied tensor once, as ``model.parameters()``)."""
    return sum(spec.n_params for spec in linear_layers(config, task)) + other_params(config, task)


def lora_params_per_linear(d_in: int, d_out: int, rank: int) -> int:
    """Trainable parameters LoRA adds to one ``d_in -> d_out`` layer: A is (rank, d_in), B is (d_out, rank)."""
    return rank * (d_in + d_out)


def lora_targets(
    config, target_modules: str | Sequence[str], task: str | None = None, modules_to_save: Sequence[str] = ()
) -> list[LinearSpec]:
    """The linear layers peft would adapt for ``target_modules`` (a list of names, a regular expression,
    or ``"all-linear"``: every linear layer except the output head, as peft does). Layers kept as
    ``modules_to_save`` (and, for ``task="seq-cls"``, the head) are never LoRA targets in peft."""
    task = _task(config, task)
    saved = list(modules_to_save) + (list(SEQ_CLS_HEADS) if task == "seq-cls" else [])
    layers = [s for s in linear_layers(config, task) if not any(_saved_match(s.name, m) for m in saved)]
    if isinstance(target_modules, str) and target_modules.lower() == "all-linear":
        return [s for s in layers if s.name != "lm_head"]
    chosen = [s for s in layers if target_matches(s.name, target_modules)]
    if not chosen:
        leaves = list(dict.fromkeys(s.name.rsplit(".", 1)[-1] for s in layers))
        raise ValueError(
            f"target_modules={target_modules!r} matches no linear layer; there are: {', '.join(leaves)}."
        )
    return chosen


def _saved_match(name: str, module_to_save: str) -> bool:
    # peft keeps a module out of the LoRA targets when a name to save is one of its dotted components
    return re.match(rf"(^|.*\.){re.escape(module_to_save)}($|\..*)", name) is not None


def count_lora_params(
    config,
    rank: int,
    target_modules: str | Sequence[str],
    task: str | None = None,
    modules_to_save: Sequence[str] = (),
) -> int:
    """Trainable LoRA parameters: ``rank * (d_in + d_out)`` summed over the targeted linear layers."""
    if rank <= 0:
        raise ValueError(f"rank must be a positive integer, got {rank!r}.")
    targets = lora_targets(config, target_modules, task, modules_to_save)
    return sum(lora_params_per_linear(s.d_in, s.d_out, rank) for s in targets)


def modules_to_save_params(config, modules_to_save: Sequence[str], task: str | None = None) -> int:
    """Parameters of the linear layers peft trains in full as ``modules_to_save`` (a layer whose name ends
    with an entry, peft's rule). A name that matches no linear layer raises ``ValueError``."""
    layers = linear_layers(config, task)
    for m in modules_to_save:
        if not any(s.name.endswith(m) for s in layers):
            raise ValueError(f"modules_to_save entry {m!r} matches no linear layer of this model.")
    return sum(s.n_params for s in layers if any(s.name.endswith(m) for m in modules_to_save))


def trainable_line(trainable: int, total: int) -> str:
    """The line peft's ``print_trainable_parameters()`` prints (same format, character for character)."""
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"


def lora_trainable_counts(
    config,
    rank: int,
    target_modules: str | Sequence[str],
    task: str | None = None,
    modules_to_save: Sequence[str] = (),
) -> tuple[int, int]:
    """``(trainable, all)`` as peft's ``get_nb_trainable_parameters()`` reports them after ``get_peft_model``.

    With ``task="seq-cls"`` peft also trains the head (``classifier`` / ``score``). A module to save is
    kept twice, the frozen original and the trained copy, so it counts twice in ``all``.
    """
    task = _task(config, task)
    lora = count_lora_params(config, rank, target_modules, task, modules_to_save)
    modules_to_save_params(config, modules_to_save, task)  # raises for a name that matches nothing
    saved = list(modules_to_save) + (list(SEQ_CLS_HEADS) if task == "seq-cls" else [])  # whichever exists
    head = sum(s.n_params for s in linear_layers(config, task) if any(s.name.endswith(m) for m in saved))
    return lora + head, count_params(config, task) + lora + head


def print_trainable_parameters(
    config,
    rank: int,
    target_modules: str | Sequence[str],
    task: str | None = None,
    modules_to_save: Sequence[str] = (),
) -> None:
    """Print peft's ``print_trainable_parameters()`` line, computed from the config alone."""
    print(trainable_line(*lora_trainable_counts(config, rank, target_modules, task, modules_to_save)))


def lora_fraction(d_in: int, d_out: int, rank: int) -> float:
    """``rank (d_in + d_out) / (d_in d_out)``: LoRA's parameters as a share of the layer's weight."""
    return lora_params_per_linear(d_in, d_out, rank) / (d_in * d_out)


def human(n: float) -> str:
    """A count for reading: ``6738415616 -> '6.74 B'``, ``4194304 -> '4.19 M'``."""
    if n == 0:
        return "0"
    exponent = min(int(math.log10(abs(n)) // 3), 4)
    return f"{n / 1000**exponent:.3g} {['', 'K', 'M', 'B', 'T'][exponent]}".strip()


# Published architectures, from their config.json files (no download: the numbers are written out here).
# ``params`` is the total the model card / paper reports, which ``count_params`` reproduces exactly
# (tests/test_counting.py). LLaMA-1 33B and 65B are the models of the QLoRA paper's memory headline.
def _decoder(model_type: str, d: int, d_ff: int, layers: int, heads: int, kv_heads: int, vocab: int, tied: bool,
             params: int) -> dict:  # fmt: skip
    kwargs = dict(hidden_size=d, intermediate_size=d_ff, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv_heads, vocab_size=vocab, tie_word_embeddings=tied)  # fmt: skip
    return {"model_type": model_type, "kwargs": kwargs, "params": params}


KNOWN_CONFIGS: dict[str, dict] = {
    "gpt2": {
        "model_type": "gpt2",
        "kwargs": dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024),
        "params": 124_439_808,
    },
    "bert-base-uncased": {
        "model_type": "bert",
        "kwargs": dict(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, vocab_size=30522
        ),
        "params": 109_482_240,
    },
    # name:            family   hidden  MLP  layers heads kv  vocab   tied  published total
    "smollm2-135m": _decoder("llama", 576, 1536, 30, 9, 3, 49152, True, 134_515_008),
    "qwen2.5-0.5b": _decoder("qwen2", 896, 4864, 24, 14, 2, 151936, True, 494_032_768),
    "llama-2-7b": _decoder("llama", 4096, 11008, 32, 32, 32, 32000, False, 6_738_415_616),
    "llama-2-13b": _decoder("llama", 5120, 13824, 40, 40, 40, 32000, False, 13_015_864_320),
    "llama-33b": _decoder("llama", 6656, 17920, 60, 52, 52, 32000, False, 32_528_943_616),
    "llama-65b": _decoder("llama", 8192, 22016, 80, 64, 64, 32000, False, 65_285_660_672),
    "llama-2-70b": _decoder("llama", 8192, 28672, 80, 64, 8, 32000, False, 68_976_648_192),
}  # fmt: skip


def known_config(name: str):
    """The transformers config of a published architecture in ``KNOWN_CONFIGS`` (``"llama-2-7b"``, ...).

    Build the model on the meta device (``meta_model``) to get its shapes without memory or download."""
    from transformers import AutoConfig

    key = name.lower()
    if key not in KNOWN_CONFIGS:
        raise ValueError(f"Unknown architecture {name!r}: known ones are {', '.join(KNOWN_CONFIGS)}.")
    entry = KNOWN_CONFIGS[key]
    return AutoConfig.for_model(entry["model_type"], **entry["kwargs"])


def meta_model(config, task: str | None = None):
    """The model ``config`` describes, built on PyTorch's meta device: every shape, no memory, no download.

    ``task`` as in ``count_params``: ``"causal-lm"`` (decoders' default), ``"seq-cls"`` or ``"base"``."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = {
        "causal-lm": AutoModelForCausalLM,
        "seq-cls": AutoModelForSequenceClassification,
        "base": AutoModel,
    }[_task(config, task)]
    with torch.device("meta"):
        return cls.from_config(config)
