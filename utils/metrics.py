"""Measuring a language model: perplexity, fact completion, exact match on instructions.

Shapes: ``input_ids``, ``labels``: (batch, seq); ``logits``: (batch, seq, vocab). Losses in nats.
"""

from __future__ import annotations

import math
import re
import string
from collections import defaultdict

import torch
import torch.nn.functional as F

from utils.env import progress
from utils.sft import IGNORE_INDEX, collate  # -100: the label value cross-entropy skips


def _batches(items: list, batch_size: int):
    for start in range(0, len(items), batch_size):
        yield items[start : start + batch_size]


def _encode(tokenizer, text: str, prefix_bos: bool) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if prefix_bos and tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id, *ids]
    return ids


@torch.no_grad()
def token_nll(
    model, tokenizer, texts: list[str], batch_size: int = 32, prefix_bos: bool = True
) -> tuple[float, int]:
    """Summed next-token negative log-likelihood (nats) of ``texts`` and the number of predicted tokens.

    A sequence of n tokens has n - 1 predicted targets (each token predicts the next); padding is never
    a target. With ``prefix_bos`` the BOS token is prepended, so the first real token is predicted too.
    """
    if not texts:
        raise ValueError("texts is empty: perplexity needs at least one text.")
    model.eval()
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for chunk in _batches(texts, batch_size):
        seqs = [_encode(tokenizer, t, prefix_bos) for t in chunk]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        batch = collate([{"input_ids": s, "labels": s} for s in seqs], pad)
        labels = batch.pop("labels")
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float()
        targets = labels[:, 1:].to(device)  # shift: position t predicts token t + 1
        nll = F.cross_entropy(
            logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        total_nll += nll.item()
        total_tokens += int((targets != IGNORE_INDEX).sum())
    return total_nll, total_tokens


def perplexity(model, tokenizer, texts: list[str], batch_size: int = 32, prefix_bos: bool = True) -> float:
    """exp(mean next-token NLL), token-weighted over all texts, padding excluded."""
    nll, n = token_nll(model, tokenizer, texts, batch_size, prefix_bos)
    return math.exp(nll / n)


@torch.no_grad()
def fact_completion_accuracy(model, tokenizer, facts: list[dict], batch_size: int = 64) -> float:
    """Share of ``{"prompt", "answer"}`` sentences whose answer the model completes greedily, every token.

    The prompt is followed by " " + answer; a fact counts when the argmax prediction at every answer
    position is the answer's token (exactly what greedy decoding would produce).
    """
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for chunk in _batches(facts, batch_size):
        prompts = [_encode(tokenizer, f["prompt"], True) for f in chunk]
        answers = [tokenizer(" " + f["answer"], add_special_tokens=False)["input_ids"] for f in chunk]
        seqs = [p + a for p, a in zip(prompts, answers, strict=True)]
        batch = collate([{"input_ids": s} for s in seqs], tokenizer.pad_token_id)
        predicted = model(**{k: v.to(device) for k, v in batch.items()}).logits.argmax(-1).cpu()
        for i, (p, a) in enumerate(zip(prompts, answers, strict=True)):
            guess = predicted[i, len(p) - 1 : len(p) - 1 + len(a)].tolist()
            correct += guess == a
    return correct / len(facts)


def normalize_answer(text: str) -> str:
    """Lowercase, trim, drop surrounding punctuation and collapse spaces ("  Morvale. " -> "morvale")."""
    text = re.sub(r"\s+", " ", text.strip().lower())
    return text.strip(string.punctuation + " ")


@torch.no_grad()
def generate_answers(
    model, tokenizer, prompts: list[str], max_new_tokens: int = 8, batch_size: int = 64
) -> list[str]:
    """Greedy answers to user ``prompts``, each rendered with the tokenizer's chat template.

    Prompts are left-padded in a batch so that every answer starts at the same position.
    """
    model.eval()
    device = next(model.parameters()).device
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    answers: list[str] = []
    try:
        batches = progress(
            _batches(prompts, batch_size), total=math.ceil(len(prompts) / batch_size), desc="generating"
        )
        for chunk in batches:
            texts = [
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
                )
                for p in chunk
            ]
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            new_tokens = out[:, batch["input_ids"].shape[1] :]
            answers += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = old_side
    return answers


def exact_match(
    model,
    tokenizer,
    dataset,
    max_new_tokens: int = 8,
    batch_size: int = 64,
    by_task: bool = False,
    limit: int | None = None,
):
    """Share of rows whose greedy answer equals the assistant's answer after ``normalize_answer``.

    ``dataset`` is a ``datasets.Dataset`` (or a list of rows) with a ``messages`` column: the first
    user message is the prompt, the last assistant message the reference. Returns a float in [0, 1];
    with ``by_task`` also a dict of per-task scores (rows need a ``task`` field).
    """
    rows = list(dataset)[:limit] if limit else list(dataset)
    if not rows:
        raise ValueError("The dataset is empty: exact match needs at least one row.")
    prompts, references = [], []
    for i, row in enumerate(rows):
        messages = row["messages"]
        if messages[-1]["role"] != "assistant":
            raise ValueError(
                f"Row {i}: the last message is from {messages[-1]['role']!r}, not the assistant."
            )
        prompts.append(next(m["content"] for m in messages if m["role"] == "user"))
        references.append(messages[-1]["content"])
    answers = generate_answers(model, tokenizer, prompts, max_new_tokens, batch_size)
    hits = [normalize_answer(a) == normalize_answer(r) for a, r in zip(answers, references, strict=True)]
    score = sum(hits) / len(hits)
    if not by_task:
        return score
    per_task: dict[str, list[bool]] = defaultdict(list)
    for row, hit in zip(rows, hits, strict=True):
        per_task[row.get("task", "all")].append(hit)
    return score, {task: sum(v) / len(v) for task, v in sorted(per_task.items())}


def perplexity_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """exp(mean next-token NLL) of a batch: ``logits`` (batch, seq, vocab), ``labels`` (batch, seq).

    Position t predicts label t + 1 (the shift), labels of -100 (padding, masked prompts) are not
    targets, and the mean is over every target token of the batch (not per sequence).
    """
    targets = labels[:, 1:]
    n = int((targets != IGNORE_INDEX).sum())
    if n == 0:
        raise ValueError("No target tokens: every shifted label is -100 (or each sequence has one token).")
    nll = F.cross_entropy(
        logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return math.exp(nll.item() / n)


@torch.no_grad()
def strided_nll(model, input_ids, max_length: int, stride: int) -> tuple[float, int]:
    """Summed NLL (nats) and number of scored tokens of one long sequence of ``input_ids`` (a list or a
    1-D tensor), window by window.

    The transformers documentation's strided evaluation: windows of ``max_length`` tokens start every
    ``stride`` tokens; each window scores only the tokens the previous one did not, so every token after
    the first is scored exactly once, with at least ``max_length - stride`` tokens of context after the
    first window. ``stride == max_length`` is disjoint chunks (each chunk's first token has no context
    and is not scored). ``stride > max_length`` would skip tokens: a ValueError.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 (a context and a target), got {max_length}.")
    if not 1 <= stride <= max_length:
        raise ValueError(
            f"stride must be between 1 and max_length = {max_length}, got {stride}: a stride larger than "
            "the window skips tokens that no window scores."
        )
    ids = torch.as_tensor(input_ids, dtype=torch.long).flatten()
    if len(ids) < 2:
        raise ValueError(
            f"The text has {len(ids)} token(s): perplexity needs at least 2 (there is no target to predict)."
        )
    model.eval()
    ids = ids[None].to(next(model.parameters()).device)
    seq_len = ids.shape[1]
    total_nll, total_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        window = ids[:, begin:end]
        labels = window.clone()
        labels[:, : -(end - prev_end)] = IGNORE_INDEX  # scored already by the previous window
        logits = model(window).logits.float()
        targets = labels[:, 1:]
        total_nll += F.cross_entropy(
            logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        ).item()
        total_tokens += int((targets != IGNORE_INDEX).sum())
        prev_end = end
        if end == seq_len:
            break
    return total_nll, total_tokens


def sliding_window_nll(
    model, tokenizer, text: str, max_length: int, stride: int, prefix_bos: bool = True
) -> tuple[float, int]:
    """``strided_nll`` of ``text`` (BOS first with ``prefix_bos``, as ``perplexity``)."""
    if max_length < 2 or not 1 <= stride <= max_length:
        strided_nll(None, [0, 0], max_length, stride)  # the same errors before any encoding
    return strided_nll(model, _encode(tokenizer, text, prefix_bos), max_length, stride)


def sliding_window_perplexity(
    model, tokenizer, text: str, max_length: int, stride: int, prefix_bos: bool = True
) -> float:
    """Perplexity of a text longer than the context, by strided windows (``sliding_window_nll``)."""
    nll, n = sliding_window_nll(model, tokenizer, text, max_length, stride, prefix_bos)
    return math.exp(nll / n)


def classification_scores(y_true: list, y_pred: list) -> dict[str, float]:
    """Accuracy, macro and micro precision / recall / F1 of single-label predictions.

    Macro: the mean over the classes seen in ``y_true`` or ``y_pred`` (every class counts the same, so a
    rare class missed weighs as much as a common one). Micro: from the counts pooled over classes, which
    for single-label data equals accuracy.
    """
    if len(y_true) != len(y_pred) or not y_true:
        raise ValueError(f"Need equally long, non-empty label lists; got {len(y_true)} and {len(y_pred)}.")
    classes = sorted(set(y_true) | set(y_pred), key=str)
    tp = {c: sum(t == p == c for t, p in zip(y_true, y_pred, strict=True)) for c in classes}
    fp = {c: sum(p == c != t for t, p in zip(y_true, y_pred, strict=True)) for c in classes}
    fn = {c: sum(t == c != p for t, p in zip(y_true, y_pred, strict=True)) for c in classes}

    def prf(tp_, fp_, fn_):
        precision = tp_ / (tp_ + fp_) if tp_ + fp_ else 0.0
        recall = tp_ / (tp_ + fn_) if tp_ + fn_ else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return precision, recall, f1

    per_class = [prf(tp[c], fp[c], fn[c]) for c in classes]
    micro = prf(sum(tp.values()), sum(fp.values()), sum(fn.values()))
    return {
        "accuracy": sum(t == p for t, p in zip(y_true, y_pred, strict=True)) / len(y_true),
        "macro_precision": sum(p for p, _, _ in per_class) / len(classes),
        "macro_recall": sum(r for _, r, _ in per_class) / len(classes),
        "macro_f1": sum(f for _, _, f in per_class) / len(classes),
        "micro_precision": micro[0],
        "micro_recall": micro[1],
        "micro_f1": micro[2],
    }
