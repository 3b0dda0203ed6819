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
        for chunk in _batches(prompts, batch_size):
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
