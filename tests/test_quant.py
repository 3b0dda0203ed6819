"""utils.quant against bitsandbytes: code books, NF4/FP4 codes, absmax, dequantized weights, double
quantization; the CPU 4-bit trap reproduced and guarded; bad input."""

import math

import pytest
import torch

from utils import models, quant, sft, train

bnb = pytest.importorskip("bitsandbytes")
bnb_f = pytest.importorskip("bitsandbytes.functional")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def random_weights():
    torch.manual_seed(0)
    outlier = torch.randn(128, 256) * 0.02
    outlier[3, 7] = 1.5  # one block with an outlier
    yield "normal", torch.randn(192, 512) * 0.02
    yield "outlier", outlier
    yield "uniform", torch.rand(64, 64) - 0.5
    yield "bf16", (torch.randn(96, 128) * 0.05).to(torch.bfloat16)


@pytest.fixture(scope="module")
def tiny_weights():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(models.base_model_path())
    layer = model.model.layers[0]
    return {
        "q_proj": layer.self_attn.q_proj.weight.detach().clone(),
        "down_proj": layer.mlp.down_proj.weight.detach().clone(),
        "embed_tokens": model.model.embed_tokens.weight.detach().clone(),
    }


# Code books


def test_nf4_code_book_equals_bitsandbytes():
    ours, theirs = quant.nf4_code_book(), bnb_f.get_4bit_type("nf4", device="cpu")
    assert ours.shape == (16,) and ours.dtype == torch.float32
    assert (ours - theirs).abs().max() <= 1e-7
    assert ours[0] == -1 and ours[-1] == 1 and ours[7] == 0 and torch.all(ours[1:] > ours[:-1])
    assert abs(quant.NF4_OFFSET - ((1 - 1 / 30) + (1 - 1 / 32)) / 2) < 1e-7  # the paper's offset


def test_fp4_and_dynamic_code_books_equal_bitsandbytes():
    assert torch.equal(quant.fp4_code_book(), bnb_f.get_4bit_type("fp4", device="cpu"))
    assert torch.equal(quant.dynamic_code_book(), bnb_f.create_dynamic_map())


# 4-bit codes, absmax and dequantized weights


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("block_size", [64, 128])
def test_4bit_equals_bitsandbytes_on_random_weights(quant_type, block_size):
    for name, weight in random_weights():
        packed, state = bnb_f.quantize_4bit(weight, blocksize=block_size, quant_type=quant_type)
        ours = quant.quantize_4bit(weight, block_size, quant_type)
        assert torch.equal(ours.packed, packed.reshape(-1)), name
        assert torch.equal(ours.absmax, state.absmax), name
        assert torch.equal(ours.codes, quant.unpack_4bit(packed, weight.numel())), name
        if weight.shape[-1] % block_size == 0:  # see the next test for blocks longer than a row
            back = bnb_f.dequantize_4bit(packed, state)
            assert torch.equal(quant.dequantize_4bit(ours).to(weight.dtype), back), name


def test_bitsandbytes_cpu_dequantize_with_blocks_longer_than_a_row():
    """bitsandbytes 0.50.2's CPU dequantize_4bit kernel goes wrong when a block is longer than a row
    (here rows of 64, blocks of 128): the codes and absmax it stored are ours, and our dequantization of
    them is closer to the weights than its own. Real layers have rows of at least 64."""
    torch.manual_seed(0)
    weight = torch.rand(64, 64) - 0.5
    packed, state = bnb_f.quantize_4bit(weight, blocksize=128, quant_type="nf4")
    ours = quant.dequantize_4bit(quant.quantize_4bit(weight, 128))
    theirs = bnb_f.dequantize_4bit(packed, state)
    assert (ours - weight).abs().max() < (theirs - weight).abs().max()


def test_nf4_equals_bitsandbytes_on_tiny_model_weights(tiny_weights):
    for name, weight in tiny_weights.items():
        packed, state = bnb_f.quantize_4bit(weight, blocksize=64, quant_type="nf4")
        ours = quant.quantize_nf4(weight)
        assert torch.equal(ours.packed, packed.reshape(-1)), name
        assert torch.equal(ours.absmax, state.absmax), name
        assert torch.equal(quant.dequantize_nf4(ours), bnb_f.dequantize_4bit(packed, state)), name


def test_nf4_equals_the_weights_of_a_model_loaded_in_4bit(tiny_weights):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    model = AutoModelForCausalLM.from_pretrained(models.base_model_path(), quantization_config=config)
    layer = model.model.layers[0].self_attn.q_proj
    ours = quant.quantize_nf4(tiny_weights["q_proj"])
    assert torch.equal(ours.packed, layer.weight.data.reshape(-1))
    assert torch.equal(ours.absmax, layer.weight.quant_state.absmax)


def test_pack_unpack_round_trip_and_layout():
    codes = torch.tensor([1, 2, 15, 0, 7], dtype=torch.uint8)
    packed = quant.pack_4bit(codes)
    assert packed.tolist() == [0x12, 0xF0, 0x70]  # high nibble first, a zero appended to an odd count
    assert torch.equal(quant.unpack_4bit(packed, 5), codes)


def test_block_size_that_does_not_divide_is_padded_like_bitsandbytes():
    torch.manual_seed(1)
    weight = torch.randn(10, 13) * 0.02  # 130 values: two blocks of 64 and a short one of 2
    ours = quant.quantize_nf4(weight)
    packed, state = bnb_f.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    assert ours.absmax.shape == (3,) and torch.equal(ours.absmax, state.absmax)
    assert torch.equal(ours.packed, packed.reshape(-1))
    assert quant.dequantize_nf4(ours).shape == (10, 13)
    assert torch.allclose(quant.dequantize_nf4(ours), bnb_f.dequantize_4bit(packed, state), atol=0, rtol=0)


def test_nf4_beats_int4_and_fp4_on_normal_weights():
    torch.manual_seed(0)
    weight = torch.randn(256, 256)
    mse = {
        t: (quant.quantize_dequantize(weight, t) - weight).pow(2).mean().item()
        for t in ("int4", "fp4", "nf4")
    }
    assert mse["nf4"] < mse["int4"] and mse["nf4"] < mse["fp4"]


# Block-wise absmax


def test_absmax_int8_error_bound_and_outlier():
    torch.manual_seed(0)
    x = torch.randn(4096) * 0.02
    q, absmax = quant.absmax_quantize(x)
    assert q.dtype == torch.int8 and q.abs().max() == 127
    assert (quant.absmax_dequantize(q, absmax) - x).abs().max() <= absmax / 254 + 1e-9
    x[0] = 2.0  # one outlier
    per_tensor = (quant.quantize_dequantize(x, "int8", block_size=None) - x).pow(2).mean()
    per_block = (quant.quantize_dequantize(x, "int8", block_size=64) - x).pow(2).mean()
    assert per_block < per_tensor / 10


def test_blockwise_absmax_shapes_and_padding():
    x = torch.arange(1, 11, dtype=torch.float32)
    q, absmax = quant.absmax_quantize_blockwise(x, block_size=4)
    assert q.shape == (3, 4) and absmax.tolist() == [4.0, 8.0, 10.0]
    assert q[0].tolist() == [32, 64, 95, 127]  # round(127 * x / 4); 95.25 -> 95
    back = quant.absmax_dequantize_blockwise(q, absmax, x.shape)
    assert back.shape == (10,) and (back - x).abs().max() <= 10 / 254


# Double quantization


def test_double_quantization_matches_bitsandbytes():
    torch.manual_seed(0)
    weight = torch.randn(1024, 768) * 0.02
    packed, state = bnb_f.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
    absmax = quant.quantize_nf4(weight).absmax
    dq = quant.double_quantize(absmax)
    assert torch.equal(dq.offset, state.offset) and torch.equal(dq.absmax, state.state2.absmax)
    assert torch.equal(dq.code_book, state.state2.code)
    differ = dq.codes != state.absmax
    # bitsandbytes' CPU kernel finds codes by an approximate binary search: a few land on the neighbour
    assert differ.float().mean() < 0.005 and (dq.codes.int() - state.absmax.int())[differ].abs().max() <= 1
    # the inverse is exact given the same codes
    theirs = quant.DoubleQuantized(state.absmax, state.state2.absmax, state.offset, dq.code_book, 256)
    rebuilt = bnb_f.dequantize_blockwise(state.absmax, state.state2) + state.offset
    assert torch.equal(quant.dequantize_absmax(theirs), rebuilt)
    ours_weight = quant.dequantize_nf4(quant.quantize_nf4(weight), quant.dequantize_absmax(theirs))
    assert torch.equal(ours_weight, bnb_f.dequantize_4bit(packed, state))
    # ours is the nearest code: the rebuilt constants are at least as close as bitsandbytes'
    assert (quant.dequantize_absmax(dq) - absmax).abs().sum() <= (rebuilt - absmax).abs().sum()


def test_bits_per_parameter_derivation_and_measurement():
    assert quant.constant_bits_per_parameter(64, double_quant=False) == 0.5
    assert math.isclose(quant.constant_bits_per_parameter(64, True), 8 / 64 + 32 / (64 * 256))
    assert round(quant.constant_bits_per_parameter(), 3) == 0.127
    assert quant.bits_per_parameter(double_quant=False) == 4.5
    torch.manual_seed(0)
    weight = torch.randn(2048, 2048)
    for double_quant, want in [(False, 0.5), (True, 0.127)]:
        _, state = bnb_f.quantize_4bit(
            weight, blocksize=64, quant_type="nf4", compress_statistics=double_quant
        )
        bits = quant.quant_state_bits(state, weight.numel())
        assert round(bits["constants"], 3) == want and bits["tables"] < 0.003


# The CPU trap and the guard


def _qlora(fix: bool):
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(models.base_model_path(), quantization_config=config)
    if fix:
        assert quant.prepare_4bit_for_cpu_training(model) == 7 * model.config.num_hidden_layers
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    torch.manual_seed(0)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    return model, AutoTokenizer.from_pretrained(models.base_model_path())


def _examples(tokenizer, n=32):
    rows = [
        {"messages": [{"role": "user", "content": f"What is {i} plus {i + 1}?"},
                      {"role": "assistant", "content": str(2 * i + 1)}]}
        for i in range(n)
    ]  # fmt: skip
    return sft.tokenize_rows(tokenizer, rows)


def _eval_forward(model, batch):
    model.eval()
    with torch.no_grad():
        model(**batch)
    model.train()


def _train(model, tokenizer, examples, guard):
    batch = sft.collate(examples[:8], tokenizer.pad_token_id)
    return train.train_loop(
        model, examples, pad_token_id=tokenizer.pad_token_id, batch_size=8, max_steps=6, epochs=2, lr=5e-3,
        eval_fn=lambda m: _eval_forward(m, batch) or {"eval_loss": 0.0}, eval_every=2,
        on_gradients=guard, log_every=1,
    )  # fmt: skip


@pytest.mark.skipif(
    not bnb_f.has_avx512bf16(), reason="the repacking trap needs a CPU with AVX512-BF16 (this one has none)"
)
def test_trap_reproduced_without_the_fix_and_caught_by_the_guard():
    model, tokenizer = _qlora(fix=False)
    examples = _examples(tokenizer)
    batch = sft.collate(examples[:8], tokenizer.pad_token_id)
    _eval_forward(model, batch)
    with pytest.warns(UserWarning, match="gemv_4bit"):
        model(**batch).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n]
    assert sum(g is None or not g.any() for g in grads) > len(grads) // 2  # most adapters get nothing
    clean, _ = _qlora(fix=True)
    clean(**batch).loss.backward()
    want = [p.grad for n, p in clean.named_parameters() if p.requires_grad and "lora_B" in n]
    assert not any(torch.allclose(g, w) for g, w in zip(grads, want[:-1], strict=False))  # wrong, not only 0
    model, tokenizer = _qlora(fix=False)
    guard = quant.LearningGuard(model)
    with pytest.raises(quant.NotLearningError, match="prepare_4bit_for_cpu_training"):
        with pytest.warns(UserWarning):
            _train(model, tokenizer, examples, guard)
    assert guard.history[-1][0] == 2  # the last step checked before the first evaluation (at step 2)


def test_fix_keeps_gradients_identical_to_a_run_without_evaluation():
    model, tokenizer = _qlora(fix=True)
    batch = sft.collate(_examples(tokenizer)[:8], tokenizer.pad_token_id)
    model(**batch).loss.backward()
    clean = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    _eval_forward(model, batch)
    model(**batch).loss.backward()
    after = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(torch.equal(clean[n], after[n]) for n in clean)
    model, tokenizer = _qlora(fix=True)
    guard = quant.LearningGuard(model)
    history = _train(model, tokenizer, _examples(tokenizer), guard)
    assert len(guard.history) == 6 and all(dead == 0 for _, _, dead in guard.history[1:])
    assert history[-1]["loss"] < history[0]["loss"]


def test_prepare_refuses_an_already_repacked_model():
    if not bnb_f.has_avx512bf16():
        pytest.skip("weights are repacked only on CPUs with AVX512-BF16")
    model, tokenizer = _qlora(fix=False)
    _eval_forward(model, sft.collate(_examples(tokenizer)[:2], tokenizer.pad_token_id))
    with pytest.raises(RuntimeError, match="Load the model again"):
        quant.prepare_4bit_for_cpu_training(model)


def test_guard_catches_a_loss_that_does_not_move_and_frozen_graph():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    guard = quant.LearningGuard(model, loss_window=3)
    for step in (1, 2):
        model.zero_grad()
        model(torch.ones(2, 4)).sum().backward()
        guard(step, 1.0)
    with pytest.raises(quant.NotLearningError, match="has not moved"):
        guard(3, 1.0)
    guard = quant.LearningGuard(model)
    model.zero_grad(set_to_none=True)
    guard(1, 1.0)  # the grace step: no gradient yet is allowed (LoRA's A at B = 0)
    with pytest.raises(quant.NotLearningError, match="got no gradient"):
        guard(2, 0.9)
    with pytest.raises(quant.NotLearningError, match="nan"):
        quant.LearningGuard(model, grace_steps=5)(1, float("nan"))


def test_train_loop_without_the_hook_is_unchanged_and_calls_it_with_steps():
    seen = []
    model = torch.nn.Linear(3, 1)

    def loss_fn(m, batch):
        return (m(batch["x"]) - batch["y"]).pow(2).mean()

    rows = [{"x": [float(i), 1.0, -1.0], "y": [float(i)]} for i in range(8)]
    collate = lambda b: {k: torch.tensor([r[k] for r in b]) for k in ("x", "y")}  # noqa: E731
    train.train_loop(model, rows, collate_fn=collate, loss_fn=loss_fn, batch_size=4, epochs=2,
                     on_gradients=lambda step, loss: seen.append((step, loss)))  # fmt: skip
    assert [s for s, _ in seen] == [1, 2, 3, 4] and all(math.isfinite(v) for _, v in seen)


# No backend, and bad input


def test_no_4bit_backend_explains_and_falls_back(capsys):
    model, tokenizer, quantized = quant.load_model_4bit(
        backend=(False, "this bitsandbytes has no CPU kernels")
    )
    out = capsys.readouterr().out
    assert not quantized and "not available here: this bitsandbytes has no CPU kernels" in out
    assert "Falling back" in out and not quant.linear_4bit_layers(model)
    assert next(model.parameters()).dtype == torch.float32


def test_four_bit_backend_on_this_machine():
    ok, why = quant.four_bit_backend("cpu")
    assert ok and why == ""
    if not torch.cuda.is_available():
        ok, why = quant.four_bit_backend("cuda")
        assert not ok and "no CUDA GPU" in why


def test_load_model_4bit_on_cpu_is_guarded():
    model, _, quantized = quant.load_model_4bit()
    layers = quant.linear_4bit_layers(model)
    assert quantized and len(layers) == 7 * model.config.num_hidden_layers
    assert not any(m.support_avx512bf16_for_cpu for _, m in layers)
    assert layers[0][1].weight.quant_state.quant_type == "nf4" and layers[0][1].weight.quant_state.nested


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: quant.quantize_nf4(torch.arange(64)), TypeError, "float tensor"),
        (lambda: quant.absmax_quantize(torch.ones(4, dtype=torch.int32)), TypeError, "float tensor"),
        (lambda: quant.quantize_4bit(torch.randn(64), quant_type="int4"), ValueError, "Unknown quant_type"),
        (lambda: quant.quantize_dequantize(torch.randn(64), "nf3"), ValueError, "Unknown quant_type"),
        (lambda: quant.quantize_nf4(torch.randn(64), block_size=0), ValueError, "positive integer"),
        (lambda: quant.quantize_nf4(torch.empty(0)), ValueError, "empty"),
        (lambda: quant.quantize_nf4([1.0, 2.0]), TypeError, "torch.Tensor"),
        (lambda: quant.double_quantize(torch.ones(4, 4)), ValueError, "1-D"),
        (lambda: quant.absmax_quantize(torch.ones(4), bits=1), ValueError, "between 2 and 16"),
        (lambda: quant.load_model_4bit(quant_type="int8"), ValueError, "Unknown quant_type"),
        (
            lambda: quant.dequantize_nf4(quant.quantize_4bit(torch.randn(64), quant_type="fp4")),
            ValueError,
            "not NF4",
        ),
    ],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()
