"""utils.lora against peft: same names and shapes, same outputs, same counts; merge exact; bad input refused."""

import copy
import math
import warnings

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig
from transformers.pytorch_utils import Conv1D

from utils import lora, timing

LLAMA = LlamaConfig(
    vocab_size=100, hidden_size=32, intermediate_size=80, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
)  # fmt: skip
GPT2 = GPT2Config(
    n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0
)


def _model(config):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def _peft_twin(base, targets, rank=4, alpha=8, use_rslora=False):
    """The same base wrapped by peft, with B randomised so the adapter actually changes the output."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, use_rslora=use_rslora)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's "Conv1D: setting fan_in_fan_out" notice for GPT-2
        model = get_peft_model(copy.deepcopy(base), config).eval()
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.2)
    return model


def test_shapes_names_and_init_follow_peft():
    torch.manual_seed(0)
    layer = lora.LoRALinear(nn.Linear(24, 40), rank=4, alpha=8)
    assert layer.lora_A.weight.shape == (4, 24) and layer.lora_B.weight.shape == (40, 4)
    assert set(dict(layer.named_parameters())) == {
        "base_layer.weight", "base_layer.bias", "lora_A.weight", "lora_B.weight",
    }  # fmt: skip
    assert not layer.base_layer.weight.requires_grad and not layer.base_layer.bias.requires_grad
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    bound = 1 / math.sqrt(24)  # kaiming_uniform(a=sqrt(5)) on fan_in 24 draws from U(-1/sqrt(24), 1/sqrt(24))
    assert layer.lora_A.weight.abs().max() <= bound and layer.lora_A.weight.abs().max() > 0.8 * bound
    x = torch.randn(3, 5, 24)
    torch.testing.assert_close(layer(x), layer.base_layer(x), rtol=0, atol=0)  # B = 0: starts as the base


def test_scaling_plain_and_rslora():
    assert lora.LoRALinear(nn.Linear(64, 64), rank=16, alpha=32).scaling == 2.0
    assert lora.LoRALinear(nn.Linear(64, 64), rank=16, alpha=32, use_rslora=True).scaling == 8.0


def test_forward_is_w_x_plus_scaled_b_a_x():
    torch.manual_seed(0)
    layer = lora.LoRALinear(nn.Linear(8, 6), rank=2, alpha=3)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(4, 8)
    W, b = layer.base_layer.weight, layer.base_layer.bias
    A, B = layer.lora_A.weight, layer.lora_B.weight
    torch.testing.assert_close(layer(x), x @ W.T + b + 1.5 * x @ A.T @ B.T, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "config,targets",
    [
        (LLAMA, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
        (GPT2, ["c_attn", "c_proj", "c_fc"]),
    ],
    ids=["llama", "gpt2-conv1d"],
)
@pytest.mark.parametrize("use_rslora", [False, True], ids=["alpha/r", "rslora"])
def test_equal_to_peft_with_the_same_weights(config, targets, use_rslora):
    from peft import get_peft_model_state_dict

    base = _model(config)
    theirs = _peft_twin(base, targets, use_rslora=use_rslora)
    ours = lora.add_lora(copy.deepcopy(base), targets, rank=4, alpha=8, use_rslora=use_rslora)
    lora.load_peft_adapter(ours, get_peft_model_state_dict(theirs))
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours_logits, their_logits, base_logits = ours(ids).logits, theirs(ids).logits, base(ids).logits
    assert (
        ours_logits - base_logits
    ).abs().max() > 1e-2  # the adapter is not a no-op, so equality means something
    assert (ours_logits - their_logits).abs().max() <= 1e-6
    trainable = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    assert (trainable, sum(p.numel() for p in ours.parameters())) == theirs.get_nb_trainable_parameters()


def test_gradients_match_peft():
    from peft import get_peft_model_state_dict

    base = _model(LLAMA)
    theirs = _peft_twin(base, ["q_proj", "v_proj"])
    ours = lora.add_lora(copy.deepcopy(base), ["q_proj", "v_proj"], rank=4, alpha=8)
    lora.load_peft_adapter(ours, get_peft_model_state_dict(theirs))
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    ours(ids, labels=ids).loss.backward()
    theirs(ids, labels=ids).loss.backward()
    mine = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    peft_grads = {n.replace(".default", "").removeprefix(lora.PEFT_PREFIX): p.grad
                  for n, p in theirs.named_parameters() if p.requires_grad}  # fmt: skip
    assert mine.keys() == peft_grads.keys()
    for name in mine:
        torch.testing.assert_close(mine[name], peft_grads[name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "config,targets", [(LLAMA, ["q_proj", "down_proj"]), (GPT2, ["c_attn", "c_fc"])], ids=["llama", "gpt2"]
)
def test_merge_equals_unmerged_and_unmerge_restores(config, targets):
    model = lora.add_lora(_model(config), targets, rank=4, alpha=8)
    torch.manual_seed(2)
    for _, layer in lora.lora_layers(model):
        nn.init.normal_(layer.lora_B.weight, std=0.2)
    before = {n: p.clone() for n, p in model.named_parameters() if "base_layer" in n}
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        unmerged = model(ids).logits
        merged = lora.merge_lora(model)(ids).logits
        assert all(layer.merged for _, layer in lora.lora_layers(model))
        assert (merged - unmerged).abs().max() <= 1e-5
        lora.unmerge_lora(model)
        for n, p in model.named_parameters():
            if n in before:
                torch.testing.assert_close(p, before[n], rtol=0, atol=1e-6)


def test_unload_gives_back_the_base_architecture():
    base = _model(LLAMA)
    model = lora.unload_lora(lora.merge_lora(lora.add_lora(copy.deepcopy(base), ["q_proj"], rank=2, alpha=4)))
    assert [(n, p.shape) for n, p in model.named_parameters()] == [
        (n, p.shape) for n, p in base.named_parameters()
    ]
    assert not list(lora.lora_layers(model))


def test_add_lora_freezes_everything_else_and_counts():
    model = lora.add_lora(_model(LLAMA), ["q_proj", "v_proj"], rank=4, alpha=8)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    head_dim = 32 // 4
    per_layer = 4 * (32 + 32) + 4 * (32 + 2 * head_dim)  # q: 32 -> 32; v: 32 -> 2 kv heads * head_dim
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * per_layer


def test_regex_target_matches_like_peft():
    model = lora.add_lora(_model(LLAMA), r".*layers\.0\.self_attn\.(q|v)_proj", rank=2, alpha=2)
    assert [n for n, _ in lora.lora_layers(model)] == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
    ]


def test_merge_twice_warns_and_changes_nothing():
    layer = lora.LoRALinear(nn.Linear(8, 8), rank=2, alpha=2)
    nn.init.normal_(layer.lora_B.weight)
    layer.merge()
    merged = layer.base_layer.weight.clone()
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge()
    assert torch.equal(layer.base_layer.weight, merged)


def test_conv1d_merge_uses_the_transposed_layout():
    torch.manual_seed(0)
    conv = Conv1D(6, 8)  # d_out = 6, d_in = 8; weight stored (8, 6)
    layer = lora.LoRALinear(conv, rank=2, alpha=4)
    assert layer.lora_A.weight.shape == (2, 8) and layer.lora_B.weight.shape == (6, 2)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 8)
    unmerged = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)


# Bad input: each a clear error or warning.


@pytest.mark.parametrize("rank", [0, -1, 2.5])
def test_rank_must_be_a_positive_integer(rank):
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        lora.LoRALinear(nn.Linear(8, 8), rank=rank, alpha=8)


@pytest.mark.parametrize("alpha", [0, -4.0, float("nan")])
def test_alpha_must_be_positive(alpha):
    with pytest.raises(ValueError, match="alpha must be positive"):
        lora.LoRALinear(nn.Linear(8, 8), rank=2, alpha=alpha)


def test_rank_above_min_dimension_warns():
    with pytest.warns(UserWarning, match=r"rank 10 is above min\(d_in, d_out\) = 6"):
        lora.LoRALinear(nn.Linear(8, 6), rank=10, alpha=10)


def test_a_target_that_is_not_linear_is_refused():
    with pytest.raises(TypeError, match="LlamaAttention, not a linear layer.*q_proj"):
        lora.add_lora(_model(LLAMA), ["self_attn"], rank=2, alpha=2)
    with pytest.raises(TypeError, match="not Embedding"):
        lora.LoRALinear(nn.Embedding(10, 4), rank=2, alpha=2)


def test_a_target_that_matches_nothing_lists_the_names():
    with pytest.raises(
        ValueError, match=r"matches no module.*q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"
    ):
        lora.add_lora(_model(LLAMA), ["query", "value"], rank=2, alpha=2)
    with pytest.raises(ValueError, match="target_modules is empty"):
        lora.add_lora(_model(LLAMA), [], rank=2, alpha=2)


def test_adding_lora_twice_is_refused():
    model = lora.add_lora(_model(LLAMA), ["q_proj"], rank=2, alpha=2)
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        lora.add_lora(model, ["q_proj"], rank=2, alpha=2)
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        lora.LoRALinear(model.model.layers[0].self_attn.q_proj, rank=2, alpha=2)


def test_an_adapter_for_other_targets_does_not_load():
    from peft import get_peft_model_state_dict

    base = _model(LLAMA)
    theirs = _peft_twin(base, ["q_proj"])
    ours = lora.add_lora(copy.deepcopy(base), ["q_proj", "v_proj"], rank=4, alpha=8)
    with pytest.raises(KeyError, match="missing .*v_proj"):
        lora.load_peft_adapter(ours, get_peft_model_state_dict(theirs))


def test_merge_without_adapters_is_an_error():
    with pytest.raises(ValueError, match="no LoRALinear"):
        lora.merge_lora(_model(LLAMA))


def test_init_schemes():
    model = lora.add_lora(_model(LLAMA), ["q_proj"], rank=2, alpha=2)
    layers = [layer for _, layer in lora.lora_layers(lora.init_lora_(model, "zeros"))]
    assert all(
        torch.count_nonzero(lay.lora_A.weight) == 0 and torch.count_nonzero(lay.lora_B.weight) == 0
        for lay in layers
    )
    lora.init_lora_(model, "random")
    assert all(torch.count_nonzero(lay.lora_B.weight) > 0 for lay in layers)
    lora.init_lora_(model, "peft")
    assert all(
        torch.count_nonzero(lay.lora_B.weight) == 0 and torch.count_nonzero(lay.lora_A.weight) > 0
        for lay in layers
    )
    with pytest.raises(ValueError, match="Unknown scheme"):
        lora.init_lora_(model, "gaussian")


def test_both_zero_gets_no_gradient_and_b_zero_gets_one():
    model = lora.add_lora(_model(LLAMA), ["q_proj", "v_proj"], rank=2, alpha=4)
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    for scheme, a_moves, b_moves in [("zeros", False, False), ("peft", False, True)]:
        lora.init_lora_(model, scheme)
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        for _, layer in lora.lora_layers(model):
            assert bool(layer.lora_A.weight.grad.abs().max() > 0) == a_moves
            assert bool(layer.lora_B.weight.grad.abs().max() > 0) == b_moves


def test_best_rank_k_is_eckart_young():
    torch.manual_seed(0)
    M = torch.randn(20, 12, dtype=torch.float64)
    S = torch.linalg.svdvals(M)
    for k in (1, 5, 12):
        approx = lora.best_rank_k(M, k)
        assert int(torch.linalg.matrix_rank(approx)) == k
        assert torch.isclose(torch.linalg.norm(M - approx), S[k:].pow(2).sum().sqrt())
    other = torch.randn(20, 5, dtype=torch.float64) @ torch.randn(5, 12, dtype=torch.float64)
    assert torch.linalg.norm(M - other) > torch.linalg.norm(M - lora.best_rank_k(M, 5))


def test_median_seconds_alternates_and_reports_each():
    calls = []
    t = timing.median_seconds(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1
    )
    assert set(t) == {"a", "b"} and all(v >= 0 for v in t.values())
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]


# The chapter's exercise checkers: the reference passes, a typical mistake gets a pointed hint.
