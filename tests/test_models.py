import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from utils import checks, models


def test_plain_from_pretrained_loads_the_tiny_base_offline():
    path = models.base_model_path()
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == "llama"
    assert 1_000_000 <= models.count_parameters(model) <= 5_000_000
    assert model.config.vocab_size == len(tokenizer)


def test_parameter_count_matches_the_closed_form(tiny):
    model, _ = tiny
    assert models.count_parameters(model) == checks.count_llama_params_reference(model.config)


def test_chat_template_marks_only_the_answer_and_the_end_token(tiny):
    _, tok = tiny
    messages = [
        {"role": "user", "content": "Where does Zusa Wensor live?"},
        {"role": "assistant", "content": "Ashfen"},
    ]
    out = tok.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    marked = [t for t, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    assert tok.decode(marked) == " Ashfen<|end|>"
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|user|> Where does Zusa Wensor live?<|end|>\n<|assistant|>"


def test_chat_tokens_never_occur_in_pretraining(tiny):
    from utils import data

    corpus = "\n".join(data.load_corpus("train"))
    for token in [models.END_TOKEN, *models.ROLE_TOKENS]:
        assert token not in corpus


def test_load_model_with_unreachable_hub_id_explains(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConnectionError, match="cannot reach it"):
        models.load_model("some-org/some-model-that-is-not-cached", device="cpu")


def test_load_model_with_missing_local_path_says_so():
    with pytest.raises(FileNotFoundError, match="No model directory"):
        models.load_model("./no/such/dir", device="cpu")


def test_pretrain_report_meets_the_targets():
    report = json.loads((models.BASE_DIR / "pretrain_report.json").read_text())
    assert report["heldout_fact_acc"] >= 0.80
    assert report["valid_perplexity"] < 3.0


def test_saved_model_round_trips(tmp_path, tiny):
    model, tok = tiny
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again, tok2 = models.load_model(tmp_path, device="cpu")
    ids = torch.tensor([tok("Zusa Wensor lives in")["input_ids"]])
    assert torch.equal(model(ids).logits, again(ids).logits)
    assert tok2.chat_template == tok.chat_template


def test_unreachable_hub_is_reported_at_once(monkeypatch):
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(ConnectionError, match="no connection"):
        models.load_model("some-org/some-model-that-is-not-cached", device="cpu")
