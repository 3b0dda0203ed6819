"""utils.counting: closed-form counts equal the real model on the meta device and peft's counts."""

import warnings

import pytest
import torch
from transformers import (
    BertConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

from utils import counting

# The real architectures: the values of their published config.json files, written out in utils.counting.
GPT2_124M = counting.known_config("gpt2")
LLAMA2_7B = counting.known_config("llama-2-7b")
QWEN25_05B = counting.known_config("qwen2.5-0.5b")

SMALL = {
    "gpt2": (GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0),
             ["c_attn", "c_proj", "c_fc"]),
    "llama-biases-untied": (LlamaConfig(hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, vocab_size=100, tie_word_embeddings=False,
                                        attention_bias=True, mlp_bias=True), "all-linear"),
    "qwen2": (Qwen2Config(hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=100, tie_word_embeddings=True),
              ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "mistral-head-dim": (MistralConfig(hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=1, vocab_size=100, head_dim=16), ["q_proj", "v_proj"]),
    "bert": (BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        max_position_embeddings=64, num_labels=3), ["query", "value", "dense"]),
}  # fmt: skip
PEFT_TASK = {"causal-lm": "CAUSAL_LM", "seq-cls": "SEQ_CLS", "base": None}


def _meta(config, task="causal-lm"):
    return counting.meta_model(config, task)


def _peft(model, rank, targets, task="causal-lm", modules_to_save=None):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, task_type=PEFT_TASK[task],
                        modules_to_save=modules_to_save)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(model, config)


def test_lora_count_of_one_layer_and_its_ratio():
    assert counting.lora_params_per_linear(4096, 4096, 8) == 65_536
    assert counting.lora_fraction(4096, 4096, 8) == pytest.approx(65_536 / 16_777_216)  # 0.39 %
    assert counting.lora_params_per_linear(896, 128, 16) == 16 * 1024


@pytest.mark.parametrize("name", list(counting.KNOWN_CONFIGS))
def test_known_architectures_match_the_meta_model_and_the_published_totals(name):
    config, total = counting.known_config(name), counting.KNOWN_CONFIGS[name]["params"]
    assert counting.count_params(config) == total
    assert sum(p.numel() for p in counting.meta_model(config).parameters()) == total


def test_an_unknown_architecture_lists_the_known_ones():
    with pytest.raises(ValueError, match="llama-2-7b"):
        counting.known_config("llama-7")


@pytest.mark.parametrize(
    "config,targets,expected",
    [
        (GPT2_124M, ["c_attn"], 294_912),  # 12 layers * 8 * (768 + 2304)
        (LLAMA2_7B, ["q_proj", "v_proj"], 4_194_304),  # 32 * 2 * 8 * (4096 + 4096)
        (QWEN25_05B, "all-linear", 4_399_104),
    ],
    ids=["gpt2", "llama2", "qwen2.5"],
)
def test_real_architectures_lora_counts_equal_peft(config, targets, expected, capsys):
    assert counting.count_lora_params(config, 8, targets) == expected
    model = _peft(_meta(config), 8, targets)
    assert counting.lora_trainable_counts(config, 8, targets) == model.get_nb_trainable_parameters()
    model.print_trainable_parameters()
    theirs = capsys.readouterr().out
    counting.print_trainable_parameters(config, 8, targets)
    assert capsys.readouterr().out == theirs


@pytest.mark.parametrize("name", SMALL)
@pytest.mark.parametrize("task", ["causal-lm", "seq-cls", "base"])
def test_every_family_and_task_matches_the_model_and_peft(name, task):
    config, targets = SMALL[name]
    if name == "bert" and task == "causal-lm":
        pytest.skip("BERT is an encoder")
    model = _meta(config, task)
    linears = {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"
    }
    specs = {s.name: s for s in counting.linear_layers(config, task)}
    assert specs.keys() == linears.keys()
    for n, spec in specs.items():
        weight = linears[n].weight
        assert tuple(weight.shape) in ((spec.d_out, spec.d_in), (spec.d_in, spec.d_out))  # Linear or Conv1D
        assert (linears[n].bias is not None) == spec.bias, n
    assert counting.count_params(config, task) == sum(p.numel() for p in model.parameters())
    peft_model = _peft(model, 4, targets, task)
    assert (
        counting.lora_trainable_counts(config, 4, targets, task) == peft_model.get_nb_trainable_parameters()
    )


def test_modules_to_save_count_twice_in_all_like_peft():
    config, _ = SMALL["bert"]
    peft_model = _peft(
        _meta(config, "seq-cls"), 4, ["query", "value"], "seq-cls", modules_to_save=["pooler.dense"]
    )
    predicted = counting.lora_trainable_counts(config, 4, ["query", "value"], "seq-cls", ["pooler.dense"])
    assert predicted == peft_model.get_nb_trainable_parameters()
    d, labels = 32, 3
    lora = 2 * 2 * 4 * (d + d)
    assert predicted[0] == lora + (d * d + d) + (d * labels + labels)  # LoRA + pooler + classifier


def test_trainable_line_format_is_peft_s():
    assert counting.trainable_line(294_912, 124_734_720) == (
        "trainable params: 294,912 || all params: 124,734,720 || trainable%: 0.2364"
    )


def test_bad_input_is_explained():
    with pytest.raises(ValueError, match="matches no linear layer; there are: c_attn, c_proj, c_fc"):
        counting.count_lora_params(GPT2_124M, 8, ["q_proj"])
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        counting.count_lora_params(GPT2_124M, 0, ["c_attn"])
    with pytest.raises(ValueError, match="model types"):
        counting.count_params(type("Cfg", (), {"model_type": "t5"})())
    with pytest.raises(ValueError, match="Unknown task"):
        counting.count_params(LLAMA2_7B, task="token-cls")
    with pytest.raises(ValueError, match="encoder"):
        counting.count_params(SMALL["bert"][0], task="causal-lm")
    with pytest.raises(ValueError, match="modules_to_save entry 'pooler'"):
        counting.lora_trainable_counts(LLAMA2_7B, 8, ["q_proj"], modules_to_save=["pooler"])


def test_human_readable_counts():
    assert counting.human(6_738_415_616) == "6.74 B"
    assert counting.human(4_194_304) == "4.19 M"
    assert counting.human(512) == "512"
