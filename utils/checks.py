"""Exercise checkers: call the learner's function, compare with the reference, say what differs.

Every checker behaves the same way:

* not attempted (the function still raises ``NotImplementedError``): a friendly line, no exception,
  returns ``None``, so the notebook runs on;
* wrong: says what differs (type, shape, scale, which case) without giving the answer, returns ``False``;
* right: says so, returns ``True``.

A checker never raises on the learner's behalf: an exception inside the learner's code is reported as
a message naming the exception, so a class can run the whole notebook top to bottom.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from typing import Any


class CheckFailed(Exception):
    """Raised inside a checker body to report what is wrong (the message is shown to the learner)."""


def run_check(name: str, fn: Callable, body: Callable[[Callable], Any]) -> bool | None:
    """Run ``body(fn)``, which raises ``CheckFailed`` with a hint when ``fn`` is wrong.

    Returns True (passed), False (wrong) or None (not attempted yet).
    """
    try:
        body(fn)
    except NotImplementedError:
        print(
            f"[{name}] not attempted yet: fill in the function above, run its cell, then run this cell again."
        )
        return None
    except CheckFailed as err:
        print(f"[{name}] not yet right: {err}")
        return False
    except Exception as err:  # the learner's code crashed: report it, keep the notebook running
        where = traceback.extract_tb(err.__traceback__)[-1]
        print(
            f"[{name}] your function raised {type(err).__name__}: {err} (line {where.lineno} of {where.name})."
        )
        return False
    print(f"[{name}] correct.")
    return True


def count_llama_params_reference(config) -> int:
    """Parameters of a ``LlamaForCausalLM`` from its config (no biases, RMSNorm weights only).

    Per layer: attention q, o: d*d; k, v: d * (n_kv_heads * head_dim); MLP gate, up, down: 3 * d * d_ff;
    two RMSNorms: 2 * d. Plus the embedding V * d, the final norm d, and an LM head V * d unless tied.
    """
    d, d_ff, vocab, layers = (
        config.hidden_size,
        config.intermediate_size,
        config.vocab_size,
        config.num_hidden_layers,
    )
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    q = config.num_attention_heads * head_dim
    kv = config.num_key_value_heads * head_dim
    per_layer = d * q + 2 * d * kv + q * d + 3 * d * d_ff + 2 * d
    lm_head = 0 if config.tie_word_embeddings else vocab * d
    return vocab * d + layers * per_layer + d + lm_head


def _param_count_cases():
    from transformers import LlamaConfig

    return [
        LlamaConfig(
            vocab_size=100,
            hidden_size=16,
            intermediate_size=40,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            tie_word_embeddings=True,
        ),
        LlamaConfig(
            vocab_size=120,
            hidden_size=24,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
        ),
        LlamaConfig(
            vocab_size=50,
            hidden_size=32,
            intermediate_size=80,
            num_hidden_layers=1,
            num_attention_heads=8,
            num_key_value_heads=8,
            tie_word_embeddings=False,
        ),
    ]


def check_param_count(count_fn: Callable) -> bool | None:
    """Check a learner's ``count_fn(config) -> int`` against ``sum(p.numel())`` of real Llama models."""
    import torch
    from transformers import LlamaForCausalLM

    def body(fn):
        for i, config in enumerate(_param_count_cases()):
            with torch.device("meta"):
                truth = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
            got = fn(config)
            if not isinstance(got, int):
                raise CheckFailed(f"return an int (a count), not {type(got).__name__}.")
            if got == truth:
                continue
            diff = got - truth
            d, vocab = config.hidden_size, config.vocab_size
            hint = (
                f"case {i + 1} (tie_word_embeddings={config.tie_word_embeddings}, "
                f"num_key_value_heads={config.num_key_value_heads} of {config.num_attention_heads} heads): "
                f"you count {got:,}, the model has {truth:,} ({diff:+,})."
            )
            if abs(diff) == vocab * d:
                hint += " The difference is exactly vocab_size * hidden_size: look at tie_word_embeddings."
            elif abs(diff) % d == 0 and abs(diff) // d <= 2 * config.num_hidden_layers + 1:
                hint += (
                    " The difference is a few multiples of hidden_size: look at the normalization weights."
                )
            elif config.num_key_value_heads != config.num_attention_heads:
                hint += " This model uses grouped-query attention: how wide are k_proj and v_proj?"
            raise CheckFailed(hint)

    return run_check("count the parameters", count_fn, body)
