"""Chapter 02's checkers: the bytes of full fine-tuning per precision, and BitFit (only the biases train)."""

import pytest

from utils import checks, memory

# The bytes of full fine-tuning with AdamW.


def bytes_solution(n_params, precision):
    weight = {"fp32": 4, "mixed": 2, "bf16": 2}[precision]
    moment = 2 if precision == "bf16" else 4
    master = 4 if precision == "mixed" else 0
    return {
        "weights": weight * n_params,
        "gradients": weight * n_params,
        "optimizer": (master + 2 * moment) * n_params,
    }


def bytes_from_utils(n_params, precision):
    return {k: v * n_params for k, v in memory.bytes_per_param(precision).items()}


def bytes_stub(n_params, precision):
    """Bytes of weights, gradients and AdamW state for full fine-tuning of n_params parameters."""
    # YOUR CODE HERE
    raise NotImplementedError("Exercise: write this part, then run the check below.")


def _with(overrides):
    """The right answer, with some bytes-per-parameter replaced for some precisions."""

    def fn(n_params, precision):
        right = bytes_solution(1, precision)
        per = {**right, **overrides.get(precision, {})}
        return {k: v * n_params for k, v in per.items()}

    return fn


@pytest.mark.parametrize("fn", [bytes_solution, bytes_from_utils])
def test_bytes_right_answers_pass(fn, capsys):
    assert checks.check_full_finetuning_bytes(fn) is True
    assert "[bytes of full fine-tuning] correct." in capsys.readouterr().out


def test_bytes_float_values_are_accepted(capsys):
    def as_floats(n_params, precision):
        return {k: float(v) for k, v in bytes_solution(n_params, precision).items()}

    assert checks.check_full_finetuning_bytes(as_floats) is True


def test_bytes_stub_is_not_attempted(capsys):
    assert checks.check_full_finetuning_bytes(bytes_stub) is None
    assert "not attempted yet" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("fn", "reason"),
    [
        (
            _with({"mixed": {"weights": 4, "gradients": 4, "optimizer": 8}}),
            "split as PyTorch's autocast splits it",
        ),
        (_with({"mixed": {"optimizer": 8}}), "Something is missing from the optimizer state"),
        (
            _with({"mixed": {"weights": 4, "gradients": 4}}),
            "working weights (and so their gradients) are 16-bit",
        ),
        (_with({"mixed": {"gradients": 4}}), "A gradient has the dtype of its parameter"),
        (_with({"fp32": {"optimizer": 12}}), "no second copy of them is needed"),
        (_with({"fp32": {"optimizer": 4}}), "two moments per parameter"),
        (_with({"fp32": {"weights": 2, "gradients": 2}}), "How many bytes does one fp32 number take?"),
        (_with({"bf16": {"optimizer": 8}}), "the moments take the parameter's dtype"),
        (_with({"bf16": {"optimizer": 12}}), "keeps no fp32 copy"),
        (lambda n, p: bytes_solution(1, p), "These are bytes per parameter: multiply by n_params"),
        (lambda n, p: {k: 8 * v for k, v in bytes_solution(n, p).items()}, "These are bits, not bytes"),
        (lambda n, p: sum(bytes_solution(n, p).values()), "return a dict with the keys"),
        (lambda n, p: {"weights": 1, "gradients": 1}, "missing ['optimizer']"),
        (lambda n, p: {**bytes_solution(n, p), "activations": 0}, "unexpected ['activations']"),
        (lambda n, p: {**bytes_solution(n, p), "optimizer": "12 bytes"}, "should be a number of bytes"),
    ],
)
def test_bytes_wrong_answers_are_named(fn, reason, capsys):
    assert checks.check_full_finetuning_bytes(fn) is False
    out = capsys.readouterr().out
    assert "[bytes of full fine-tuning] not yet right" in out and reason in out


def test_bytes_hints_do_not_give_the_numbers(capsys):
    checks.check_full_finetuning_bytes(_with({"mixed": {"optimizer": 8}}))
    out = capsys.readouterr().out
    assert "optimizer 8" in out  # it says what the learner's count is
    assert "optimizer 12" not in out and "16 bytes" not in out  # and not what the right one is


def test_bytes_crash_is_reported_with_the_learners_line(capsys):
    def crashes(n_params, precision):
        return {"fp32": 4}[precision] * n_params  # KeyError for "mixed"

    assert checks.check_full_finetuning_bytes(crashes) is False
    assert "raised KeyError" in capsys.readouterr().out


def test_reference_is_utils_memory():
    for precision in memory.PRECISIONS:
        want = {k: int(v * 1000) for k, v in memory.bytes_per_param(precision).items()}
        assert checks.full_finetuning_bytes_reference(1000, precision) == want
    assert sum(checks.full_finetuning_bytes_reference(1, "mixed").values()) == 16


# BitFit.


def bitfit_solution(model):
    for name, p in model.named_parameters():
        p.requires_grad = name.endswith("bias")
    return model


def bitfit_in_place_returns_none(model):
    for name, p in model.named_parameters():
        p.requires_grad = "bias" in name.split(".")[-1]


def bitfit_stub(model):
    """Freeze every weight; train only the biases. Returns the model (changed in place)."""
    # YOUR CODE HERE
    raise NotImplementedError("Exercise: write this part, then run the check below.")


def bitfit_linear_biases_only(model):  # forgets LayerNorm's beta
    import torch

    linear_biases = {
        f"{module_name}.bias"
        for module_name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"
    }
    for name, p in model.named_parameters():
        p.requires_grad = name in linear_biases
    return model


def bitfit_also_norm_weights(model):  # trains LayerNorm's gamma too
    for name, p in model.named_parameters():
        p.requires_grad = name.endswith("bias") or "ln" in name or "LayerNorm" in name
    return model


def bitfit_inverted(model):
    for name, p in model.named_parameters():
        p.requires_grad = not name.endswith("bias")
    return model


def bitfit_freezes_nothing(model):
    return model


def bitfit_freezes_everything(model):
    for p in model.parameters():
        p.requires_grad = False
    return model


def bitfit_zeroes_biases(model):
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            p.requires_grad = name.endswith("bias")
            if name.endswith("bias"):
                p.zero_()
    return model


def bitfit_new_parameters(model):
    import torch

    for module in list(model.modules()):
        if isinstance(module, torch.nn.Linear) and module.bias is not None:
            module.bias = torch.nn.Parameter(module.bias.detach().clone())
            module.extra = torch.nn.Parameter(torch.zeros(1))
    return bitfit_solution(model)


def bitfit_returns_names(model):
    bitfit_solution(model)
    return [name for name, p in model.named_parameters() if p.requires_grad]


def bitfit_detaches_biases(model):  # requires_grad right, but the biases no longer reach the loss
    import torch

    bitfit_solution(model)
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.bias is not None:
            bias = module.bias
            module.forward = lambda x, m=module, b=bias: torch.nn.functional.linear(x, m.weight, b.detach())
    return model


@pytest.mark.parametrize("fn", [bitfit_solution, bitfit_in_place_returns_none, checks.make_bitfit_reference])
def test_bitfit_right_answers_pass(fn, capsys):
    assert checks.check_make_bitfit(fn) is True
    assert "[BitFit: only the biases train] correct." in capsys.readouterr().out


def test_bitfit_stub_is_not_attempted(capsys):
    assert checks.check_make_bitfit(bitfit_stub) is None
    assert "not attempted yet" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("fn", "reason"),
    [
        (bitfit_freezes_nothing, "Every parameter still trains"),
        (bitfit_freezes_everything, "Nothing trains"),
        (bitfit_inverted, "the other way round"),
        (bitfit_linear_biases_only, "A normalization layer's bias (beta) is a bias too"),
        (bitfit_also_norm_weights, "Not a bias, but it trains"),
        (bitfit_zeroes_biases, "changed the values of"),
        (bitfit_new_parameters, "changed names or number"),
        (bitfit_returns_names, "return the model"),
        (bitfit_detaches_biases, "no gradient reached"),
    ],
)
def test_bitfit_wrong_answers_are_named(fn, reason, capsys):
    assert checks.check_make_bitfit(fn) is False
    out = capsys.readouterr().out
    assert "[BitFit: only the biases train] not yet right" in out and reason in out


def test_bitfit_count_is_in_the_message(capsys):
    checks.check_make_bitfit(bitfit_freezes_nothing)
    out = capsys.readouterr().out
    assert "parameters train, the biases are" in out


def test_bitfit_reference_on_a_model_with_biases():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=8, n_embd=8, n_layer=1, n_head=2))
    checks.make_bitfit_reference(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith("bias") for n in trainable)
    assert any("ln_" in n for n in trainable)  # LayerNorm's beta is trained too
