import math

import pytest
import torch
import torch.nn.functional as F

from utils import data, metrics


def test_perplexity_is_exp_of_token_weighted_mean_nll(tiny):
    model, tok = tiny
    texts = data.load_corpus("valid")[:6]
    total, count = 0.0, 0
    for text in texts:  # one at a time, no padding: the definition written out
        ids = torch.tensor([[tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"]]])
        with torch.no_grad():
            logits = model(ids).logits
        total += F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
    assert metrics.perplexity(model, tok, texts, batch_size=4) == pytest.approx(
        math.exp(total / count), rel=1e-5
    )


def test_padding_does_not_change_perplexity(tiny):
    model, tok = tiny
    texts = data.load_corpus("valid")[:8]
    assert metrics.perplexity(model, tok, texts, batch_size=1) == pytest.approx(
        metrics.perplexity(model, tok, texts, batch_size=8), rel=1e-5
    )


def test_base_model_knows_its_world_but_not_the_format(tiny):
    model, tok = tiny
    facts = data.load_heldout_facts()[:200]
    assert metrics.fact_completion_accuracy(model, tok, facts) >= 0.75
    assert metrics.exact_match(model, tok, data.load_instructions("test"), limit=200) <= 0.10


def test_normalize_answer():
    assert metrics.normalize_answer("  Morvale. ") == "morvale"
    assert metrics.normalize_answer("Hollow  mere!") == "hollow mere"


def test_exact_match_rejects_a_row_without_an_answer(tiny):
    model, tok = tiny
    rows = [{"messages": [{"role": "user", "content": "Where?"}]}]
    with pytest.raises(ValueError, match="not the assistant"):
        metrics.exact_match(model, tok, rows)


# Chapter 08: perplexity from logits, sliding windows, classification scores.


def test_perplexity_from_logits_equals_the_models_loss_and_ignores_padding(tiny):
    model, tok = tiny
    ids = torch.tensor([tok("Feko Rindal has a house in Quenton.")["input_ids"]])
    with torch.no_grad():
        out = model(ids, labels=ids)
    assert metrics.perplexity_from_logits(out.logits, ids) == pytest.approx(
        math.exp(out.loss.item()), rel=1e-5
    )
    padded_ids = torch.cat([ids, torch.full((1, 5), tok.pad_token_id)], dim=1)
    padded_labels = torch.cat([ids, torch.full((1, 5), -100)], dim=1)
    with torch.no_grad():
        logits = model(padded_ids, attention_mask=(padded_labels != -100).long()).logits
    assert metrics.perplexity_from_logits(logits, padded_labels) == pytest.approx(
        math.exp(out.loss.item()), rel=1e-5
    )


def test_perplexity_from_logits_without_targets_is_an_error():
    with pytest.raises(ValueError, match="No target tokens"):
        metrics.perplexity_from_logits(torch.zeros(2, 1, 5), torch.zeros(2, 1, dtype=torch.long))


def test_sliding_window_scores_every_token_once(tiny):
    model, tok = tiny
    text = " ".join(data.load_corpus("valid")[:6])
    n_ids = len(tok(text, add_special_tokens=False)["input_ids"]) + 1  # with BOS
    for stride in (16, 48, 64):
        _, n = metrics.sliding_window_nll(model, tok, text, max_length=64, stride=stride)
        windows = -(-max(n_ids - 64, 0) // stride) + 1
        assert n == (n_ids - 1 if stride < 64 else n_ids - windows)  # disjoint: each chunk's first is lost


def test_sliding_window_with_one_window_is_plain_perplexity(tiny):
    model, tok = tiny
    text = data.load_corpus("valid")[0]
    assert metrics.sliding_window_perplexity(model, tok, text, max_length=256, stride=128) == pytest.approx(
        metrics.perplexity(model, tok, [text]), rel=1e-5
    )


def test_smaller_stride_means_more_context_and_lower_perplexity(tiny):
    model, tok = tiny
    text = tok.bos_token.join(data.load_corpus("valid")[:8])  # documents as pretraining packed them
    small = metrics.sliding_window_perplexity(model, tok, text, max_length=32, stride=4)
    disjoint = metrics.sliding_window_perplexity(model, tok, text, max_length=32, stride=32)
    assert small < disjoint


def test_sliding_window_bad_input(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="no target"):
        metrics.sliding_window_perplexity(model, tok, "", max_length=32, stride=16)
    with pytest.raises(ValueError, match="no target"):
        metrics.sliding_window_perplexity(model, tok, "Quenton", max_length=32, stride=16, prefix_bos=False)
    with pytest.raises(ValueError, match="skips tokens"):
        metrics.sliding_window_perplexity(model, tok, "a b c d", max_length=8, stride=9)
    with pytest.raises(ValueError, match="max_length"):
        metrics.sliding_window_perplexity(model, tok, "a b c d", max_length=1, stride=1)


def test_classification_scores_macro_vs_micro():
    y_true = ["a"] * 8 + ["b"] * 2
    y_pred = ["a"] * 10  # the rare class is never predicted
    s = metrics.classification_scores(y_true, y_pred)
    assert s["accuracy"] == pytest.approx(0.8) and s["micro_f1"] == pytest.approx(0.8)
    assert s["macro_recall"] == pytest.approx(0.5)
    assert s["macro_f1"] == pytest.approx((2 * 0.8 / 1.8 + 0) / 2)
    with pytest.raises(ValueError):
        metrics.classification_scores([], [])
