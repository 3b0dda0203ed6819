"""The course's tiny pretrained encoder (utils.encoder, utils/assets/tiny-bert)."""

import torch
from safetensors.torch import load_file
from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoTokenizer

from utils import data, encoder


def test_shipped_encoder_loads_as_a_plain_sequence_classifier_with_a_pretrained_pooler():
    path = encoder.encoder_path()
    assert (path / "model.safetensors").stat().st_size < 5e6
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=4)
    saved = load_file(path / "model.safetensors")
    assert torch.equal(
        model.bert.pooler.dense.weight, saved["bert.pooler.dense.weight"]
    )  # not re-initialized
    assert torch.equal(
        model.bert.encoder.layer[3].output.dense.weight, saved["bert.encoder.layer.3.output.dense.weight"]
    )
    assert model.classifier.out_features == 4 and "classifier.weight" not in saved
    assert sum(p.numel() for p in model.parameters()) < 2_000_000


def test_tokenizer_has_what_bert_needs():
    tok = AutoTokenizer.from_pretrained(encoder.encoder_path())
    ids = tok("Feko Rindal works as a potter.")["input_ids"]
    assert tok.convert_ids_to_tokens(ids)[0] == "[CLS]" and tok.convert_ids_to_tokens(ids)[-1] == "[SEP]"
    assert tok.mask_token == "[MASK]" and tok.pad_token_id == 0
    assert tok.unk_token_id not in ids  # the world's words are in the vocabulary


def test_report_is_reproduced_by_the_shipped_weights():
    report = encoder.pretrain_report()
    assert report["valid_masked_acc"] > 0.7 and report["steps"] > 0
    tok = AutoTokenizer.from_pretrained(encoder.encoder_path())
    mlm = AutoModelForMaskedLM.from_pretrained(encoder.encoder_path())
    acc = encoder.masked_token_accuracy(mlm, tok, data.load_corpus("valid"), seed=0)
    assert abs(acc - report["valid_masked_acc"]) < 1e-9


def test_masking_follows_bert_and_never_touches_special_tokens():
    tok = AutoTokenizer.from_pretrained(encoder.encoder_path())
    ids = torch.randint(len(encoder.SPECIAL_TOKENS), len(tok), (200, 50))
    ids[:, 0] = tok.cls_token_id
    special = ids < len(encoder.SPECIAL_TOKENS)
    masked, labels = encoder.mask_tokens(ids, tok, torch.Generator().manual_seed(0), special)
    chosen = labels != -100
    assert abs(chosen.float().mean().item() - 0.15 * 49 / 50) < 0.01 and not chosen[:, 0].any()
    share_masked = (masked[chosen] == tok.mask_token_id).float().mean().item()
    share_kept = (masked[chosen] == ids[chosen]).float().mean().item()
    assert abs(share_masked - 0.8) < 0.03 and 0.08 < share_kept < 0.14  # 10 % kept (+ random hits)
    assert torch.equal(masked[~chosen], ids[~chosen])


def test_pretraining_runs_and_saves_a_loadable_model(tmp_path):
    report = encoder.pretrain(tmp_path, epochs=1, batch_size=16, warmup=2, eval_every=1000, limit=64)
    assert report["steps"] == 4 and 0 <= report["valid_masked_acc"] <= 1
    model, tok = encoder.load_classifier(3, path=tmp_path)
    assert model.num_labels == 3 and tok.mask_token == "[MASK]"
    random_model, _ = encoder.load_classifier(3, pretrained=False, path=tmp_path)
    assert not torch.equal(
        model.bert.encoder.layer[0].output.dense.weight,
        random_model.bert.encoder.layer[0].output.dense.weight,
    )


def test_tokenizer_is_rebuilt_identically_and_spells_out_unseen_words():
    corpus = data.load_corpus("train")[:500]
    a, b = encoder.train_wordpiece_tokenizer(corpus), encoder.train_wordpiece_tokenizer(corpus)
    assert a.get_vocab() == b.get_vocab()
    assert (
        a.tokenize("xyzzy") == ["x", "##y", "##z", "##z", "##y"]
        and a.unk_token_id not in a("xyzzy")["input_ids"]
    )
