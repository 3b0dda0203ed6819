"""One plain PyTorch training loop, the one every chapter (and pretraining) uses, written to be read.

    for each optimizer step:
        set the learning rate from the schedule
        for each of the `accumulation_steps` micro-batches:
            loss = loss_fn(model, batch)          # under autocast if asked
            (loss * its share of the step).backward()
        clip the gradient norm, optimizer.step(), zero the gradients
        every `log_every` steps: log the mean loss; every `eval_every` steps: evaluate, maybe stop early

What it does not do is on purpose: no distributed training (chapter 07 runs that from a script), no
checkpoint files (chapter 08 writes and resumes them). Options cover the course's needs: parameter groups
(per-group learning rates, no weight decay on norms), gradual unfreezing (``on_epoch_start``), gradient
accumulation weighted by target tokens, autocast (bf16; fp16 with a ``torch.amp.GradScaler``, as a T4
needs), periodic evaluation with early stopping that restores the best weights.

Shapes: an example is a dict of lists (``input_ids``, ``attention_mask``, ``labels``); ``collate_fn`` turns
a list of examples into a dict of tensors (batch, seq). Losses in nats.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from utils.env import progress
from utils.sft import IGNORE_INDEX, collate

SCHEDULES = ("linear", "cosine", "constant")


def lr_factor(
    step: int, total: int, warmup_steps: int, schedule: str = "linear", floor: float = 0.0
) -> float:
    """The learning rate at optimizer step ``step`` (0-based) as a share of the peak.

    Linear warmup over ``warmup_steps`` (``(step + 1) / warmup_steps``), then ``"linear"`` decay to 0 at
    ``total`` (as transformers' ``get_linear_schedule_with_warmup``), ``"cosine"`` decay to ``floor``, or
    ``"constant"``.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"Unknown schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}.")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return max(0.0, (total - step) / max(1, total - warmup_steps))
    progress = (step - warmup_steps) / max(1, total - warmup_steps)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class EarlyStopping:
    """Stop when ``metric`` has not improved by more than ``threshold`` for ``patience`` evaluations in a
    row (transformers' ``EarlyStoppingCallback`` rule), then restore the best weights."""

    patience: int = 3
    threshold: float = 0.0
    metric: str = "eval_loss"
    greater_is_better: bool = False

    def __post_init__(self) -> None:
        if self.patience < 1:
            raise ValueError(f"patience must be at least 1, got {self.patience}.")

    def improved(self, value: float, best: float | None) -> bool:
        if best is None:
            return True
        return value > best + self.threshold if self.greater_is_better else value < best - self.threshold


def lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's own loss (for a causal LM: mean cross-entropy over the shifted, unmasked targets)."""
    return model(**batch).loss


def target_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that reach a causal LM's loss: shifted labels that are not -100."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def train_loop(
    model: nn.Module,
    examples: Sequence | Callable[[int], Sequence],
    *,
    pad_token_id: int | None = None,
    collate_fn: Callable[[list], dict[str, torch.Tensor]] | None = None,
    loss_fn: Callable[[nn.Module, dict], torch.Tensor] = lm_loss,
    epochs: int = 1,
    max_steps: int | None = None,
    batch_size: int = 16,
    lr: float = 1e-3,
    params: Iterable | None = None,
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
    optimizer_kwargs: dict | None = None,
    weight_decay: float = 0.0,
    schedule: str = "linear",
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.0,
    max_grad_norm: float | None = 1.0,
    accumulation_steps: int = 1,
    autocast_dtype: torch.dtype | None = None,
    eval_fn: Callable[[nn.Module], dict[str, float]] | None = None,
    eval_every: int | None = None,
    early_stopping: EarlyStopping | None = None,
    on_epoch_start: Callable[[int], None] | None = None,
    on_log: Callable[[dict], None] | None = None,
    on_gradients: Callable[[int, float], None] | None = None,
    shuffle: bool = True,
    seed: int = 0,
    log_every: int = 20,
) -> list[dict]:
    """Train ``model`` in place with AdamW (or ``optimizer_cls``), warmup and a decaying learning rate,
    gradient clipping; returns the history.

    ``examples``: a list of examples, or a function ``epoch -> list`` (pretraining re-packs its documents
    every epoch). ``collate_fn`` defaults to right padding with ``pad_token_id`` (``utils.sft.collate``).
    ``params``: the parameters (or parameter groups, dicts with their own ``lr`` / ``weight_decay``) to
    optimize; default every parameter with ``requires_grad``. A parameter whose gradient stays ``None``
    (frozen) is skipped by the optimizer: no update, no weight decay.

    ``accumulation_steps = k``: one optimizer step per k micro-batches of ``batch_size``. Each micro-batch's
    mean loss is weighted by its share of the step's target tokens, so the gradient equals the gradient of
    one batch of k * batch_size examples (exactly, up to float rounding, even with answers of mixed length).

    ``on_epoch_start(epoch)`` runs before each epoch (gradual unfreezing changes ``requires_grad`` there);
    ``on_log(entry)`` after each logged step (progress lines). ``on_gradients(step, loss)`` after each
    step's backward pass, before clipping and the update, with the 1-based step and its loss: a check that
    reads the gradients there (``utils.quant.LearningGuard`` raises when trainable tensors get none).

    ``eval_fn(model) -> {"eval_loss": ...}`` runs every ``eval_every`` optimizer steps (and at the end);
    with ``early_stopping`` the loop stops when the metric stops improving and loads the best weights back.

    History: one dict per logged step: ``step``, ``epoch``, ``loss`` (the mean over the steps since the last
    log, as ``Trainer`` logs it), ``lr``, ``seconds``; evaluation results are merged into the entry of their
    step. Leaves the model in eval mode.
    """
    if accumulation_steps < 1:
        raise ValueError(f"accumulation_steps must be at least 1, got {accumulation_steps}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    if collate_fn is None:
        if pad_token_id is None:
            raise ValueError("Pass pad_token_id (for the default right-padding collator) or a collate_fn.")
        collate_fn = partial(collate, pad_token_id=pad_token_id)
    if early_stopping is not None and eval_fn is None:
        raise ValueError("early_stopping needs an eval_fn (and eval_every): there is nothing to compare.")
    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]
    params = list(params)
    if not params:
        raise ValueError("The model has no trainable parameters (every requires_grad is False).")
    groups = params if isinstance(params[0], dict) else [{"params": params}]
    opt = optimizer_cls(groups, lr=lr, weight_decay=weight_decay, **(optimizer_kwargs or {}))
    for group in opt.param_groups:
        group.setdefault("initial_lr", group["lr"])
    all_params = [p for group in opt.param_groups for p in group["params"]]

    get_examples = examples if callable(examples) else (lambda epoch: examples)
    first_rows = get_examples(0)  # called once per epoch: a function may shuffle or re-pack each time
    micro_batches_per_epoch = math.ceil(len(first_rows) / batch_size)
    steps_per_epoch = math.ceil(micro_batches_per_epoch / accumulation_steps)
    total = min(max_steps, steps_per_epoch * epochs) if max_steps else steps_per_epoch * epochs
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    # fp16 gradients underflow to zero below 6e-8: scale the loss up, unscale before clipping (chapter 07)
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)

    history: list[dict] = []
    best_value, best_state, bad_evals, stopped = None, None, 0, False
    bar = progress(total=total, desc="training")  # drawn only in an interactive session (utils.env.progress)
    step, running, counted, start = 0, 0.0, 0, time.time()

    def evaluate(entry: dict) -> bool:
        """Evaluate, record, and say whether to stop."""
        nonlocal best_value, best_state, bad_evals
        entry.update(eval_fn(model))
        model.train()
        if early_stopping is None:
            return False
        value = entry[early_stopping.metric]
        if early_stopping.improved(value, best_value):
            best_value, bad_evals = value, 0
            best_state = copy.deepcopy(model.state_dict())
            entry["best"] = True
        else:
            bad_evals += 1
        return bad_evals >= early_stopping.patience

    model.train()
    for epoch in range(epochs):
        if step >= total:
            break
        if on_epoch_start is not None:
            on_epoch_start(epoch)
        rows = first_rows if epoch == 0 else get_examples(epoch)
        order = torch.randperm(len(rows), generator=gen).tolist() if shuffle else list(range(len(rows)))
        starts = range(0, len(rows), batch_size)
        micro = [order[b : b + batch_size] for b in starts]  # example indices of each micro-batch
        for first in range(0, len(micro), accumulation_steps):
            group_batches = [
                collate_fn([rows[i] for i in m]) for m in micro[first : first + accumulation_steps]
            ]
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * lr_factor(
                    step, total, warmup_steps, schedule, min_lr_ratio
                )
            if len(group_batches) == 1:
                shares = [1.0]
            else:  # each micro-batch weighs by its share of the step's target tokens
                counts = [target_tokens(b) for b in group_batches]
                shares = [n / sum(counts) for n in counts]
            step_loss = 0.0
            for batch, share in zip(group_batches, shares, strict=True):
                batch = {k: v.to(device) for k, v in batch.items()}
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    loss = loss_fn(model, batch)
                scaler.scale(loss * share if share != 1.0 else loss).backward()
                step_loss += loss.item() * share
            scaler.unscale_(opt)
            if on_gradients is not None:
                on_gradients(step + 1, step_loss)
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(all_params, max_grad_norm)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            running, counted = running + step_loss, counted + 1
            at_eval = eval_fn is not None and ((eval_every and step % eval_every == 0) or step == total)
            if step % log_every == 0 or step == total or at_eval:
                entry = {
                    "step": step,
                    "epoch": epoch + 1,
                    "loss": running / counted,
                    "lr": opt.param_groups[0]["lr"],
                }
                running, counted = 0.0, 0
                if at_eval:
                    stopped = evaluate(entry)
                entry["seconds"] = time.time() - start
                history.append(entry)
                bar.set_postfix(loss=f"{entry['loss']:.3f}")
                if on_log is not None:
                    on_log(entry)
            if stopped or step >= total:
                break
        if stopped:
            break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return history


def trainable_summary(model: nn.Module) -> str:
    """``"trainable 12,345 of 1,967,808 (0.63%)"``: a one-line check before training."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"trainable {trainable:,} of {total:,} ({trainable / total:.2%})"
