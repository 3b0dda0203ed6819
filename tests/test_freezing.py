"""utils.freezing: what each helper leaves trainable, and the bad inputs it refuses."""

import copy

import pytest
import torch

from utils import freezing, train
from utils.checks.ch06 import (
    _tiny_bert_classifier,
    _tiny_llama_classifier,
    _tiny_llama_lm,
    changed_by_one_step,
)


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_freeze_by_pattern_and_a_pattern_that_matches_nothing():
    bert = _tiny_bert_classifier()
    frozen = freezing.freeze(bert, [r"embeddings\.", r"encoder\.layer\.0\."])
    assert frozen and all(not p.requires_grad for n, p in bert.named_parameters() if n in frozen)
    assert "classifier.weight" in trainable(bert)
    with pytest.raises(ValueError, match=r"matches no parameter name\. The names are: bert\.embeddings"):
        freezing.freeze(bert, r"model\.layers\.0")
    with pytest.raises(ValueError, match="at least one"):
        freezing.freeze(bert, [])


def test_freeze_all_but_head_matches_the_interview_answer():
    bert = _tiny_bert_classifier()
    reference = copy.deepcopy(bert)
    for p in reference.bert.parameters():
        p.requires_grad = False
    assert freezing.freeze_all_but_head(bert) == ["classifier.weight", "classifier.bias"]
    assert trainable(bert) == trainable(reference)
    assert changed_by_one_step(bert) == {"classifier.weight", "classifier.bias"}
    llama = _tiny_llama_classifier()
    assert freezing.freeze_all_but_head(llama) == ["score.weight"]


def test_bottom_and_top_layers_and_k_out_of_range():
    lm = _tiny_llama_lm(3, tied=True)
    frozen = freezing.freeze_bottom_layers(lm, 2)
    assert "model.embed_tokens.weight" in frozen and not lm.lm_head.weight.requires_grad  # tied: one tensor
    assert {n.split(".")[2] for n in frozen if n.startswith("model.layers.")} == {"0", "1"}
    assert changed_by_one_step(lm, labels="lm") == trainable(lm)
    top = freezing.freeze_top_layers(_tiny_llama_lm(3), 1)
    assert {n.split(".")[2] for n in top} == {"2"}
    for fn in (freezing.freeze_bottom_layers, freezing.freeze_top_layers, freezing.train_top_layers):
        with pytest.raises(ValueError, match="from 0 to the number of layers, 3"):
            fn(_tiny_llama_lm(3), 4)
    bert = _tiny_bert_classifier()
    names = freezing.train_top_layers(bert, 1)
    assert any(".pooler." in n for n in names) and all("layer.0." not in n for n in names)


def test_bitfit_trains_biases_and_the_head():
    bert = _tiny_bert_classifier()
    names = freezing.bitfit(bert)
    assert "classifier.weight" in names and all(
        n.endswith("bias") or n.startswith("classifier.") for n in names
    )


def test_gradual_unfreezing_schedule_and_callback():
    assert [freezing.unfrozen_layers(e, 3) for e in range(5)] == [[], [2], [1, 2], [0, 1, 2], [0, 1, 2]]
    with pytest.raises(ValueError, match="non-negative"):
        freezing.unfrozen_layers(-1, 3)
    model = _tiny_llama_classifier()
    callback = freezing.gradual_unfreezing(model)
    callback(0)
    assert trainable(model) == {"score.weight", "model.norm.weight"}
    callback(1)
    assert any(n.startswith("model.layers.1.") for n in trainable(model))
    assert not any(n.startswith("model.layers.0.") for n in trainable(model))


def test_gradual_unfreezing_in_the_loop_updates_layers_unfrozen_later():
    model = _tiny_llama_classifier()
    freezing.freeze_all_but_head(model)
    before = model.model.layers[1].mlp.up_proj.weight.detach().clone()
    rows = [{"input_ids": [1, 2, 3, 4], "labels": i % 3} for i in range(8)]
    train.train_loop(model, rows, pad_token_id=0, epochs=2, batch_size=4, lr=1e-2,
                     params=list(model.parameters()), on_epoch_start=freezing.gradual_unfreezing(model))  # fmt: skip
    assert not torch.equal(model.model.layers[1].mlp.up_proj.weight, before)


def test_nothing_trainable_is_an_error_for_the_helpers():
    model = _tiny_llama_classifier()
    for p in model.parameters():
        p.requires_grad = False
    with pytest.raises(ValueError, match="Nothing in this model is trainable"):
        freezing.require_trainable(model)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train.train_loop(model, [{"input_ids": [1, 2], "labels": 0}], pad_token_id=0)


def test_apply_strategy_names_and_lora():
    with pytest.raises(ValueError, match="Unknown strategy 'probe'"):
        freezing.apply_strategy(_tiny_llama_classifier(), "probe")
    lora = freezing.apply_strategy(_tiny_llama_classifier(), "lora", rank=2)
    names = trainable(lora)
    assert any("lora_A" in n for n in names) and any("score" in n for n in names)
    bitfit = freezing.apply_strategy(_tiny_llama_classifier(), "bitfit")
    assert trainable(bitfit) == {"score.weight"}  # a Llama has no biases: BitFit is the head alone


def test_run_strategy_measures_twelve_bytes_per_trainable_parameter():
    rows = [{"input_ids": [1, 2, 3, 4, 5], "labels": i % 3} for i in range(20)]
    r = freezing.run_strategy(
        _tiny_llama_classifier, "top-k + head", rows, rows[:6], 0, lr=1e-2, epochs=2, batch_size=4
    )
    assert r["trainable"] > 0 and 0 <= r["accuracy"] <= 1 and r["seconds_per_step"] > 0
    assert abs(r["grad_optimizer_bytes"] - 12 * r["trainable"]) < 4 * 20 + 1
