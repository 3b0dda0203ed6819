from utils import checks


def test_not_attempted_is_reported_without_raising(capsys):
    def count(config):
        raise NotImplementedError

    assert checks.check_param_count(count) is None
    assert "not attempted yet" in capsys.readouterr().out


def test_reference_passes(capsys):
    assert checks.check_param_count(checks.count_llama_params_reference) is True
    assert "correct" in capsys.readouterr().out


def test_counting_a_tied_embedding_twice_gets_a_pointed_hint(capsys):
    def count_untied_always(config):
        d, v = config.hidden_size, config.vocab_size
        n = checks.count_llama_params_reference(config)
        return n + (v * d if config.tie_word_embeddings else 0)

    assert checks.check_param_count(count_untied_always) is False
    out = capsys.readouterr().out
    assert "tie_word_embeddings" in out and "case 1" in out


def test_forgetting_the_norms_is_named(capsys):
    def no_norms(config):
        return checks.count_llama_params_reference(config) - config.hidden_size * (
            2 * config.num_hidden_layers + 1
        )

    assert checks.check_param_count(no_norms) is False
    assert "normalization" in capsys.readouterr().out


def test_ignoring_grouped_query_attention_is_named(capsys):
    def full_kv(config):
        d = config.hidden_size
        per_layer = 4 * d * d + 3 * d * config.intermediate_size + 2 * d
        head = 0 if config.tie_word_embeddings else config.vocab_size * d
        return config.vocab_size * d + config.num_hidden_layers * per_layer + d + head

    assert checks.check_param_count(full_kv) is False
    assert "grouped-query" in capsys.readouterr().out


def test_a_crash_in_learner_code_is_reported_not_raised(capsys):
    def broken(config):
        return config.no_such_field

    assert checks.check_param_count(broken) is False
    assert "AttributeError" in capsys.readouterr().out


def test_wrong_type_is_named(capsys):
    assert checks.check_param_count(lambda config: 1.5) is False
    assert "return an int" in capsys.readouterr().out
