"""check_param_count: right answers pass, the stub is not attempted, each common slip is named."""

import pytest

from utils import checks, counting


def solution_style(config) -> int:  # the notebook's solution
    d, d_ff, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    q_width = config.num_attention_heads * head_dim
    kv_width = config.num_key_value_heads * head_dim
    attention = d * q_width + 2 * d * kv_width + q_width * d
    head = 0 if config.tie_word_embeddings else vocab * d
    return vocab * d + config.num_hidden_layers * (attention + 3 * d * d_ff + 2 * d) + d + head


def meta_style(config) -> int:  # build it on the meta device and count
    return sum(p.numel() for p in counting.meta_model(config).parameters())


def stub(config) -> int:
    """Parameters of LlamaForCausalLM(config), from the config alone."""
    # YOUR CODE HERE
    raise NotImplementedError("Exercise: write this part, then run the check below.")


def body_left_above_the_raise(config) -> int:
    """Parameters of LlamaForCausalLM(config), from the config alone."""
    n = solution_style(config)
    raise NotImplementedError("Exercise: write this part, then run the check below.")
    return n


def tied_counted_twice(config):
    return solution_style(config) + (
        config.vocab_size * config.hidden_size if config.tie_word_embeddings else 0
    )


def no_norms(config):
    return solution_style(config) - config.hidden_size * (2 * config.num_hidden_layers + 1)


def ignores_gqa(config):
    d = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    width = config.num_attention_heads * head_dim
    per_layer = 4 * d * width + 3 * d * config.intermediate_size + 2 * d
    head = 0 if config.tie_word_embeddings else config.vocab_size * d
    return config.vocab_size * d + config.num_hidden_layers * per_layer + d + head


def ignores_head_dim(config):
    d, heads = config.hidden_size, config.num_attention_heads
    q, kv = d, config.num_key_value_heads * (d // heads)
    per_layer = 2 * d * q + 2 * d * kv + 3 * d * config.intermediate_size + 2 * d
    head = 0 if config.tie_word_embeddings else config.vocab_size * d
    return config.vocab_size * d + config.num_hidden_layers * per_layer + d + head


def one_layer_only(config):
    one = solution_style(config)
    layers = config.num_hidden_layers
    per_layer = (one - solution_style_without_layers(config)) // layers
    return one - (layers - 1) * per_layer


def solution_style_without_layers(config):
    d, vocab = config.hidden_size, config.vocab_size
    return vocab * d + d + (0 if config.tie_word_embeddings else vocab * d)


def sets_the_config(config):
    config.num_key_value_heads = config.num_attention_heads  # "fixes" the config instead of reading it
    return solution_style(config)


@pytest.mark.parametrize("fn", [checks.count_llama_params_reference, solution_style, meta_style])
def test_right_answers_pass(fn, capsys):
    assert checks.check_param_count(fn) is True
    assert "[count the parameters] correct." in capsys.readouterr().out


def test_the_reference_is_utils_counting():
    config = counting.known_config("llama-2-7b")
    assert checks.count_llama_params_reference(config) == counting.count_params(config) == 6_738_415_616


def test_untouched_stub_is_not_attempted(capsys):
    assert checks.check_param_count(stub) is None
    assert "not attempted yet" in capsys.readouterr().out


def test_a_body_above_the_stub_raise_is_told_to_delete_the_line(capsys):
    assert checks.check_param_count(body_left_above_the_raise) is None
    out = capsys.readouterr().out
    assert "delete that line" in out and "not attempted" not in out


@pytest.mark.parametrize(
    ("fn", "reason"),
    [
        (tied_counted_twice, "case 1 (tie_word_embeddings=True"),
        (tied_counted_twice, "exactly vocab_size * hidden_size: look at tie_word_embeddings"),
        (no_norms, "look at the normalization weights"),
        (ignores_gqa, "grouped-query attention: how wide are k_proj and v_proj?"),
        (ignores_head_dim, "case 4"),
        (ignores_head_dim, "This config sets head_dim=12, not hidden_size // num_attention_heads = 8"),
        (one_layer_only, "one decoder layer: this one has num_hidden_layers=2"),
        (sets_the_config, "changes its input `config` in place"),
        (lambda config: 1.5, "return an int (a count); your function returned a float (1.5)"),
        (lambda config: None, "your function returned None"),
        (lambda config: True, "a bool"),
    ],
)
def test_wrong_answers_are_named(fn, reason, capsys):
    assert checks.check_param_count(fn) is False
    out = capsys.readouterr().out
    assert "[count the parameters] not yet right" in out and reason in out


def test_a_crash_in_learner_code_shows_the_learners_line(capsys):
    def broken(config):
        d = config.hidden_size
        return d * config.no_such_field

    assert checks.check_param_count(broken) is False
    out = capsys.readouterr().out
    assert "your function raised AttributeError" in out
    assert "of broken: return d * config.no_such_field" in out
