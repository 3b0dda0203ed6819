"""Freezing: which parameters train, set by ``requires_grad``, for encoders (BERT) and decoders (Llama).

A frozen parameter (``requires_grad=False``) gets no gradient, so the optimizer skips it: no update, no
weight decay, no optimizer state. What freezing does **not** remove: the weights themselves, and the
activations autograd saves for every layer above the lowest trainable one (backward must pass through
them to reach it). Chapter 06 measures both.

Functions here change ``requires_grad`` in place and return the names they set trainable (or frozen), so a
cell can print and assert them. Counting is ``utils.models.count_parameters`` (each tied tensor once) and
``utils.train.trainable_summary``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence

from torch import nn

# Head modules of transformers' task models: BERT's `classifier` (its pooler belongs to `model.bert`),
# a decoder classifier's `score`, a causal LM's `lm_head`.
HEAD_PREFIXES = ("classifier.", "score.", "lm_head.")


def _patterns(patterns: str | Sequence[str]) -> list[str]:
    out = [patterns] if isinstance(patterns, str) else list(patterns)
    if not out:
        raise ValueError("Pass at least one name pattern (a regular expression searched in each name).")
    return out


def _names_matching(model: nn.Module, patterns: str | Sequence[str]) -> list[str]:
    """Parameter names in which some pattern is found (``re.search``); a pattern that matches no name is an
    error that lists the names, so a typo cannot silently freeze (or train) nothing."""
    names = [n for n, _ in model.named_parameters()]
    pats = _patterns(patterns)
    for pat in pats:
        if not any(re.search(pat, n) for n in names):
            shown = ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
            raise ValueError(f"The pattern {pat!r} matches no parameter name. The names are: {shown}")
    return [n for n in names if any(re.search(p, n) for p in pats)]


def _set_trainable(model: nn.Module, patterns: str | Sequence[str], trainable: bool) -> list[str]:
    names = _names_matching(model, patterns)
    params = dict(model.named_parameters())
    for n in names:
        params[n].requires_grad_(trainable)
    return names


def freeze(model: nn.Module, patterns: str | Sequence[str]) -> list[str]:
    """Freeze every parameter whose name matches one of ``patterns`` (regular expressions, ``re.search``);
    the others keep their ``requires_grad``. Returns the frozen names."""
    return _set_trainable(model, patterns, False)


def unfreeze(model: nn.Module, patterns: str | Sequence[str]) -> list[str]:
    """Make every parameter whose name matches one of ``patterns`` trainable; returns their names."""
    return _set_trainable(model, patterns, True)


def train_only(model: nn.Module, patterns: str | Sequence[str]) -> list[str]:
    """Freeze everything, then make the parameters matching ``patterns`` trainable; returns their names."""
    names = _names_matching(model, patterns)
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
    return names


def trainable_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def layers(model: nn.Module) -> nn.ModuleList:
    """The stack of transformer blocks: ``bert.encoder.layer`` (BERT) or ``model.layers`` (Llama), also
    inside a peft model (``utils.models.layer_stack``)."""
    from utils.models import layer_stack

    stack = layer_stack(model)
    if stack is None:
        raise ValueError(
            f"Found no stack of layers (bert.encoder.layer or model.layers) in {type(model).__name__}."
        )
    return stack


def _layer_prefix(model: nn.Module) -> str:
    """The parameter-name prefix of the blocks, e.g. ``"bert.encoder.layer."``."""
    stack = layers(model)
    for name, module in model.named_modules():
        if module is stack:
            return name + "."
    raise ValueError("The stack of layers is not a submodule of this model.")  # pragma: no cover


def _check_k(model: nn.Module, k: int) -> int:
    n = len(layers(model))
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= n:
        raise ValueError(f"k must be an integer from 0 to the number of layers, {n}; got {k!r}.")
    return n


def is_head(name: str) -> bool:
    return name.startswith(HEAD_PREFIXES)


def freeze_all_but_head(model: nn.Module) -> list[str]:
    """The linear probe: every parameter frozen but the task head (``classifier`` / ``score``). Returns the
    trainable names. For BERT this is the interview answer ``for p in model.bert.parameters():
    p.requires_grad = False`` (the pooler is part of ``model.bert``, so it is frozen too)."""
    names = [n for n, _ in model.named_parameters() if is_head(n)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no head named classifier, score or lm_head.")
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
    return names


def _layer_index(name: str, prefix: str) -> int | None:
    if not name.startswith(prefix):
        return None
    return int(name[len(prefix) :].split(".")[0])


def freeze_bottom_layers(model: nn.Module, k: int) -> list[str]:
    """Freeze the embeddings and the lowest ``k`` blocks; everything above (blocks k..L-1, final norm,
    pooler, head) trains. ``k=0`` freezes only the embeddings. Returns the frozen names.

    With tied embeddings (the tiny Llama's ``lm_head`` *is* ``embed_tokens``) the head is frozen with them.
    """
    _check_k(model, k)
    prefix = _layer_prefix(model)
    frozen = []
    for n, p in model.named_parameters():
        i = _layer_index(n, prefix)
        below = ("embed" in n and i is None) or (i is not None and i < k)
        p.requires_grad_(not below)
        if below:
            frozen.append(n)
    return frozen


def freeze_top_layers(model: nn.Module, k: int) -> list[str]:
    """Freeze the highest ``k`` blocks only (a contrast for measurements: it saves gradients and optimizer
    state but hardly any activation memory). Everything else trains. Returns the frozen names."""
    n_layers = _check_k(model, k)
    prefix = _layer_prefix(model)
    frozen = []
    for n, p in model.named_parameters():
        i = _layer_index(n, prefix)
        top = i is not None and i >= n_layers - k
        p.requires_grad_(not top)
        if top:
            frozen.append(n)
    return frozen


def train_top_layers(model: nn.Module, k: int) -> list[str]:
    """Train the highest ``k`` blocks and everything above them (final norm, BERT's pooler, the head);
    freeze the rest. ``k=0`` is the linear probe plus the pooler / final norm. Returns the trainable names."""
    n_layers = _check_k(model, k)
    prefix = _layer_prefix(model)
    trainable = []
    for n, p in model.named_parameters():
        i = _layer_index(n, prefix)
        above_stack = i is None and "embed" not in n
        keep = above_stack or (i is not None and i >= n_layers - k)
        p.requires_grad_(keep)
        if keep:
            trainable.append(n)
    return trainable


def bitfit(model: nn.Module) -> list[str]:
    """BitFit (Ben Zaken et al. 2021, arXiv 2106.10199): only the biases train, plus the new task head
    (the paper trains the classifier too; a random head must learn). Returns the trainable names."""
    names = [n for n, _ in model.named_parameters() if n.endswith("bias") or is_head(n)]
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
    return names


def unfrozen_layers(epoch: int, n_layers: int) -> list[int]:
    """Gradual unfreezing (ULMFiT, Howard and Ruder 2018, arXiv 1801.06146): the block indices that train
    in ``epoch`` (0-based). Epoch 0 trains the head alone; each later epoch unfreezes one more block from
    the top: epoch e trains blocks ``n_layers - e .. n_layers - 1`` (all of them from epoch ``n_layers``)."""
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"epoch must be a non-negative integer, got {epoch!r}.")
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
        raise ValueError(f"n_layers must be a positive integer, got {n_layers!r}.")
    return list(range(max(0, n_layers - epoch), n_layers))


def gradual_unfreezing(model: nn.Module, schedule: Callable[[int, int], list[int]] = unfrozen_layers):
    """An ``on_epoch_start`` callback for ``utils.train.train_loop``: before each epoch, the head, the
    parts above the stack (pooler, final norm) and the blocks ``schedule(epoch, n_layers)`` train; the
    embeddings and the other blocks are frozen.

    Give ``train_loop`` **every** parameter (``params=model.parameters()``): its default is the parameters
    that require grad when it starts, the head alone here, so the layers unfrozen later would get gradients
    but never an update. Frozen ones cost nothing in the optimizer: their gradient stays None, and AdamW
    skips them (no state, no decay) until they first get one.
    """
    n_layers = len(layers(model))
    prefix = _layer_prefix(model)

    def on_epoch_start(epoch: int) -> None:
        chosen = set(schedule(epoch, n_layers))
        for n, p in model.named_parameters():
            i = _layer_index(n, prefix)
            p.requires_grad_(i in chosen if i is not None else "embed" not in n)

    return on_epoch_start


def require_trainable(model: nn.Module) -> int:
    """The number of trainable parameters; raises when there is none (a training run would do nothing)."""
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if n == 0:
        raise ValueError(
            "Nothing in this model is trainable (every requires_grad is False): unfreeze something, e.g. the "
            "head, before training."
        )
    return n


# ------------------------------------------------------------------------ strategies at one budget

STRATEGIES = ("full", "head only", "top-k + head", "bottom-k frozen", "bitfit", "lora", "gradual unfreezing")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def apply_strategy(model: nn.Module, strategy: str, k: int = 1, rank: int = 8):
    """Set what trains in ``model`` for one of ``STRATEGIES`` and return the model to train (a peft model for
    ``"lora"``: LoRA on every projection of a Llama, rank ``rank``, alpha 2 x rank, head trained).

    ``"top-k + head"``: the top ``k`` blocks and the head; ``"bottom-k frozen"``: embeddings and the lowest
    ``k`` blocks frozen; ``"gradual unfreezing"`` starts as head only (pass ``gradual_unfreezing(model)`` to
    the loop).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"Unknown strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}.")
    if strategy == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif strategy in ("head only", "gradual unfreezing"):
        freeze_all_but_head(model)
    elif strategy == "top-k + head":
        train_top_layers(model, k)
    elif strategy == "bottom-k frozen":
        freeze_bottom_layers(model, k)
    elif strategy == "bitfit":
        bitfit(model)
    else:
        import peft

        config = peft.LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules=list(LORA_TARGETS), task_type="SEQ_CLS"
        )
        model = peft.get_peft_model(model, config)
    require_trainable(model)
    return model


def classifier_scores(
    model: nn.Module, examples: list[dict], pad_token_id: int, batch_size: int = 128
) -> dict:
    """Accuracy and macro F1 (``utils.metrics.classification_scores``) of a sequence classifier on examples
    ``{"input_ids", "labels": int}``; leaves the model in eval mode."""
    import torch

    from utils import metrics, sft

    model.eval()
    preds, gold = [], []
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = sft.collate(examples[start : start + batch_size], pad_token_id)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            preds += logits.argmax(-1).tolist()
            gold += batch["labels"].tolist()
    return metrics.classification_scores(gold, preds)


def run_strategy(
    make_model: Callable[[], nn.Module],
    strategy: str,
    train_examples: list[dict],
    test_examples: list[dict],
    pad_token_id: int,
    *,
    lr: float,
    epochs: int = 5,
    batch_size: int = 32,
    k: int = 1,
    seed: int = 0,
) -> dict:
    """Train one strategy at a fixed budget and measure it: ``{"strategy", "trainable", "accuracy",
    "macro_f1", "seconds_per_step", "grad_optimizer_bytes"}``.

    The budget is the same for every strategy: ``epochs`` epochs over consecutive slices of
    ``train_examples`` (``len // epochs`` examples each, so no example is seen twice), ``batch_size`` per
    step. ``make_model()`` returns a fresh model (seeded by the caller). Gradient and AdamW bytes are measured
    on one batch by ``utils.memory.measure_training_memory``; seconds per step are wall time of the loop
    (a shared machine makes them noisy: compare them, do not quote them)."""
    import torch

    from utils import memory, sft, train

    torch.manual_seed(seed)
    model = apply_strategy(make_model(), strategy, k=k)
    per_epoch = len(train_examples) // epochs
    schedule = gradual_unfreezing(model) if strategy == "gradual unfreezing" else None
    start = time.perf_counter()
    history = train.train_loop(
        model,
        lambda epoch: train_examples[epoch * per_epoch : (epoch + 1) * per_epoch],
        pad_token_id=pad_token_id,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        warmup_steps=2,
        params=list(model.parameters()),  # every parameter: gradual unfreezing adds layers later
        on_epoch_start=schedule,
        seed=seed,
    )
    seconds = time.perf_counter() - start
    steps = history[-1]["step"]
    if schedule is not None:  # measure the memory of the last epoch's configuration, the largest
        schedule(epochs - 1)
    step = memory.measure_training_memory(model, sft.collate(train_examples[:batch_size], pad_token_id))
    scores = classifier_scores(model, test_examples, pad_token_id)
    return {
        "strategy": strategy,
        "trainable": step.n_trainable,
        "accuracy": scores["accuracy"],
        "macro_f1": scores["macro_f1"],
        "seconds_per_step": seconds / steps,
        "grad_optimizer_bytes": step.gradients + step.optimizer,
    }
