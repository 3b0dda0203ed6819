import pytest
import torch
import torch.nn.functional as F

from utils import data, sft
from utils.metrics import IGNORE_INDEX

ROW = {
    "messages": [
        {"role": "user", "content": "Where does Zusa Wensor live?"},
        {"role": "assistant", "content": "Ashfen"},
    ]
}


def test_labels_cover_exactly_the_answer_and_its_end_token(tiny):
    _, tok = tiny
    ex = sft.tokenize_conversation(tok, ROW["messages"])
    kept = [t for t in ex["labels"] if t != IGNORE_INDEX]
    assert tok.decode(kept) == " Ashfen<|end|>"
    assert len(kept) == 2 and len(ex["labels"]) == len(ex["input_ids"]) == 14


def test_multi_turn_masks_every_assistant_turn(tiny):
    _, tok = tiny
    messages = [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Where does Zusa Wensor live?"},
        {"role": "assistant", "content": "Ashfen"},
        {"role": "user", "content": "What is 2 plus 3?"},
        {"role": "assistant", "content": "5"},
    ]
    ex = sft.tokenize_conversation(tok, messages)
    kept = tok.decode([t for t in ex["labels"] if t != IGNORE_INDEX])
    assert kept == " Ashfen<|end|> 5<|end|>"


def test_masked_label_count_over_the_train_split(tiny):
    _, tok = tiny
    rows = data.load_instructions("train")
    examples = sft.tokenize_rows(tok, rows)
    answer_tokens = sum(len(tok(" " + r["messages"][1]["content"])["input_ids"]) + 1 for r in rows)
    assert sum(sum(t != IGNORE_INDEX for t in e["labels"]) for e in examples) == answer_tokens


def test_bad_rows_get_clear_errors(tiny):
    _, tok = tiny
    with pytest.raises(ValueError, match="end with an assistant"):
        sft.tokenize_conversation(tok, ROW["messages"][:1])
    with pytest.raises(ValueError, match="empty"):
        sft.tokenize_conversation(tok, [ROW["messages"][0], {"role": "assistant", "content": "  "}])
    with pytest.raises(ValueError, match="more than max_length=5"):
        sft.tokenize_conversation(tok, ROW["messages"], max_length=5)


def test_prompt_completion_round_trip():
    pc = sft.to_prompt_completion(ROW)
    assert pc == {"prompt": "Where does Zusa Wensor live?", "completion": "Ashfen"}
    assert sft.to_messages(pc) == ROW
    with pytest.raises(ValueError, match="missing"):
        sft.to_messages({"prompt": "x"})


def test_collate_pads_with_ignored_labels(tiny):
    _, tok = tiny
    a = sft.tokenize_conversation(tok, ROW["messages"])
    b = sft.tokenize_conversation(tok, [ROW["messages"][0] | {"content": "Hi?"}, ROW["messages"][1]])
    batch = sft.collate([a, b], tok.pad_token_id)
    n_b = len(b["input_ids"])
    assert batch["input_ids"].shape == (2, len(a["input_ids"]))
    assert (batch["labels"][1, n_b:] == IGNORE_INDEX).all() and (batch["attention_mask"][1, n_b:] == 0).all()


def test_model_loss_is_the_shifted_mean_over_unmasked_targets(tiny):
    model, tok = tiny
    batch = sft.collate(
        sft.tokenize_rows(tok, data.load_instructions("validation").select(range(8))), tok.pad_token_id
    )
    with torch.no_grad():
        out = model(**batch)
    logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]
    by_hand = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
    assert torch.allclose(by_hand, out.loss, atol=1e-6)


def test_packing_fits_blocks_and_the_mask_stops_cross_attention(tiny):
    model, tok = tiny
    examples = sft.tokenize_rows(tok, data.load_instructions("validation").select(range(20)))
    rows = sft.pack_examples(examples, block_size=64)
    assert all(len(r["input_ids"]) <= 64 for r in rows)
    assert sum(len(r["seq_lengths"]) for r in rows) == 20
    assert sum(len(r["input_ids"]) for r in rows) == sum(len(e["input_ids"]) for e in examples)
    batch = sft.collate_packed(rows[:1], tok.pad_token_id)
    first, second = rows[0]["seq_lengths"][:2]
    with torch.no_grad():
        packed = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
        ).logits
        alone = model(input_ids=torch.tensor([examples[1]["input_ids"]])).logits
        naive = model(input_ids=batch["input_ids"]).logits
    assert torch.allclose(packed[0, first : first + second], alone[0], atol=1e-5)
    assert not torch.allclose(naive[0, first : first + second], alone[0], atol=1e-3)


def test_packing_rejects_an_example_longer_than_the_block(tiny):
    _, tok = tiny
    with pytest.raises(ValueError, match="more than block_size=4"):
        sft.pack_examples(sft.tokenize_rows(tok, [ROW]), block_size=4)


def test_templates_without_generation_marks_fall_back_to_prefix_rendering(tiny):
    import copy

    _, tok = tiny
    plain = copy.deepcopy(tok)
    plain.chat_template = tok.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    messages = [
        {"role": "user", "content": "What is 3 plus 4?"},
        {"role": "assistant", "content": "7"},
        {"role": "user", "content": "And 5 plus 5?"},
        {"role": "assistant", "content": "10"},
    ]
    assert sft.tokenize_conversation(plain, messages) == sft.tokenize_conversation(tok, messages)
