"""Supervised fine-tuning data: conversations to masked training examples, padding, packing.

The training loop every chapter uses is ``utils.train.train_loop``.

Label masking: the loss is computed only on the assistant's tokens. Every other position gets the label
``-100``, which ``torch.nn.functional.cross_entropy`` (and so every transformers model) skips.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100  # label value that cross-entropy skips (prompt tokens, padding)


def to_messages(row: dict) -> dict:
    """A prompt/completion row ``{"prompt": str, "completion": str}`` as a conversational row."""
    missing = {"prompt", "completion"} - set(row)
    if missing:
        raise ValueError(
            f"A prompt/completion row needs the keys prompt and completion; missing {sorted(missing)}."
        )
    return {
        "messages": [
            {"role": "user", "content": row["prompt"]},
            {"role": "assistant", "content": row["completion"]},
        ]
    }


def to_prompt_completion(row: dict) -> dict:
    """A single-turn conversational row as ``{"prompt", "completion"}`` (a system message is kept in front
    of the prompt, separated by a blank line)."""
    messages = row["messages"]
    if len(messages) < 2 or messages[-1]["role"] != "assistant" or messages[-2]["role"] != "user":
        raise ValueError(
            "Only a conversation ending with one user turn and one assistant turn converts to prompt/completion."
        )
    if len(messages) > 3 or (len(messages) == 3 and messages[0]["role"] != "system"):
        raise ValueError(
            f"A {len(messages)}-message conversation has several turns: keep it in the messages format."
        )
    prompt = "\n\n".join(m["content"] for m in messages[:-1])
    return {"prompt": prompt, "completion": messages[-1]["content"]}


def tokenize_conversation(
    tokenizer, messages: list[dict], max_length: int | None = None
) -> dict[str, list[int]]:
    """Render ``messages`` with the chat template; labels are the token ids on the assistant's tokens
    and ``-100`` elsewhere.

    Raises ValueError for a conversation that does not end with an assistant message, an empty
    assistant answer, or one longer than ``max_length`` tokens (a truncated answer would teach the
    model to stop mid-answer; drop or shorten such rows before training).
    """
    if not messages or messages[-1].get("role") != "assistant":
        last = messages[-1].get("role") if messages else None
        raise ValueError(
            f"The conversation must end with an assistant message to learn from; it ends with {last!r}."
        )
    for m in messages:
        if m["role"] == "assistant" and not m["content"].strip():
            raise ValueError("An assistant message is empty: there is nothing to learn from it.")
    out = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    input_ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    if not any(mask):  # a template without {% generation %} marks: find the answers by rendering prefixes
        mask = _assistant_mask_by_prefix(tokenizer, messages, input_ids)
    if max_length is not None and len(input_ids) > max_length:
        raise ValueError(f"The conversation has {len(input_ids)} tokens, more than max_length={max_length}.")
    labels = [t if m else IGNORE_INDEX for t, m in zip(input_ids, mask, strict=True)]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def _assistant_mask_by_prefix(tokenizer, messages: list[dict], input_ids: list[int]) -> list[int]:
    """Assistant-token mask for chat templates that have no ``{% generation %}`` block (many hub models):
    answer i spans from the end of ``template(messages[:i], add_generation_prompt=True)`` to the end of
    ``template(messages[: i + 1])``, less trailing whitespace tokens. Needs a template whose renderings of prefixes are token prefixes."""
    mask = [0] * len(input_ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(
            tokenizer.apply_chat_template(
                messages[:i], add_generation_prompt=True, tokenize=True, return_dict=True
            )["input_ids"]
        )
        end = len(
            tokenizer.apply_chat_template(messages[: i + 1], tokenize=True, return_dict=True)["input_ids"]
        )
        while end > start and not tokenizer.decode(input_ids[end - 1 : end]).strip():
            end -= 1  # the newline between turns is layout, not part of the answer
        if end > len(input_ids) or start >= end:
            raise ValueError(
                "This chat template does not render prefixes consistently; mark answers with {% generation %}."
            )
        mask[start:end] = [1] * (end - start)
    return mask


def tokenize_rows(tokenizer, rows, max_length: int | None = None, mask_prompt: bool = True) -> list[dict]:
    """Tokenize every row's ``messages``. With ``mask_prompt=False`` the loss covers all tokens
    (the ablation of chapter 01)."""
    examples = []
    for row in rows:
        ex = tokenize_conversation(tokenizer, row["messages"], max_length)
        if not mask_prompt:
            ex["labels"] = list(ex["input_ids"])
        examples.append(ex)
    return examples


def collate(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples to the longest one: (batch, seq) tensors.

    ``input_ids`` is required; padding gets ``pad_token_id``, attention 0 and label -100. A missing
    ``attention_mask`` means every token is real; ``labels`` may be a list per token (padded with -100) or
    one integer per example (a class label, batched as a (batch,) tensor); without ``labels`` none are made.
    """
    if not examples:
        raise ValueError("collate got no examples.")
    width = max(len(e["input_ids"]) for e in examples)
    batch = {
        "input_ids": torch.full((len(examples), width), pad_token_id, dtype=torch.long),
        "attention_mask": torch.zeros((len(examples), width), dtype=torch.long),
    }
    token_labels = "labels" in examples[0] and not isinstance(examples[0]["labels"], int)
    if token_labels:
        batch["labels"] = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        batch["input_ids"][i, :n] = torch.tensor(e["input_ids"])
        batch["attention_mask"][i, :n] = torch.tensor(e.get("attention_mask", [1] * n))
        if token_labels:
            batch["labels"][i, :n] = torch.tensor(e["labels"])
    if "labels" in examples[0] and not token_labels:
        batch["labels"] = torch.tensor([e["labels"] for e in examples], dtype=torch.long)
    return batch


def pack_examples(examples: list[dict], block_size: int) -> list[dict]:
    """Greedily pack tokenized examples into rows of at most ``block_size`` tokens (first fit, in order).

    Each packed row has ``input_ids``, ``labels``, ``position_ids`` (restarting at 0 for every example,
    as if each were alone) and ``seq_lengths`` (the lengths of the examples in the row, which
    ``packed_attention_mask`` turns into a block-diagonal mask). An example never spans two rows.
    """
    rows: list[dict] = []
    current: dict = {"input_ids": [], "labels": [], "position_ids": [], "seq_lengths": []}
    for i, ex in enumerate(examples):
        n = len(ex["input_ids"])
        if n > block_size:
            raise ValueError(f"Example {i} has {n} tokens, more than block_size={block_size}.")
        if len(current["input_ids"]) + n > block_size:
            rows.append(current)
            current = {"input_ids": [], "labels": [], "position_ids": [], "seq_lengths": []}
        current["input_ids"] += ex["input_ids"]
        current["labels"] += ex["labels"]
        current["position_ids"] += list(range(n))
        current["seq_lengths"].append(n)
    if current["input_ids"]:
        rows.append(current)
    return rows


def packed_attention_mask(seq_lengths: list[int], width: int | None = None) -> torch.Tensor:
    """Boolean attention mask (1, 1, width, width) for one packed row: token i may attend to token j
    only if both belong to the same example and j <= i. Padding beyond the examples attends to itself
    only (its label is -100, so it never reaches the loss)."""
    total = sum(seq_lengths)
    width = width or total
    if width < total:
        raise ValueError(f"width={width} is smaller than the packed length {total}.")
    segment = torch.cat(
        [torch.full((n,), i) for i, n in enumerate(seq_lengths)]
        + [torch.arange(width - total) + len(seq_lengths)]
    )
    causal = torch.tril(torch.ones(width, width, dtype=torch.bool))
    return ((segment[:, None] == segment[None, :]) & causal)[None, None]


def collate_packed(rows: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Batch packed rows: right padding, position ids, and a (batch, 1, width, width) block-diagonal mask."""
    width = max(len(r["input_ids"]) for r in rows)
    batch = collate(
        [
            {k: r[k] for k in ("input_ids", "labels")} | {"attention_mask": [1] * len(r["input_ids"])}
            for r in rows
        ],
        pad_token_id,
    )
    batch["position_ids"] = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["position_ids"])
        batch["position_ids"][i, :n] = torch.tensor(r["position_ids"])
        batch["position_ids"][i, n:] = torch.arange(width - n)
    batch["attention_mask"] = torch.cat([packed_attention_mask(r["seq_lengths"], width) for r in rows])
    return batch
