"""Chapter 04's checkers: counting trainable parameters, a LoRA config for the Llama classifier."""

import peft
import pytest
from peft import LoraConfig, TaskType

from utils import checks

# Counting trainable parameters.


def count_solution(model):  # the notebook's solution
    params = list(model.parameters())  # parameters() yields a shared tensor once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def count_by_identity(model):  # every tensor once, by identity, from the names that may repeat
    seen = {id(p): p for _, p in model.named_parameters(remove_duplicate=False)}
    return sum(p.numel() for p in seen.values() if p.requires_grad), sum(p.numel() for p in seen.values())


def count_stub(model) -> tuple[int, int]:
    """(trainable parameters, all parameters), each tensor counted once."""
    # YOUR CODE HERE
    raise NotImplementedError("Exercise: write this part, then run the check below.")


def count_body_left_above_the_raise(model):
    pair = count_solution(model)
    raise NotImplementedError("Exercise: write this part, then run the check below.")
    return pair


def state_dict_count(model):
    return count_solution(model)[0], sum(t.numel() for t in model.state_dict().values())


def every_name_counted(model):
    named = list(model.named_parameters(remove_duplicate=False))
    return count_solution(model)[0], sum(p.numel() for _, p in named)


def all_trainable(model):
    total = count_solution(model)[1]
    return total, total


def lora_names_only(model):
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n), count_solution(model)[1]


def unfreezes_while_counting(model):
    for p in model.parameters():
        p.requires_grad_(True)
    return count_solution(model)


@pytest.mark.parametrize(
    "fn", [count_solution, count_by_identity, lambda model: model.get_nb_trainable_parameters()]
)
def test_trainable_right_answers_pass(fn, capsys):
    assert checks.check_trainable_count(fn) is True
    assert "[count trainable parameters] correct." in capsys.readouterr().out


def test_trainable_stub_and_left_raise(capsys):
    assert checks.check_trainable_count(count_stub) is None
    assert "not attempted yet" in capsys.readouterr().out
    assert checks.check_trainable_count(count_body_left_above_the_raise) is None
    assert "delete that line" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("fn", "reason"),
    [
        (state_dict_count, "tied Llama: you count"),
        (state_dict_count, "A tied tensor is one parameter that appears under two names: count it once."),
        (every_name_counted, "count it once"),
        (all_trainable, "Trainable means requires_grad is True."),
        (lambda model: count_solution(model)[::-1], "The pair is (trainable, total), in that order."),
        (lora_names_only, "BERT classifier: you count"),
        (lora_names_only, "The classification head kept in modules_to_save is trained too"),
        (unfreezes_while_counting, "changes its input `model` in place"),
        (lambda model: list(count_solution(model)), "return a pair (trainable, total); your function returned a list"),
        (lambda model: (1.0 * count_solution(model)[0], count_solution(model)[1]), "return an int (the trainable count)"),
    ],
)  # fmt: skip
def test_trainable_wrong_answers_are_named(fn, reason, capsys):
    assert checks.check_trainable_count(fn) is False
    out = capsys.readouterr().out
    assert "[count trainable parameters] not yet right" in out and reason in out


# A LoRA config for the classifier.

RIGHT_CONFIGS = {
    "reference": lambda: peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS"),
    "modules_to_save as well": lambda: LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS", modules_to_save=["score"]
    ),
    "modules_to_save instead": lambda: LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], modules_to_save=["score"]
    ),
    "the TaskType enum": lambda: LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type=TaskType.SEQ_CLS
    ),
    "a regular expression": lambda: LoraConfig(
        r=8, lora_alpha=16, target_modules=r".*\.(q_proj|v_proj)", task_type="SEQ_CLS", lora_dropout=0.1
    ),
}  # fmt: skip


def config_stub() -> peft.LoraConfig:
    """LoRA on the attention's q_proj and v_proj, r = 8, lora_alpha = 16, with the classification head
    (score) trained and saved."""
    # YOUR CODE HERE
    raise NotImplementedError("Exercise: write this part, then run the check below.")


def config_body_left_above_the_raise() -> peft.LoraConfig:
    config = RIGHT_CONFIGS["reference"]()
    raise NotImplementedError("Exercise: write this part, then run the check below.")
    return config


def cfg(**kw):
    base = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "task_type": "SEQ_CLS"}
    return lambda: LoraConfig(**{**base, **kw})


WRONG_CONFIGS = [
    ("missing task_type", cfg(task_type=None), "the classification head (score) stays frozen"),
    ("BERT's names", cfg(target_modules=["query", "value"]), "target_modules=['query', 'value'] matches no layer"),
    ("q_proj only", cfg(target_modules=["q_proj"]), "LoRA is on q_proj; the exercise asks for q_proj and v_proj"),
    ("all attention", cfg(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]), "LoRA is on k_proj, o_proj"),
    ("all-linear", cfg(target_modules="all-linear"), "(all-linear adapts every linear layer)"),
    ("r = 16", cfg(r=16), "your layers get r = 16 and lora_alpha = 16; the exercise asks for r = 8"),
    ("alpha = 8", cfg(lora_alpha=8), "lora_alpha = 8; the exercise asks"),
    ("swapped", cfg(r=16, lora_alpha=8), "(swapped?)"),
    ("rsLoRA", cfg(use_rslora=True), "use_rslora scales by alpha / sqrt(r)"),
    ("one layer", cfg(layers_to_transform=[0]), "every layer gets its adapters"),
    ("LoRA on the head", cfg(task_type=None, target_modules=["q_proj", "v_proj", "score"]), "the head gets a LoRA adapter"),
    ("embeddings saved too", cfg(modules_to_save=["score", "embed_tokens"]), "more than LoRA and the head is trained"),
    ("causal LM task", cfg(task_type="CAUSAL_LM"), "task_type='CAUSAL_LM' tells peft the model is of another kind"),
    ("inference mode", cfg(inference_mode=True), "nothing is trainable"),
    ("a dict", lambda: {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}, "return a peft LoraConfig; your function returned a dict"),
    ("the class", lambda: LoraConfig, "return a peft LoraConfig"),
]  # fmt: skip


@pytest.mark.parametrize("name", list(RIGHT_CONFIGS))
def test_classifier_config_right_answers_pass(name, capsys):
    assert checks.check_seq_cls_lora_config(RIGHT_CONFIGS[name]) is True
    assert "[LoRA config for a classifier] correct." in capsys.readouterr().out


def test_classifier_config_stub_and_left_raise(capsys):
    assert checks.check_seq_cls_lora_config(config_stub) is None
    assert "not attempted yet" in capsys.readouterr().out
    assert checks.check_seq_cls_lora_config(config_body_left_above_the_raise) is None
    assert "delete that line" in capsys.readouterr().out


@pytest.mark.parametrize(("name", "make", "reason"), WRONG_CONFIGS, ids=[w[0] for w in WRONG_CONFIGS])
def test_classifier_config_wrong_answers_are_named(name, make, reason, capsys):
    assert checks.check_seq_cls_lora_config(make) is False
    out = capsys.readouterr().out
    assert "[LoRA config for a classifier] not yet right" in out and reason in out
    # a hint points at the mistake; it never hands over the answer line
    assert "SEQ_CLS" not in out and "LoraConfig(" not in out


def test_classifier_config_is_not_changed_by_the_check():
    config = RIGHT_CONFIGS["reference"]()
    before = config.to_dict()
    assert checks.check_seq_cls_lora_config(lambda: config) is True
    assert config.to_dict() == before  # peft fills in modules_to_save on its own copy only


def test_the_checkers_classifier_is_a_llama_with_a_score_head():
    from utils.checks.ch04 import _tiny_llama_classifier

    model = _tiny_llama_classifier()
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert model.score.out_features == 3 and model.config.num_hidden_layers == 2
