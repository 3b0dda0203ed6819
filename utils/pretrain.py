"""Pretrain the course's tiny base model on the generated corpus: ``python -m utils.pretrain``.

Reproducible (fixed seed, deterministic CPU kernels) and sized for a 2-core CPU. It trains a byte-level
BPE tokenizer on the corpus, builds the Llama config of ``utils.models.TINY_CONFIG``, trains with AdamW,
warmup and cosine decay (``utils.train.train_loop``, the loop of every chapter), and saves model, tokenizer and a ``pretrain_report.json`` of what it measured:
held-out perplexity, completion of fact sentences in unseen phrasings, and the loss curve.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from utils import data, env, metrics, models, train


def pack_documents(docs: list[list[int]], block_size: int, separator: int) -> torch.Tensor:
    """Concatenate token lists, each preceded by ``separator``, and cut into rows of ``block_size``.

    Returns (n_blocks, block_size); the tail that does not fill a block is dropped.
    """
    stream: list[int] = []
    for doc in docs:
        stream += [separator, *doc]
    n_blocks = len(stream) // block_size
    return torch.tensor(stream[: n_blocks * block_size]).view(n_blocks, block_size)


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

    def blocks_of_epoch(epoch: int) -> list[torch.Tensor]:
        """The corpus re-shuffled and re-packed into blocks, in a seeded random order."""
        rng.shuffle(docs)
        blocks = pack_documents(docs, block_size, tokenizer.bos_token_id)
        order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed + epoch))
        return list(blocks[order])

    def evaluate(m) -> dict:
        return {
            "valid_perplexity": metrics.perplexity(m, tokenizer, valid),
            "heldout_fact_acc": metrics.fact_completion_accuracy(m, tokenizer, facts),
            "new_phrasing_fact_acc": metrics.fact_completion_accuracy(m, tokenizer, new_phrasing),
        }

    def report_progress(entry: dict) -> None:
        print(
            f"epoch {entry['epoch']:3d} step {entry['step']:5d} loss {entry['loss']:.3f} valid ppl "
            f"{entry['valid_perplexity']:.3f} facts: withheld phrasing {entry['heldout_fact_acc']:.1%}, new "
            f"phrasing {entry['new_phrasing_fact_acc']:.1%} ({entry['seconds']:.0f} s)",
            flush=True,
        )

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]  # norms: no weight decay
    start = time.time()
    history = train.train_loop(
        model,
        blocks_of_epoch,
        collate_fn=lambda rows: {"input_ids": torch.stack(rows), "labels": torch.stack(rows)},
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        params=[{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        optimizer_kwargs={"betas": (0.9, 0.95)},
        schedule="cosine",
        min_lr_ratio=0.1,
        warmup_steps=warmup,
        shuffle=False,  # blocks_of_epoch already shuffles
        seed=seed,
        eval_fn=evaluate,
        eval_every=eval_every,
        log_every=eval_every,
        on_log=report_progress,
    )
    total = history[-1]["step"]
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
        "valid_perplexity": history[-1]["valid_perplexity"],  # the last entry is the final evaluation
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
