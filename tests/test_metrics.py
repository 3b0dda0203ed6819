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
