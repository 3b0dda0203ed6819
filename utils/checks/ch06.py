"""Chapter 06: freezing (all but the head of an encoder classifier, the bottom k layers of a decoder, the
gradual-unfreezing schedule). Freezing is checked twice: by the counts of trainable parameters, and by which
parameters actually change in one AdamW step (weight decay on) over *every* parameter."""

from __future__ import annotations

import copy
from collections.abc import Callable

from utils.checks.core import CheckFailed, _LearnerRaised, describe, run_check


def _tiny_bert_classifier():
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=3,
    )
    return BertForSequenceClassification(config)


def _tiny_llama_classifier():
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, num_labels=3, pad_token_id=0,
    )  # fmt: skip
    return LlamaForSequenceClassification(config)


def _tiny_llama_lm(n_layers: int = 3, tied: bool = True):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=n_layers, num_attention_heads=4,
        num_key_value_heads=4, tie_word_embeddings=tied,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def changed_by_one_step(model, labels: str = "class") -> set[str]:
    """Names of the parameters that one AdamW step (lr 0.1, weight decay 0.1), built over every parameter,
    changes on a random batch. Frozen parameters get no gradient, so AdamW skips them entirely."""
    import torch

    torch.manual_seed(1)
    ids = torch.randint(1, 64, (4, 6))
    batch = {"input_ids": ids, "labels": torch.tensor([0, 1, 2, 0]) if labels == "class" else ids}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    model.train()
    model(**batch).loss.backward()
    opt.step()
    return {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}


def _values_changed(model, reference) -> list[str]:
    import torch

    ref = dict(reference.named_parameters())
    return [n for n, p in model.named_parameters() if not torch.equal(p.detach(), ref[n].detach())]


def _run_on_copy(fn: Callable, model, *args):
    copied = copy.deepcopy(model)
    fn(copied, *args)
    changed = _values_changed(copied, model)
    if changed:
        raise CheckFailed(
            f"your function changed the values of {len(changed)} parameters (e.g. {changed[0]}): freezing sets "
            "requires_grad and leaves every weight as it is."
        )
    return copied


def _head_names(model) -> set[str]:
    return {n for n, _ in model.named_parameters() if n.startswith(("classifier.", "score."))}


def check_freeze_all_but_head(fn: Callable) -> bool | None:
    """Check ``fn(model)``, which should leave only the classification head trainable, on a BERT classifier
    (head ``classifier``; the pooler belongs to ``model.bert``) and a Llama classifier (head ``score``)."""

    def body(fn):
        for name, model in (
            ("BERT classifier", _tiny_bert_classifier()),
            ("Llama classifier", _tiny_llama_classifier()),
        ):
            frozen = _run_on_copy(fn, model)
            got, want = _trainable(frozen), _head_names(model)
            n_got = sum(p.numel() for p in frozen.parameters() if p.requires_grad)
            n_want = sum(p.numel() for n, p in model.named_parameters() if n in want)
            if got != want:
                hint = f"{name}: {n_got:,} parameters are trainable, the head has {n_want:,}."
                if not got:
                    hint += " Nothing is trainable: the head must still learn."
                elif got == {n for n, _ in model.named_parameters()}:
                    hint += (
                        " Every parameter of the model passed in still trains: freeze that model, in place (a "
                        "frozen copy is not what the caller trains); model.eval() or torch.no_grad() do not freeze."
                    )
                elif got.isdisjoint(want):
                    hint += " The head is frozen: the new head is exactly what must train."
                elif any(".pooler." in n for n in got):
                    hint += " The pooler is part of model.bert, the pretrained body: it is frozen with it."
                elif want - got:
                    hint += " Part of the head is frozen: its bias (if it has one) trains with its weight."
                else:
                    extra = sorted(got - want)
                    hint += f" Still trainable outside the head, e.g. {extra[0]}."
                raise CheckFailed(hint)
            moved = changed_by_one_step(frozen)
            if moved != want:
                raise CheckFailed(
                    f"{name}: the right requires_grad flags, yet one AdamW step changed {sorted(moved - want)[:2]}: "
                    "look for something that re-enables gradients."
                )

    return run_check("freeze all but the head", fn, body)


def check_freeze_bottom_layers(fn: Callable) -> bool | None:
    """Check ``fn(model, k)`` on small Llama causal LMs (tied and untied embeddings): the embeddings and the
    lowest ``k`` decoder layers frozen, everything above them trainable; ``k`` above the number of layers
    must raise ``ValueError``."""
    from utils import freezing

    def body(fn):
        for tied in (True, False):
            model = _tiny_llama_lm(3, tied)
            for k in (0, 1, 2, 3):
                frozen = _run_on_copy(fn, model, k)
                ref = copy.deepcopy(model)
                freezing.freeze_bottom_layers(ref, k)
                got, want = _trainable(frozen), _trainable(ref)
                if got != want:
                    n_got = sum(p.numel() for p in frozen.parameters() if p.requires_grad)
                    n_want = sum(p.numel() for p in ref.parameters() if p.requires_grad)
                    hint = f"k={k}, {'tied' if tied else 'untied'} embeddings: {n_got:,} trainable, expected {n_want:,}."
                    low_trainable = any(
                        n.startswith("model.layers.") and int(n.split(".")[2]) < k for n in got
                    )
                    high_frozen = [n for n in sorted(want - got) if n.startswith("model.layers.")]
                    if any("embed_tokens" in n for n in got):
                        hint += " The embeddings are below layer 0: they are frozen too."
                        if tied:
                            hint += (
                                " With tied embeddings lm_head.weight is the same tensor as embed_tokens.weight: "
                                "making the head trainable makes the embeddings trainable."
                            )
                    elif high_frozen:
                        layer = high_frozen[0].split(".")[2]
                        hint += f" Layer {layer} is frozen but is not among the bottom k"
                        hint += (
                            " (are you counting from the top?)."
                            if low_trainable
                            else " (one layer too many?)."
                        )
                    elif low_trainable:
                        hint += f" A layer below {k} is still trainable: the bottom k layers are 0 .. k-1."
                    elif want - got:
                        hint += f" Frozen but above the bottom layers: {sorted(want - got)[0]}."
                    raise CheckFailed(hint)
                moved = changed_by_one_step(frozen, labels="lm")
                if moved != want:
                    raise CheckFailed(
                        f"k={k}: one AdamW step changed {sorted(moved ^ want)[:2]}, not what is trainable."
                    )
        deep = _tiny_llama_lm(
            12, tied=False
        )  # layer numbers of two digits: "model.layers.1" is a prefix of "...10"
        frozen = _run_on_copy(fn, deep, 2)
        ref = copy.deepcopy(deep)
        freezing.freeze_bottom_layers(ref, 2)
        if _trainable(frozen) != _trainable(ref):
            wrong = sorted(
                {
                    int(n.split(".")[2])
                    for n in _trainable(ref) - _trainable(frozen)
                    if n.startswith("model.layers.")
                }
            )
            raise CheckFailed(
                f"k=2 on a 12-layer model: layers {wrong} are frozen too. Does your test of a parameter's name "
                "take 'model.layers.1' for a prefix of 'model.layers.10'? Compare the layer number itself."
                if wrong
                else "k=2 on a 12-layer model: the trainable parameters are not layers 2 to 11, the norm and the head."
            )
        try:
            fn(copy.deepcopy(_tiny_llama_lm(3)), 4)
        except _LearnerRaised as wrapped:
            if isinstance(wrapped.error, ValueError):
                return
            if isinstance(wrapped.error, NotImplementedError):
                raise
            kind = type(wrapped.error).__name__
            raise CheckFailed(
                f"k=4 on a 3-layer model raised {kind}; raise a ValueError that says why."
            ) from None
        raise CheckFailed(
            "k=4 on a 3-layer model was accepted: a k larger than the number of layers must raise ValueError."
        )

    return run_check("freeze the bottom k layers", fn, body)


def check_unfrozen_layers(fn: Callable) -> bool | None:
    """Check ``fn(epoch, n_layers) -> block indices that train in that epoch`` (ULMFiT's gradual unfreezing:
    the head alone in epoch 0, then one more block from the top each epoch)."""
    from utils import freezing

    def body(fn):
        for n_layers in (1, 3, 4, 12):
            for epoch in range(n_layers + 3):
                got = fn(epoch, n_layers)
                want = freezing.unfrozen_layers(epoch, n_layers)
                if not isinstance(got, list | tuple | set | range):
                    raise CheckFailed(f"return a list of layer indices (ints); got {describe(got)}.")
                odd = [i for i in got if not isinstance(i, int) or isinstance(i, bool)]
                if odd:
                    raise CheckFailed(
                        f"return a list of layer indices as Python ints; yours holds {type(odd[0]).__module__}."
                        f"{type(odd[0]).__name__} values (convert with int(i), or .tolist() for an array)."
                        if type(odd[0]).__module__ == "numpy"
                        else f"return a list of layer indices as Python ints; yours holds {type(odd[0]).__name__} values."
                    )
                got_sorted = sorted(got)
                if got_sorted == want:
                    continue
                hint = f"epoch {epoch}, {n_layers} layers: you train layers {got_sorted}, expected {len(want)} of them."
                if any(i < 0 or i >= n_layers for i in got_sorted):
                    hint += (
                        f" Layer indices run from 0 to {n_layers - 1}; after all are unfrozen, stop adding."
                    )
                elif epoch == 0 and got_sorted:
                    hint += " In epoch 0 only the head trains: no layer yet."
                elif len(got_sorted) == len(want):
                    hint += " The right number of layers, but not the top ones: unfreeze from the output side down."
                raise CheckFailed(hint)

    return run_check("gradual unfreezing schedule", fn, body)
