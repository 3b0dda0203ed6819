"""Chapter 04: peft in practice (counting trainable parameters, a LoRA config for a classifier)."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

from utils.checks.core import CheckFailed, call_on_copies, describe, expect_int, mutation_message, run_check

CLASSIFIER_TARGETS = ("q_proj", "v_proj")
CLASSIFIER_RANK, CLASSIFIER_ALPHA = 8, 16


def _tiny_bert_classifier(num_hidden_layers: int):
    """A randomly initialized BERT sequence classifier small enough to build in milliseconds."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=2,
        intermediate_size=32,
    )
    return BertForSequenceClassification(config)


def _tiny_llama_classifier():
    """A random ``LlamaForSequenceClassification`` shaped like the course's model (head ``score``, 3 labels),
    small enough to build in milliseconds: only its module names and shapes matter to a config check."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_labels=3,
        pad_token_id=0,
    )
    return LlamaForSequenceClassification(config)


def _peft_model(model, config):
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(model, copy.deepcopy(config))


def check_trainable_count(count_fn: Callable) -> bool | None:
    """Check ``count_fn(model) -> (trainable, total)`` against peft's ``get_nb_trainable_parameters()``
    on small peft models (a tied embedding, GQA, a classification head kept as ``modules_to_save``)."""
    import torch
    from peft import LoraConfig
    from transformers import LlamaConfig, LlamaForCausalLM

    def models():
        torch.manual_seed(0)
        llama = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=64,
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=4,
                num_key_value_heads=2,
                tie_word_embeddings=True,
            )
        )
        bert = _tiny_bert_classifier(num_hidden_layers=1)
        yield "tied Llama", _peft_model(llama, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
        yield (
            "BERT classifier",
            _peft_model(bert, LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS")),
        )

    def body(fn):
        for name, model in models():
            got, changed = call_on_copies(fn, model=model)
            want = model.get_nb_trainable_parameters()
            if not (isinstance(got, tuple) and len(got) == 2):
                raise CheckFailed(
                    f"return a pair (trainable, total); your function returned {describe(got)}."
                )
            got = (expect_int(got[0], "the trainable count"), expect_int(got[1], "the total count"))
            if changed:
                raise CheckFailed(
                    f"{name}: " + mutation_message(changed, "counting reads requires_grad, it never sets it")
                )
            if got == want:
                continue
            hint = f"{name}: you count {got}, peft counts {want}."
            with_dupes = sum(t.numel() for t in model.state_dict().values())
            lora_only = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
            if got == (want[1], want[0]):
                hint += " The pair is (trainable, total), in that order."
            elif got[1] == with_dupes and with_dupes != want[1]:
                hint += " A tied tensor is one parameter that appears under two names: count it once."
            elif got[0] == got[1]:
                hint += " Trainable means requires_grad is True."
            elif got[0] == lora_only and lora_only != want[0]:
                hint += (
                    " The classification head kept in modules_to_save is trained too: trainable means "
                    "requires_grad is True, whatever the name."
                )
            raise CheckFailed(hint)

    return run_check("count trainable parameters", count_fn, body)


def _is_head(name: str) -> bool:
    return name.startswith("score.") or ".score." in name


def _lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer) and m.active_adapters]


def check_seq_cls_lora_config(make_config: Callable) -> bool | None:
    """Check ``make_config() -> LoraConfig`` for the course's Llama with a classification head
    (``LlamaForSequenceClassification``, head ``score``): LoRA with r = 8 and lora_alpha = 16 on every
    layer's q_proj and v_proj, the new head trained in full and saved (``task_type="SEQ_CLS"``, or the head
    in ``modules_to_save``), everything else frozen."""
    from peft import LoraConfig

    def body(fn):
        config = fn()
        if not isinstance(config, LoraConfig):
            raise CheckFailed(f"return a peft LoraConfig; your function returned {describe(config)}.")
        task = getattr(config.task_type, "value", config.task_type)
        if task not in (None, "SEQ_CLS"):
            raise CheckFailed(
                f"task_type={task!r} tells peft the model is of another kind: this one is a sequence "
                "classifier."
            )
        try:
            model = _peft_model(_tiny_llama_classifier(), config)
        except Exception as err:
            layers = (
                "its layers are named as in the course's Llama: q_proj, k_proj, v_proj, o_proj, gate_proj, "
                "up_proj, down_proj, and the head is score"
            )
            if "target" in str(err).lower():
                raise CheckFailed(
                    f"target_modules={_shown(config.target_modules)} matches no layer of this classifier: {layers}."
                ) from None
            raise CheckFailed(
                f"peft cannot apply your config to the classifier ({type(err).__name__}: {err}); {layers}."
            ) from None
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        if not trainable:
            raise CheckFailed("nothing is trainable: is inference_mode set?")
        if not any(_is_head(n) and "lora_" not in n for n in trainable):
            if any(_is_head(n) for n in trainable):
                raise CheckFailed(
                    "the head gets a LoRA adapter, but it is a new, random layer: it must be trained in "
                    "full (and saved with the adapter), not adapted."
                )
            raise CheckFailed(
                "the classification head (score) stays frozen, so it keeps its random init: peft trains "
                "and saves it when it knows the task (task_type) or when the head is listed in "
                "modules_to_save."
            )
        layers = _lora_layers(model)
        lora_on = sorted({n.rsplit(".", 1)[-1] for n, _ in layers})
        if lora_on != sorted(CLASSIFIER_TARGETS):
            every = " (all-linear adapts every linear layer)" if config.target_modules == "all-linear" else ""
            raise CheckFailed(
                f"LoRA is on {', '.join(lora_on) or 'nothing'}{every}; the exercise asks for q_proj and "
                "v_proj only."
            )
        n_layers = model.get_base_model().config.num_hidden_layers
        if len(layers) != len(CLASSIFIER_TARGETS) * n_layers:
            raise CheckFailed(
                f"LoRA is on {len(layers)} projections, the model has {len(CLASSIFIER_TARGETS) * n_layers} "
                "q_proj and v_proj layers: every layer gets its adapters (layers_to_transform limits them)."
            )
        ranks = sorted({m.r[a] for _, m in layers for a in m.active_adapters})
        alphas = sorted({m.lora_alpha[a] for _, m in layers for a in m.active_adapters})
        if ranks != [CLASSIFIER_RANK] or alphas != [CLASSIFIER_ALPHA]:
            got = f"r = {', '.join(map(str, ranks))} and lora_alpha = {', '.join(map(str, alphas))}"
            swapped = " (swapped?)" if ranks == [CLASSIFIER_ALPHA] and alphas == [CLASSIFIER_RANK] else ""
            raise CheckFailed(
                f"your layers get {got}{swapped}; the exercise asks for r = {CLASSIFIER_RANK} and "
                f"lora_alpha = {CLASSIFIER_ALPHA}."
            )
        scales = sorted({float(m.scaling[a]) for _, m in layers for a in m.active_adapters})
        if scales != [CLASSIFIER_ALPHA / CLASSIFIER_RANK]:
            raise CheckFailed(
                f"the update is scaled by {scales[0]:.4g}, not lora_alpha / r = "
                f"{CLASSIFIER_ALPHA / CLASSIFIER_RANK:g}: use_rslora scales by alpha / sqrt(r); the exercise "
                "uses plain LoRA."
            )
        others = [n for n in trainable if not _is_head(n) and ".lora_A." not in n and ".lora_B." not in n]
        if others:
            raise CheckFailed(f"more than LoRA and the head is trained, e.g. {others[0]}.")

    return run_check("LoRA config for a classifier", make_config, body)


def _shown(target_modules) -> str:
    """``target_modules`` as the learner wrote it (peft turns a list into a set: show it sorted)."""
    return (
        repr(sorted(target_modules)) if isinstance(target_modules, set | frozenset) else repr(target_modules)
    )
