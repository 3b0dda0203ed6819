"""Chapter 00: count a Llama model's parameters from its config."""

from __future__ import annotations

from collections.abc import Callable

from utils.checks.core import (
    CheckFailed,
    call_on_copies,
    edited_config,
    expect_int,
    mutation_message,
    run_check,
)


def count_llama_params_reference(config) -> int:
    """Parameters of a ``LlamaForCausalLM`` from its config (no biases, RMSNorm weights only).

    Per layer: attention q, o: d * (n_heads * head_dim); k, v: d * (n_kv_heads * head_dim); MLP gate, up,
    down: 3 * d * d_ff; two RMSNorms: 2 * d. Plus the embedding V * d, the final norm d, and an LM head
    V * d unless tied. This is ``utils.counting.count_params``, which the tests check against real models."""
    from utils import counting

    return counting.count_params(config)


def _param_count_cases():
    from transformers import LlamaConfig

    return [
        LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=40, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),
        LlamaConfig(vocab_size=120, hidden_size=24, intermediate_size=64, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
        LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=80, num_hidden_layers=1,
                    num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False),
        # head_dim set apart from hidden_size // num_attention_heads (as Gemma and Qwen3 do)
        LlamaConfig(vocab_size=60, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=12, tie_word_embeddings=True),
    ]  # fmt: skip


def _describe_case(i: int, config) -> str:
    text = (
        f"case {i + 1} (tie_word_embeddings={config.tie_word_embeddings}, "
        f"num_key_value_heads={config.num_key_value_heads} of {config.num_attention_heads} heads"
    )
    if config.head_dim != config.hidden_size // config.num_attention_heads:
        text += f", head_dim={config.head_dim}"
    return text + ")"


def _hint(config, got: int, truth: int) -> str:
    """Name the mistake when ``got`` is exactly what a common slip gives, else point where to look."""
    from utils.counting import count_params

    d, vocab, layers = config.hidden_size, config.vocab_size, config.num_hidden_layers
    heads, kv, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    diff = got - truth
    if abs(diff) == vocab * d:
        return " The difference is exactly vocab_size * hidden_size: look at tie_word_embeddings."
    if diff % d == 0 and abs(diff) // d <= 2 * layers + 1:
        return " The difference is a few multiples of hidden_size: look at the normalization weights."
    if layers > 1 and got == count_params(edited_config(config, num_hidden_layers=1)):
        return f" That is a model with one decoder layer: this one has num_hidden_layers={layers}."
    natural = d // heads
    if head_dim != natural and got in (
        count_params(edited_config(config, head_dim=natural)),
        count_params(edited_config(config, head_dim=natural, num_key_value_heads=heads)),
    ):
        return (
            f" This config sets head_dim={head_dim}, not hidden_size // num_attention_heads = {natural}: "
            "the attention projections are num_heads * head_dim wide, with head_dim read from the config "
            "when it is set."
        )
    if kv != heads:
        return " This model uses grouped-query attention: how wide are k_proj and v_proj?"
    return " Count each layer's seven projections, its two norms, then the embedding, final norm and head."


def check_param_count(count_fn: Callable) -> bool | None:
    """Check a learner's ``count_fn(config) -> int`` against ``sum(p.numel())`` of real Llama models
    (built on the meta device: every shape, no memory)."""
    from utils import counting

    def body(fn):
        for i, config in enumerate(_param_count_cases()):
            truth = sum(p.numel() for p in counting.meta_model(config).parameters())
            got, changed = call_on_copies(fn, config=config)
            got = expect_int(got)
            if changed:
                raise CheckFailed(mutation_message(changed, "read the config's fields, do not set them"))
            if got == truth:
                continue
            raise CheckFailed(
                f"{_describe_case(i, config)}: you count {got:,}, the model has {truth:,} ({got - truth:+,})."
                + _hint(config, got, truth)
            )

    return run_check("count the parameters", count_fn, body)
