"""Pretrain the course's tiny base model on the generated corpus: ``python -m utils.pretrain``.

Reproducible (fixed seed, deterministic CPU kernels) and sized for a 2-core CPU. It trains a byte-level
BPE tokenizer on the corpus, builds the Llama config of ``utils.models.TINY_CONFIG``, trains with AdamW,
warmup and cosine decay, and saves model, tokenizer and a ``pretrain_report.json`` of what it measured:
held-out perplexity, completion of fact sentences in unseen phrasings, and the loss curve.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch

from utils import data, env, metrics, models


def pack_documents(docs: list[list[int]], block_size: int, separator: int) -> torch.Tensor:
    """Concatenate token lists, each preceded by ``separator``, and cut into rows of ``block_size``.

    Returns (n_blocks, block_size); the tail that does not fill a block is dropped.
    """
    stream: list[int] = []
    for doc in docs:
        stream += [separator, *doc]
    n_blocks = len(stream) // block_size
    return torch.tensor(stream[: n_blocks * block_size]).view(n_blocks, block_size)


def lr_at(step: int, total: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    """Linear warmup to ``peak``, then cosine decay to ``floor * peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def pretrain(
    out_dir: Path = models.BASE_DIR,
    epochs: int = 20,
    block_size: int = 128,
    batch_size: int = 32,
    lr: float = 3e-3,
    weight_decay: float = 0.1,
    warmup: int = 200,
    seed: int = 0,
    eval_every: int = 300,
) -> dict:
    env.seed_everything(seed)
    env.quiet_library_noise()
    torch.set_flush_denormal(True)  # tiny Adam moments become denormal floats, which are slow on CPUs
    # One thread: the same bits on any machine (reductions split across threads sum in another order),
    # and no slowdown when other work shares the cores.
    torch.set_num_threads(1)
    corpus = data.load_corpus("train")
    valid = data.load_corpus("valid")
    facts = data.load_heldout_facts("withheld")
    new_phrasing = data.load_heldout_facts("new_phrasing")
    # The tokenizer learns its merges from the corpus and the instruction texts, as a real tokenizer is
    # trained on broad text; the model itself is pretrained on the corpus alone.
    instruction_text = [m["content"] for row in data.load_instructions("train") for m in row["messages"]]
    tokenizer = models.train_tokenizer(corpus + instruction_text)
    model = __import__("transformers").LlamaForCausalLM(models.tiny_config(tokenizer))
    n_params = models.count_parameters(model)
    print(f"vocabulary {len(tokenizer)}, parameters {n_params:,}")

    docs = [tokenizer(d, add_special_tokens=False)["input_ids"] for d in corpus]
    rng = random.Random(seed)
    steps_per_epoch = sum(len(d) + 1 for d in docs) // block_size // batch_size
    total = steps_per_epoch * epochs
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
    )
    history, step, start = [], 0, time.time()
    for epoch in range(epochs):
        rng.shuffle(docs)
        blocks = pack_documents(docs, block_size, tokenizer.bos_token_id)
        order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed + epoch))
        model.train()
        for b in range(steps_per_epoch):
            batch = blocks[order[b * batch_size : (b + 1) * batch_size]]
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, lr, warmup)
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if step % eval_every == 0 or step == total:
                ppl = metrics.perplexity(model, tokenizer, valid)
                acc = metrics.fact_completion_accuracy(model, tokenizer, facts)
                acc_new = metrics.fact_completion_accuracy(model, tokenizer, new_phrasing)
                history.append(
                    {
                        "step": step,
                        "train_loss": loss.item(),
                        "valid_perplexity": ppl,
                        "heldout_fact_acc": acc,
                        "new_phrasing_fact_acc": acc_new,
                    }
                )
                print(
                    f"epoch {epoch + 1:3d} step {step:5d}/{total} loss {loss.item():.3f} valid ppl {ppl:.3f} "
                    f"facts: withheld phrasing {acc:.1%}, new phrasing {acc_new:.1%} ({time.time() - start:.0f} s)",
                    flush=True,
                )
                model.train()
    seconds = time.time() - start
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    report = {
        "parameters": n_params,
        "vocabulary": len(tokenizer),
        "epochs": epochs,
        "steps": total,
        "tokens_seen": total * batch_size * block_size,
        "seconds": round(seconds),
        "torch_threads": torch.get_num_threads(),
        "valid_perplexity": history[-1]["valid_perplexity"],
        "heldout_fact_acc": history[-1]["heldout_fact_acc"],
        "new_phrasing_fact_acc": history[-1]["new_phrasing_fact_acc"],
        "history": history,
    }
    (out_dir / "pretrain_report.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=models.BASE_DIR)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    pretrain(args.out, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size)
