"""Chapter 02: the memory of full fine-tuning per precision, and BitFit (train only the biases)."""

from __future__ import annotations

import numbers
from collections.abc import Callable

from utils.checks.core import CheckFailed, describe, run_check

COMPONENTS = ("weights", "gradients", "optimizer")


# The bytes of full fine-tuning with AdamW.


def full_finetuning_bytes_reference(n_params: int, precision: str) -> dict[str, int]:
    """Bytes of weights, gradients and AdamW state when all ``n_params`` parameters train, for ``precision``
    ``"fp32"``, ``"mixed"`` (ZeRO's layout: 16-bit weights and gradients, fp32 master copy and moments) or
    ``"bf16"`` (everything bf16). Torch's 4-byte ``step`` counter per tensor is left out. This is
    ``utils.memory.bytes_per_param`` times ``n_params``."""
    from utils import memory

    return {k: int(v * n_params) for k, v in memory.bytes_per_param(precision, "adamw").items()}


def _as_breakdown(got) -> dict[str, float]:
    """The learner's result as ``{component: bytes}``, or ``CheckFailed`` saying what came back instead."""
    if not isinstance(got, dict):
        raise CheckFailed(
            f"return a dict with the keys {', '.join(COMPONENTS)}; your function returned {describe(got)}."
        )
    if set(got) != set(COMPONENTS):
        missing, extra = set(COMPONENTS) - set(got), set(got) - set(COMPONENTS)
        detail = "; ".join(
            part
            for part in (
                f"missing {sorted(missing)}" if missing else "",
                f"unexpected {sorted(extra)}" if extra else "",
            )
            if part
        )
        raise CheckFailed(f"the dict needs exactly the keys {', '.join(COMPONENTS)} ({detail}).")
    for key, value in got.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise CheckFailed(f"{key!r} should be a number of bytes; yours is {describe(value)}.")
    return {k: float(got[k]) for k in COMPONENTS}


def _bytes_hint(got: dict[str, float], n: int, precision: str) -> str:
    """Name the slip when ``got`` is what a common one gives; otherwise say which component is off."""
    want = full_finetuning_bytes_reference(1, precision)  # bytes per parameter
    per = {k: got[k] / n for k in COMPONENTS}
    if all(abs(got[k] - want[k]) < 1e-9 for k in COMPONENTS):
        return " These are bytes per parameter: multiply by n_params."
    if all(abs(per[k] - 8 * want[k]) < 1e-9 for k in COMPONENTS):
        return " These are bits, not bytes."
    mine = ", ".join(f"{k} {per[k]:g}" for k in COMPONENTS)
    text = f" Per parameter that is {mine}."
    if per["weights"] != want["weights"] or per["gradients"] != want["gradients"]:
        if per["gradients"] != per["weights"]:
            return text + " A gradient has the dtype of its parameter."
        if precision == "mixed" and abs(sum(per.values()) - sum(want.values())) < 1e-9:
            return text + (
                " The total is right, but split as PyTorch's autocast splits it. This exercise asks for the "
                "ZeRO layout: which copy of the weights is 16-bit, and where does the fp32 copy belong?"
            )
        if precision == "mixed":
            return text + " In mixed precision the working weights (and so their gradients) are 16-bit."
        return text + f" How many bytes does one {precision} number take?"
    opt = per["optimizer"]
    hints = {
        "fp32": {
            4: " AdamW keeps two moments per parameter, m and v.",
            12: " In fp32 the weights are already fp32: no second copy of them is needed.",
        },
        "mixed": {
            8: (
                " Something is missing from the optimizer state: count every fp32 tensor AdamW needs per weight "
                "when the working copy of the weights is 16-bit."
            ),
            4: " AdamW keeps two moments per parameter, m and v; and which copy of the weights does it update?",
        },
        "bf16": {
            8: " In pure bf16 (model.to(torch.bfloat16), torch's AdamW) the moments take the parameter's dtype.",
            12: " Pure bf16 keeps no fp32 copy of the weights.",
            2: " AdamW keeps two moments per parameter, m and v.",
        },
    }
    return text + hints[precision].get(opt, " The optimizer state is what is off.")


def check_full_finetuning_bytes(bytes_fn: Callable) -> bool | None:
    """Check ``bytes_fn(n_params, precision) -> {"weights", "gradients", "optimizer"}`` (bytes, full
    fine-tuning with AdamW, per-tensor step counters left out) against ``utils.memory.bytes_per_param``."""

    def body(fn):
        for precision in ("mixed", "fp32", "bf16"):
            for n in (1_000, 6_738_415_616):
                got = _as_breakdown(fn(n, precision))
                want = full_finetuning_bytes_reference(n, precision)
                if all(abs(got[k] - want[k]) <= 0.5 for k in COMPONENTS):
                    continue
                raise CheckFailed(
                    f"precision={precision!r}, n_params={n:,}: yours is "
                    + ", ".join(f"{k} {got[k]:,.0f}" for k in COMPONENTS)
                    + " bytes."
                    + _bytes_hint(got, n, precision)
                )

    return run_check("bytes of full fine-tuning", bytes_fn, body)


# BitFit: only the biases train.


def make_bitfit_reference(model):
    """BitFit (Ben Zaken et al. 2021, arXiv 2106.10199): every parameter whose name ends in ``bias``
    (linear layers and LayerNorm's beta) trains, everything else is frozen. Changes ``model`` in place and
    returns it; values are untouched."""
    for name, p in model.named_parameters():
        p.requires_grad = name.endswith("bias")
    return model


def _bitfit_cases():
    """Two small random models with biases everywhere a real one has them: GPT-2 (Conv1D layers, LayerNorm,
    a head tied to the embedding) and a BERT classifier (LayerNorm in the embeddings, a pooler, a head)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2))
    bert = BertForSequenceClassification(
        BertConfig(
            vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
        )
    )
    with torch.no_grad():  # biases start at zero in a fresh model: give them values, as pretraining would
        for model in (gpt2, bert):
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(std=0.02)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    return [
        ("a small GPT-2", gpt2, {"input_ids": ids, "labels": ids}),
        ("a small BERT classifier", bert, {"input_ids": ids, "labels": torch.tensor([0, 1])}),
    ]


def _trainable_hint(trainable: set[str], names: list[str]) -> str:
    biases = {n for n in names if n.endswith("bias")}
    if trainable == set(names):
        return " Every parameter still trains: freeze what is not a bias."
    if not trainable:
        return " Nothing trains: the biases must keep requires_grad=True."
    if trainable == set(names) - biases:
        return " That is the other way round: the biases train, the rest is frozen."
    missing, extra = sorted(biases - trainable), sorted(trainable - biases)
    if extra:
        return f" Not a bias, but it trains: {extra[0]}" + (
            f" (and {len(extra) - 1} more)." if len(extra) > 1 else "."
        )
    norm_missing = [n for n in missing if "ln" in n.lower() or "norm" in n.lower()]
    if norm_missing and len(norm_missing) == len(missing):
        return f" A normalization layer's bias (beta) is a bias too, and BitFit trains it: {norm_missing[0]}."
    return f" A bias that is frozen: {missing[0]}" + (
        f" (and {len(missing) - 1} more)." if len(missing) > 1 else "."
    )


def check_make_bitfit(bitfit_fn: Callable) -> bool | None:
    """Check ``bitfit_fn(model) -> model`` on a small GPT-2 and a small BERT classifier: exactly the
    biases require grad (checked by name and by count), no value is changed, and one AdamW step on a batch
    changes the biases and nothing else."""
    import copy

    import torch
    from torch import nn

    def body(fn):
        for name, model, batch in _bitfit_cases():
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            learner_copy = copy.deepcopy(model)
            got = fn(learner_copy)
            tuned = learner_copy if got is None else got
            if not isinstance(tuned, nn.Module):
                raise CheckFailed(f"return the model; your function returned {describe(got)}.")
            params = dict(tuned.named_parameters())
            if set(params) != set(before):
                raise CheckFailed(
                    f"{name}: the model's parameters changed names or number ({len(params)} instead of "
                    f"{len(before)}): set requires_grad on the parameters that are there, add or replace none."
                )
            changed = [n for n, p in params.items() if not torch.equal(p.detach(), before[n])]
            if changed:
                raise CheckFailed(
                    f"{name}: your function changed the values of {changed[0]}: BitFit only chooses what "
                    "trains, it starts from the pretrained values."
                )
            trainable = {n for n, p in params.items() if p.requires_grad}
            n_bias = sum(p.numel() for n, p in params.items() if n.endswith("bias"))
            n_trainable = sum(params[n].numel() for n in trainable)
            if trainable != {n for n in params if n.endswith("bias")}:
                raise CheckFailed(
                    f"{name}: {n_trainable:,} parameters train, the biases are {n_bias:,}."
                    + _trainable_hint(trainable, list(params))
                )
            tuned.train()
            opt = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=1e-2)
            tuned(**batch).loss.backward()
            unreached = sorted(n for n, p in tuned.named_parameters() if p.requires_grad and p.grad is None)
            if unreached:
                raise CheckFailed(
                    f"{name}: after backward() no gradient reached {unreached[0]}: the loss must still depend "
                    "on the biases through the model's own layers."
                )
            opt.step()
            moved = {n for n, p in tuned.named_parameters() if not torch.equal(p.detach(), before[n])}
            weights_moved = sorted(n for n in moved if not n.endswith("bias"))
            if weights_moved:
                raise CheckFailed(f"{name}: after one AdamW step a weight moved: {weights_moved[0]}.")
            if not moved:
                raise CheckFailed(f"{name}: after one AdamW step no bias moved: does the loss reach them?")

    return run_check("BitFit: only the biases train", bitfit_fn, body)
