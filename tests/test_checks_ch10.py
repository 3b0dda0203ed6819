"""Chapter 10's checkers: the adapter's size in bytes, and whether two models' logits agree."""

import pytest
import torch

from utils import checks

STUB = "Exercise: write this part, then run the check below."

# The adapter's size


def bytes_solution(shapes, rank, bytes_per_value=4):
    return sum(rank * (d_in + d_out) for d_in, d_out in shapes) * bytes_per_value


def bytes_stub(shapes, rank, bytes_per_value=4):
    """Bytes."""
    # YOUR CODE HERE
    raise NotImplementedError(STUB)


def values_not_bytes(shapes, rank, bytes_per_value=4):
    return sum(rank * (d_in + d_out) for d_in, d_out in shapes)


def full_matrices(shapes, rank, bytes_per_value=4):
    return sum(d_in * d_out for d_in, d_out in shapes) * bytes_per_value


def only_a(shapes, rank, bytes_per_value=4):
    return sum(rank * d_in for d_in, _ in shapes) * bytes_per_value


def square_layers(shapes, rank, bytes_per_value=4):
    return 2 * rank * shapes[0][0] * len(shapes) * bytes_per_value


def always_fp32(shapes, rank, bytes_per_value=4):
    return sum(rank * (d_in + d_out) for d_in, d_out in shapes) * 4


def test_adapter_bytes_right_and_stub(capsys):
    assert checks.check_adapter_bytes(bytes_solution) is True
    assert checks.check_adapter_bytes(bytes_stub) is None
    assert "not attempted" in capsys.readouterr().out.lower()


@pytest.mark.parametrize(
    "wrong, message",
    [
        (values_not_bytes, "number of values"),
        (full_matrices, "full weight matrices"),
        (only_a, "only one of the two matrices"),
        (square_layers, "every layer is square"),
        (always_fp32, "not the size of the adapter"),
    ],
)
def test_adapter_bytes_wrong_answers(wrong, message, capsys):
    assert checks.check_adapter_bytes(wrong) is False
    out = capsys.readouterr().out
    assert message in out and "rank * (d_in" not in out


def test_adapter_bytes_reference_matches_a_saved_adapter(tmp_path):
    import peft

    from utils import models

    base, _ = models.load_model(device="cpu", dtype=torch.float32)
    wrapped = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules="all-linear"))
    wrapped.save_pretrained(str(tmp_path))
    raw = (tmp_path / "adapter_model.safetensors").read_bytes()
    header = 8 + int.from_bytes(raw[:8], "little")
    shapes = [(m.in_features, m.out_features) for n, m in base.named_modules() if n.endswith("base_layer")]
    assert len(raw) - header == checks.adapter_bytes_reference(shapes, 4)


# Do two models' logits agree


def agree_solution(logits_a, logits_b, attention_mask, atol):
    return bool(((logits_a - logits_b).abs()[attention_mask.bool()] <= atol).all())


def agree_stub(logits_a, logits_b, attention_mask, atol):
    """Agree."""
    # YOUR CODE HERE
    raise NotImplementedError(STUB)


def ignores_mask(logits_a, logits_b, attention_mask, atol):
    return bool(((logits_a - logits_b).abs() <= atol).all())


def argmax_only(logits_a, logits_b, attention_mask, atol):
    return bool((logits_a.argmax(-1) == logits_b.argmax(-1))[attention_mask.bool()].all())


def mean_difference(logits_a, logits_b, attention_mask, atol):
    return bool((logits_a - logits_b).abs()[attention_mask.bool()].mean() <= atol / 2)


def relative(logits_a, logits_b, attention_mask, atol):
    ratio = (logits_a - logits_b).abs() / logits_b.abs().clamp(min=1e-12)
    return bool((ratio[attention_mask.bool()] <= atol).all())


def allclose_default_rtol(logits_a, logits_b, attention_mask, atol):  # rtol=1e-5 sneaks in
    m = attention_mask.bool()
    return torch.allclose(logits_a[m], logits_b[m], atol=atol)


def isclose_rtol(logits_a, logits_b, attention_mask, atol):
    m = attention_mask.bool()
    return bool(torch.isclose(logits_a[m], logits_b[m], atol=atol, rtol=atol).all())


def numpy_answer(logits_a, logits_b, attention_mask, atol):  # right, and returns numpy's bool
    import numpy as np

    diff = np.abs(logits_a.numpy() - logits_b.numpy())[attention_mask.numpy().astype(bool)]
    return np.all(diff <= atol)


def returns_tensor(logits_a, logits_b, attention_mask, atol):
    return (logits_a - logits_b).abs()[attention_mask.bool()] <= atol


def test_logits_agree_right_and_stub(capsys):
    assert checks.check_logits_agree(agree_solution) is True
    assert checks.check_logits_agree(numpy_answer) is True
    assert checks.check_logits_agree(agree_stub) is None
    assert "not attempted" in capsys.readouterr().out.lower()


@pytest.mark.parametrize(
    "wrong, message",
    [
        (ignores_mask, "only positions where attention_mask is 1"),
        (argmax_only, "the greedy token is the same"),
        (mean_difference, "Every value must be within atol"),
        (returns_tensor, "return a bool"),
        (allclose_default_rtol, "also add rtol * |b|"),
        (isclose_rtol, "also add rtol * |b|"),
    ],
)
def test_logits_agree_wrong_answers(wrong, message, capsys):
    assert checks.check_logits_agree(wrong) is False
    out = capsys.readouterr().out
    assert message in out and ".all()" not in out


def test_logits_agree_relative_tolerance_is_caught(capsys):
    assert checks.check_logits_agree(relative) is False
    assert "not yet right" in capsys.readouterr().out
