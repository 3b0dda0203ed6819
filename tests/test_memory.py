"""utils.memory: the estimate from a config equals the measurement on real models; published numbers.

Tolerances: weights, gradients and optimizer state must be equal to the byte (the estimate is exact for
these layouts); activations within ACTIVATION_TOLERANCE = 10% (on this stack they are equal to the byte too,
but another torch version or kernel may save slightly different tensors).
"""

import copy
import warnings

import pytest
import torch
from transformers import GPT2Config, LlamaConfig, LlamaForCausalLM, PretrainedConfig

from utils import counting, lora, memory

ACTIVATION_TOLERANCE = 0.10
EXACT = ("weights", "gradients", "optimizer")

# A 4-layer, hidden-512, MLP-1024 model scaled down so that a step takes milliseconds; two key/value heads for four query heads, so grouped-query attention is covered too.
SMALL = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
B, T = 4, 32


def _ids(vocab: int, batch: int = B, seq: int = T) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))


def _small(dtype=torch.float32, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{**SMALL, **overrides})).to(dtype)


def _peft(model, target_modules=None):
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(
            model, LoraConfig(r=8, lora_alpha=16, target_modules=target_modules, task_type="CAUSAL_LM")
        )


def _assert_matches(est: memory.TrainingMemory, meas: memory.TrainingMemory) -> None:
    for component in EXACT:
        assert getattr(est, component) == getattr(meas, component), component
    assert est.n_params == meas.n_params and est.n_trainable == meas.n_trainable
    forward_saved = est.activations - est.recompute
    assert abs(forward_saved - meas.activations) <= ACTIVATION_TOLERANCE * meas.activations, (
        forward_saved,
        meas.activations,
    )


# ------------------------------------------------------------------------- estimate against measurement


def test_tiny_course_model_full_and_lora_fp32(tiny):
    model, _ = tiny
    ids = _ids(model.config.vocab_size, 2, 32)
    full_est = memory.estimate_training_memory(
        model.config, "full", batch_size=2, seq_len=32, precision="fp32"
    )
    full = memory.measure_training_memory(model, ids)
    _assert_matches(full_est, full)
    assert full.n_params == 1_967_808 == counting.count_params(model.config)  # the course's 1.97 M parameters
    assert full.weights == 4 * full.n_params  # fp32; the tied head counts once
    assert full.optimizer == 8 * full.n_params + 4 * len(list(model.parameters()))  # moments + step counters

    adapted = lora.add_lora(copy.deepcopy(model), ["q_proj", "v_proj"], rank=8, alpha=16)
    lora_est = memory.estimate_training_memory(
        model.config, "lora", rank=8, batch_size=2, seq_len=32, precision="fp32"
    )
    measured = memory.measure_training_memory(adapted, ids)
    _assert_matches(lora_est, measured)
    assert measured.activations < full.activations  # frozen layers keep fewer tensors for backward


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
@pytest.mark.parametrize("method, targets", [("full", None), ("lora", None), ("lora", "all-linear")])
def test_random_llama_matches_measurement(precision, dtype, method, targets):
    model = _small(dtype)
    if method == "lora":
        model = _peft(model, targets)  # peft keeps the adapters in fp32 on a bf16 base
    est = memory.estimate_training_memory(
        model.config, method, target_modules=targets, batch_size=B, seq_len=T, precision=precision
    )
    _assert_matches(est, memory.measure_training_memory(model, _ids(SMALL["vocab_size"])))


@pytest.mark.parametrize("method", ["full", "lora"])
def test_gradient_checkpointing_keeps_layer_inputs(method):
    plain = memory.estimate_training_memory(
        LlamaConfig(**SMALL), method, batch_size=B, seq_len=T, precision="fp32"
    )
    model = _small()
    model.activation_checkpointing_enable()  # transformers 5: non-reentrant by default
    if method == "lora":
        model = _peft(model)
    est = memory.estimate_training_memory(
        model.config, method, batch_size=B, seq_len=T, precision="fp32", gradient_checkpointing=True
    )
    _assert_matches(est, memory.measure_training_memory(model, _ids(SMALL["vocab_size"])))
    assert est.recompute > 0 and est.activations < plain.activations


def test_eager_attention_saves_the_square_terms():
    model = _small(attn_implementation="eager")
    est = memory.estimate_training_memory(
        model.config, "full", batch_size=B, seq_len=T, precision="fp32", attention="eager"
    )
    _assert_matches(est, memory.measure_training_memory(model, _ids(SMALL["vocab_size"])))
    sdpa = memory.estimate_training_memory(model.config, "full", batch_size=B, seq_len=T, precision="fp32")
    # eager keeps the fp32 softmax (B x heads x T x T) where SDPA keeps a logsumexp (B x heads x T), and
    # under grouped-query attention full-width copies of k and v (repeat_kv) where SDPA reads them as they are
    heads, layers, width = SMALL["num_attention_heads"], SMALL["num_hidden_layers"], SMALL["hidden_size"]
    kv_width = width * SMALL["num_key_value_heads"] // heads
    square = 4 * B * heads * (T * T - T)
    repeat = 2 * 4 * B * T * (width - kv_width)
    assert est.activations - sdpa.activations == layers * (square + repeat)


@pytest.mark.parametrize("name, cls, kwargs", [("sgd", torch.optim.SGD, {"lr": 0.1}),
                                               ("sgd-momentum", torch.optim.SGD, {"lr": 0.1, "momentum": 0.9})])  # fmt: skip
def test_sgd_state(name, cls, kwargs):
    model = _small()
    est = memory.estimate_training_memory(
        model.config, "full", batch_size=B, seq_len=T, precision="fp32", optimizer=name
    )
    meas = memory.measure_training_memory(model, _ids(SMALL["vocab_size"]), cls, **kwargs)
    assert est.optimizer == meas.optimizer == (0 if name == "sgd" else 4 * meas.n_params)


def test_adamw_8bit_state():
    bnb = pytest.importorskip("bitsandbytes")
    model = _small(
        hidden_size=64, intermediate_size=64, vocab_size=128
    )  # tensors of 4,096+ and fewer elements
    est = memory.estimate_training_memory(
        model.config, "full", batch_size=2, seq_len=16, precision="fp32", optimizer="adamw-8bit"
    )
    meas = memory.measure_training_memory(model, _ids(128, 2, 16), bnb.optim.AdamW8bit)
    assert est.optimizer == meas.optimizer
    assert meas.optimizer < 0.5 * 8 * meas.n_params  # about 2 bytes per parameter instead of 8


def test_qlora_4bit_on_cpu_matches(tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    _small(hidden_size=128, intermediate_size=256).save_pretrained(tmp_path)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quant, dtype=torch.float32)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)  # non-4-bit -> fp32
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False  # on CPU: keeps 4-bit weights from being repacked
    model = _peft(model)
    est = memory.estimate_training_memory(model.config, "qlora", batch_size=2, seq_len=16, precision="fp32")
    _assert_matches(est, memory.measure_training_memory(model, _ids(SMALL["vocab_size"], 2, 16)))


def test_measure_leaves_the_model_unchanged_unless_inplace():
    model = _small()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    memory.measure_training_memory(model, {"input_ids": _ids(SMALL["vocab_size"])})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    memory.measure_training_memory(model, _ids(SMALL["vocab_size"]), inplace=True, lr=1e-2)
    assert not all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


# ----------------------------------------------------------------------------------- published numbers


def test_llama2_7b_full_mixed_precision_is_16_bytes_per_parameter():
    n = 6_738_415_616
    est = memory.estimate_training_memory("llama-2-7b", "full")  # mixed precision, AdamW
    assert est.n_params == n
    assert (est.weights, est.gradients) == (2 * n, 2 * n)
    tensors = 32 * 9 + 3  # 7 projections and 2 norms per layer; embedding, final norm, untied head
    assert est.optimizer == 12 * n + 4 * tensors  # master copy + two moments, and torch's step counters
    assert est.weights + est.gradients + est.optimizer - 4 * tensors == 16 * n
    assert memory.bytes_per_param("mixed") == {"weights": 2, "gradients": 2, "optimizer": 12}
    assert memory.bytes_per_param("fp32") == {"weights": 4, "gradients": 4, "optimizer": 8}
    assert memory.bytes_per_param("bf16") == {"weights": 2, "gradients": 2, "optimizer": 4}
    # activations at batch 1 x 512 tokens, 16-bit: 32 layers x (24 N H + 8 N I + small terms) + head
    per_layer = 24 * 512 * 4096 + 8 * 512 * 11008 + 8 * 512 + 4 * 32 * 512
    assert est.activations == 32 * per_layer + 2 * 2 * 512 * 128 + (4 + 2 + 2) * 512 * 4096 + 4 * 512 + 4 * 512 * 32000 + 8 * 512 + 4 + 8 * 512  # fmt: skip
    lora_est = memory.estimate_training_memory("llama-2-7b", "lora")
    assert lora_est.n_trainable == counting.count_lora_params(
        counting.known_config("llama-2-7b"), 8, ["q_proj", "v_proj"]
    )
    assert (
        lora_est.gradients == 4 * lora_est.n_trainable
        and lora_est.weights == 2 * n + 4 * lora_est.n_trainable
    )


def test_qlora_constants_and_65b_on_one_48gb_gpu():
    # QLoRA paper (arXiv 2305.14314): 4-bit NF4, one absmax per 64 weights; double quantization stores them
    # in 8 bits with an fp32 absmax per 256: 8/64 + 32/(64*256) = 0.127 bits per parameter (0.5 without)
    n = 8192 * 22016
    assert memory._nf4_bytes(n, True) * 8 / n - 4 == pytest.approx(0.127, abs=5e-4)
    assert memory._nf4_bytes(n, False) * 8 / n - 4 == pytest.approx(0.5, abs=5e-4)
    # "QLoRA reduces the average memory requirements of finetuning a 65B parameter model from >780GB of GPU
    # memory to <48GB". The paper's setup: LoRA r = 64 on every linear layer, gradient checkpointing; here
    # batch 1 x 512 tokens and peft's fp32 adapters, compared with a 48 GB card's 48 GiB.
    full = memory.estimate_training_memory("llama-65b", "full")
    assert full.weights + full.gradients + full.optimizer > 780e9
    q = memory.estimate_training_memory(
        "llama-65b", "qlora", rank=64, target_modules="all-linear", gradient_checkpointing=True, seq_len=512
    )
    assert 33e9 < q.weights - 4 * q.n_trainable < 36e9  # the 4-bit base: about 0.52 bytes per parameter
    assert q.total < 48 * 2**30
    # the 4-bit base against the 16-bit one: 0.516 / 2 bytes per quantized parameter, the embedding and head
    # in 16-bit
    assert memory.estimate_training_memory("llama-65b", "qlora").weights < 0.27 * full.weights


def test_zero_paper_example():
    # ZeRO paper (arXiv 1910.02054), figure 1: 7.5 B parameters, 64 GPUs, mixed-precision Adam (K = 12)
    got = [memory.zero_memory_per_gpu(7_500_000_000, 64, stage) / 1e9 for stage in (0, 1, 2, 3)]
    assert [round(g, 1) for g in got] == [120.0, 31.4, 16.6, 1.9]
    assert memory.zero_memory_per_gpu(1000, 1, 3) == memory.zero_memory_per_gpu(1000, 1, 0) == 16_000


def test_memory_table_side_by_side():
    rows = {m: memory.estimate_training_memory("llama-2-7b", m) for m in memory.METHODS}
    text = memory.memory_table(rows)
    lines = text.splitlines()
    assert lines[0].split("|")[2].strip() == "weights (GB)" and len(lines) == 2 + 3
    assert lines[2].split("|")[2].strip() == f"{rows['full'].weights / 1e9:.2f}" == "13.48"
    assert "|" in memory.memory_table(rows, unit="GiB") and "GiB" in memory.memory_table(rows, unit="GiB")
    ratio = memory.comparison_table(rows["full"], rows["full"]).splitlines()
    assert ratio[-1].endswith("| 1.000 |")


# ------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(method="dora"), "Unknown method 'dora': choose one of 'full', 'lora', 'qlora'"),
        (dict(precision="fp16"), "Unknown precision 'fp16': choose one of 'fp32', 'mixed', 'bf16'"),
        (dict(optimizer="adam"), "Unknown optimizer 'adam': choose one of 'adamw', 'adamw-8bit'"),
        (dict(rank=0), "rank must be a positive integer, got 0"),
        (dict(rank=-4, method="qlora"), "rank must be a positive integer, got -4"),
        (dict(batch_size=0), "batch_size must be a positive integer"),
        (dict(target_modules=["nope"]), "matches no linear layer"),
        (dict(attention="flash"), "Unknown attention 'flash'"),
    ],
)
def test_bad_arguments_raise_naming_the_problem(kwargs, message):
    args = {"method": "lora", **kwargs}
    with pytest.raises(ValueError, match=message):
        memory.estimate_training_memory(LlamaConfig(**SMALL), args.pop("method"), seq_len=T, **args)


def test_unsupported_families_raise():
    with pytest.raises(
        ValueError, match="models Llama-family decoders \\(llama, mistral, qwen2\\); this config is 'gpt2'"
    ):
        memory.estimate_training_memory(GPT2Config(n_layer=2, n_embd=32, n_head=4), "full")
    t5_like = PretrainedConfig()
    t5_like.model_type = "t5"
    with pytest.raises(
        ValueError, match="Counting supports the model types llama, mistral, qwen2, gpt2 and bert"
    ):
        memory.estimate_training_memory(t5_like, "full")
    with pytest.raises(ValueError, match="Unknown architecture 'llama-3-8b'"):
        memory.estimate_training_memory("llama-3-8b", "full")


def test_sequence_longer_than_the_model_warns():
    with pytest.warns(UserWarning, match="seq_len=4096 is above this model's max_position_embeddings=128"):
        memory.estimate_training_memory(LlamaConfig(**SMALL), "full", seq_len=4096)


def test_other_bad_inputs():
    with pytest.raises(ValueError, match="Unknown ZeRO stage 4"):
        memory.zero_memory_per_gpu(10, 2, 4)
    with pytest.raises(ValueError, match="n_gpus must be a positive integer"):
        memory.zero_memory_per_gpu(10, 0, 1)
    with pytest.raises(ValueError, match="Unknown unit 'gb'"):
        memory.memory_table({"full": memory.estimate_training_memory("llama-2-7b", "full")}, unit="gb")
    frozen = _small()
    frozen.requires_grad_(False)
    with pytest.raises(ValueError, match="No parameter of this model requires grad"):
        memory.measure_training_memory(frozen, _ids(SMALL["vocab_size"]))


# ------------------------------------------------------------------- one layer's activations (chapter 07)

MHA = {**SMALL, "num_key_value_heads": SMALL["num_attention_heads"]}


@pytest.mark.parametrize("precision, value_bytes", [("fp32", 4), ("bf16", 2)])
def test_llama_layer_formula_equals_the_op_walk_and_the_measurement(precision, value_bytes):
    config = LlamaConfig(**MHA)
    walk = memory.layer_activation_bytes(config, batch_size=B, seq_len=T, precision=precision)
    formula = memory.llama_layer_activation_bytes(
        B, T, MHA["hidden_size"], MHA["intermediate_size"], MHA["num_attention_heads"], value_bytes
    )
    assert walk == [formula] * MHA["num_hidden_layers"]
    # one layer more adds exactly one layer's bytes to the measurement (RoPE's cos/sin and the head are shared)
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    ids = _ids(MHA["vocab_size"])
    one, two = (memory.measure_training_memory(_small(dtype, num_key_value_heads=4, num_hidden_layers=n), ids)
                for n in (1, 2))  # fmt: skip
    assert two.activations - one.activations == formula


def test_layer_bytes_cover_gqa_eager_and_lora():
    config = LlamaConfig(**SMALL)
    gqa = memory.layer_activation_bytes(config, batch_size=B, seq_len=T)
    mha = memory.llama_layer_activation_bytes(B, T, 128, 256, 4)
    assert gqa[0] == mha - 2 * 4 * B * T * (128 - 64)  # k and v are half as wide under 2 of 4 kv heads
    eager = memory.layer_activation_bytes(config, batch_size=B, seq_len=T, attention="eager")
    assert eager[0] - gqa[0] == 4 * B * 4 * (T * T - T) + 2 * 4 * B * T * (128 - 64)
    lora = memory.layer_activation_bytes(config, batch_size=B, seq_len=T, method="lora")
    assert len(lora) == 2 and lora[0] < gqa[0]
    est = memory.estimate_training_memory(config, "lora", batch_size=B, seq_len=T, precision="fp32")
    assert sum(lora) < est.activations


def test_korthikanti_gpt_layer():
    # arXiv 2205.05198, equation 1: s b h (34 + 5 a s / h); GPT-3 175B: s = 2048, h = 12288, a = 96
    got = memory.korthikanti_layer_bytes(1, 2048, 12288, 96)
    assert got == 2048 * 12288 * (34 + 5 * 96 * 2048 // 12288) == 34 * 2048 * 12288 + 5 * 96 * 2048**2
    with pytest.raises(ValueError, match="n_heads must be a positive integer"):
        memory.korthikanti_layer_bytes(1, 8, 8, 0)
    with pytest.raises(ValueError, match="bytes_per_value must be 4 \\(fp32\\) or 2"):
        memory.llama_layer_activation_bytes(1, 8, 8, 8, 2, 8)


def test_saved_tensor_bytes_counts_what_backward_needs():
    layer = torch.nn.Linear(8, 4)
    x = torch.randn(5, 8)
    out, saved = memory.saved_tensor_bytes(lambda: layer(x), exclude=layer.parameters())
    assert out.shape == (5, 4) and saved == 5 * 8 * 4  # the input, for the weight's gradient
    _, with_params = memory.saved_tensor_bytes(lambda: layer(x))
    assert with_params == saved  # x needs no gradient, so the weight is not saved
    with torch.no_grad():
        assert memory.saved_tensor_bytes(lambda: layer(x))[1] == 0


def _blocks():
    torch.manual_seed(0)
    return torch.nn.ModuleList(
        torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 16))
        for _ in range(3)
    )


@pytest.mark.parametrize("input_requires_grad", [False, True])
def test_checkpointed_forward_same_gradients_fewer_bytes(input_requires_grad):
    blocks, x = _blocks(), torch.randn(10, 16, requires_grad=input_requires_grad)

    def grads(forward):
        blocks.zero_grad(set_to_none=True)
        out, saved = memory.saved_tensor_bytes(forward, exclude=blocks.parameters())
        out.pow(2).sum().backward()
        return [p.grad.clone() for p in blocks.parameters()], saved

    def plain():
        h = x
        for block in blocks:
            h = block(h)
        return h

    g_plain, saved_plain = grads(plain)
    g_ckpt, saved_ckpt = grads(lambda: memory.checkpointed_forward(blocks, x))
    assert all(torch.equal(a, b) for a, b in zip(g_plain, g_ckpt, strict=True))
    assert saved_ckpt == 3 * 10 * 16 * 4 < saved_plain  # one input per block


def test_transformers_and_manual_checkpointing_give_the_same_gradients():
    ids = _ids(SMALL["vocab_size"])

    def grads(model):
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    plain = grads(_small())
    api = _small()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the 5.23 name does not warn
        memory.enable_checkpointing(api)
    manual = _small()
    assert memory.checkpoint_decoder_layers(manual) == SMALL["num_hidden_layers"]
    for other in (grads(api), grads(manual)):
        assert other.keys() == plain.keys() and all(torch.equal(plain[k], other[k]) for k in plain)


def test_the_lora_trap_of_reentrant_checkpointing():
    ids = _ids(SMALL["vocab_size"])
    trapped = _peft(_small())
    memory.checkpoint_decoder_layers(trapped, use_reentrant=True)
    with pytest.warns(UserWarning, match="None of the inputs have requires_grad=True"):
        loss = trapped(input_ids=ids, labels=ids).loss
    assert not loss.requires_grad  # nothing reaches the adapters: backward() would raise
    for fix in ("enable_input_require_grads", "non-reentrant"):
        model = _peft(_small())
        memory.checkpoint_decoder_layers(model, use_reentrant=fix == "enable_input_require_grads")
        if fix == "enable_input_require_grads":
            model.enable_input_require_grads()
        model(input_ids=ids, labels=ids).loss.backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad), fix


def test_checkpointing_bad_input():
    with pytest.raises(ValueError, match="Linear does not support transformers' gradient checkpointing"):
        memory.enable_checkpointing(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="Found no decoder layers"):
        memory.checkpoint_decoder_layers(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="every_n_layers must be a positive integer"):
        memory.enable_checkpointing(_small(), every_n_layers=0)
